"""What names one try of a task instance, and how Airflow's request to stop reaches it.

Both operators claim the journal for the try that runs them (see :mod:`airflow_provider_imagen.batch.fence`)
and stop sending when Airflow calls ``on_kill`` (SIGTERM from a clear or mark-failed, ``execution_timeout``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context


def stop_event(operator: BaseOperator) -> threading.Event:
    """Return the operator's stop flag, made on first use (an Event cannot be copied with a DAG)."""
    event = operator.__dict__.get("_imagen_stop")
    if event is None:
        event = operator.__dict__["_imagen_stop"] = threading.Event()
    return event


def try_owner(context: Context) -> str:
    """Return what names this try of the task instance (Airflow 3 gives each try its own id)."""
    ti = context["ti"]
    ti_id = getattr(ti, "id", None)
    if ti_id:
        return str(ti_id)
    return (
        f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{getattr(ti, 'map_index', -1)}/{getattr(ti, 'try_number', 0)}"
    )
