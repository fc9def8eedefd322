"""DAGs of the distributed tests (the example backfill DAG is the other one the stack runs).

One batch task each; the prompt table, the output folder (``s3://…``: no disk is shared between the
workers) and the journal folder come from the run's conf. Connection: ``imagen_default``, pointed at the
stack's emulator.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

#: Renders take ~1-15 s in these tests; poll at about a second, backing off from there.
_POLLING: dict[str, Any] = {"expected_render": 1.0, "poll_interval": 0.5, "progress_interval": 0.0}

#: dag_id suffix → operator settings. Retries are generous: the faults injected fail tries on purpose.
SCENARIOS: dict[str, dict[str, Any]] = {
    # Triggerer faults and a broker restart: the whole table in one window, every wait deferred.
    "defer": {"max_in_flight": 200, "max_submit_rate": None, "linger": 0.0},
    # A worker killed mid-pass: paced submits, so the pass on the worker lasts long enough to be hit.
    "paced": {"max_in_flight": 100, "max_submit_rate": 5.0, "linger": 0.0},
    # Many short passes (a small window refilled through the triggerer): work hopping between workers.
    "hops": {"max_in_flight": 10, "refill_fraction": 0.5, "max_submit_rate": None, "linger": 0.0},
}

for name, settings in SCENARIOS.items():
    with DAG(
        dag_id=f"imagen_dist_{name}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        params={"prompts": "", "output_path": "", "journal_path": ""},
        tags=["imagen-distributed-test"],
    ):
        ImagenBatchGenerateOperator(
            task_id="generate",
            prompts="{{ params.prompts }}",
            output_path="{{ params.output_path }}",
            journal_path="{{ params.journal_path }}",
            deferrable=True,
            retries=4,
            retry_delay=timedelta(seconds=2),
            **_POLLING,
            **settings,
        )
