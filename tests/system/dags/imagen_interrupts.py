"""DAGs for the interrupt tests: what Airflow itself does to a running try (timeouts, clears, zombies,
reruns) while it pays for images.

Like ``imagen_system.py``, per-test settings that cannot come from the run's conf get a DAG of their own;
the prompts (or the one prompt), the output folder and the journal folder come from the conf.
"""

from __future__ import annotations

import atexit
import time
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator
from airflow_provider_imagen.operators.generate import ImagenGenerateOperator

#: Short enough that a POST whose answer the emulator holds back 20 s is cut off by it, long enough
#: for a whole try of a few 0.5 s renders waited for on the worker (no deferral: no second process).
EXECUTION_TIMEOUT = timedelta(seconds=10)
#: The budget of the ``resubmit`` DAG: exactly one image per row of its 10-row table.
BUDGET_ROWS = 10

_BATCH: dict[str, Any] = {
    "prompts": "{{ params.prompts }}",
    "output_path": "{{ params.output_path }}",
    "journal_path": "{{ params.journal_path }}",
    "expected_render": 0.5,
    "poll_interval": 0.25,
    "progress_interval": 0.0,
    "retry_delay": timedelta(seconds=1),
}
_PARAMS = {"prompts": "", "output_path": "", "journal_path": ""}

#: dag_id suffix → batch operator settings.
BATCH_SCENARIOS: dict[str, dict[str, Any]] = {
    # execution_timeout fires while one POST waits for its answer; waits happen on the worker.
    "timeout_batch": {
        "deferrable": False,
        "execution_timeout": EXECUTION_TIMEOUT,
        "max_submit_rate": None,
        "retries": 2,
    },
    # Paced submits, deferrable: a clear, a zombie or a kill lands in the middle of them.
    "paced": {"deferrable": True, "linger": 0.0, "max_submit_rate": 6.0, "retries": 3},
    # The same, paying again for unknown submits, within a budget of one image per row.
    "resubmit": {
        "deferrable": True,
        "linger": 0.0,
        "max_submit_rate": 6.0,
        "retries": 3,
        "resubmit_unknown": True,
        "max_credits": BUDGET_ROWS * CREDITS_PER_IMAGE,
    },
    # A task that fails after paying (any moderated row fails it, once the manifest is written); the
    # test then edits the table and clears the task.
    "edited": {
        "deferrable": True,
        "linger": 0.0,
        "max_submit_rate": None,
        "fail_on_moderation_rate": 0.0,
        "retries": 0,
    },
    # Plain runs, several into one output folder; also run with ``airflow dags test`` (paused, so that
    # the scheduler never runs the task instances of those runs as well).
    "rerun": {"deferrable": True, "linger": 0.0, "max_submit_rate": None, "retries": 3},
}

for name, settings in BATCH_SCENARIOS.items():
    with DAG(
        dag_id=f"imagen_sys_int_{name}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        params=_PARAMS,
        tags=["imagen-system-test"],
    ):
        ImagenBatchGenerateOperator(task_id="generate", **{**_BATCH, **settings})

#: How long a deferring task process takes to exit in the race DAGs: seconds in which its "success" has
#: not reached the scheduler yet. On a loaded worker that is the supervisor and a scheduler loop; here it
#: is made certain (longer than this stack's 3–4 s from a deferral to a running resumed process, the
#: suite's other half loading the machine), since a test cannot load a machine by the same amount
#: twice. The scheduler then hears of it 7–9 s after the deferral on this stack.
SLOW_EXIT_S = 7.0
#: How long the resumed pass works before it goes on: a large batch's resume mirrors and refills hundreds
#: of places. The stale "success" is fatal while the resumed try is running (while it is still queued,
#: Airflow logs the mismatch and lets it go on), so this keeps it running when that "success" arrives.
RESUMED_PASS_S = 12.0


class SlowExitBatchOperator(ImagenBatchGenerateOperator):
    """The batch operator whose deferring process takes :data:`SLOW_EXIT_S` more to exit.

    Only the exit is slowed (an ``atexit`` sleep registered as it defers) and the resumed pass
    lengthened; the trigger is stored and runs at once, so a resume can start while the scheduler still
    waits for the deferring process's exit.
    """

    def defer(self, **kwargs: Any) -> Any:
        atexit.register(time.sleep, SLOW_EXIT_S)
        return super().defer(**kwargs)

    def execute_complete(self, context: Any, event: Any = None, **kwargs: Any) -> Any:
        time.sleep(RESUMED_PASS_S)
        return super().execute_complete(context, event, **kwargs)


#: Airflow's stale-success race: every wait is deferred, the renders have ended by the time the trigger
#: starts, no retries. ``race_unheld`` turns the hold off to show the race is there; ``race`` holds as a
#: deployment with such slow exits should (``[imagen] min_deferral_seconds`` above the exit time).
for name, hold in (("race", 15.0), ("race_unheld", 0.0)):
    with DAG(
        dag_id=f"imagen_sys_int_{name}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        params=_PARAMS,
        tags=["imagen-system-test"],
    ):
        SlowExitBatchOperator(
            task_id="generate",
            **{**_BATCH, "deferrable": True, "linger": 0.0, "retries": 0, "min_deferral": hold},
        )

with DAG(
    dag_id="imagen_sys_int_timeout_single",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    params={"prompt": "", "output_path": "", "journal_path": ""},
    tags=["imagen-system-test"],
):
    ImagenGenerateOperator(
        task_id="generate",
        prompt="{{ params.prompt }}",
        output_path="{{ params.output_path }}",
        journal_path="{{ params.journal_path }}",
        deferrable=False,
        expected_render=0.5,
        poll_interval=0.25,
        execution_timeout=EXECUTION_TIMEOUT,
        retries=1,
        retry_delay=timedelta(seconds=1),
    )
