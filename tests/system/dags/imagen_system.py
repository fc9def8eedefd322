"""DAGs for the system tests: one batch DAG per fault scenario, run on a real scheduler and triggerer.

The stack's dag-processor parses this file once, with the stack's environment, so per-test knobs
cannot come from the test process: each scenario that needs different operator settings has its own
DAG. The prompt table, the output folder and the journal folder come from the run's conf (templated).
Connection: ``imagen_default``, pointed at the stack's emulator by the test fixture.
"""

from __future__ import annotations

import inspect
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

#: Emulator renders take ~0.5 s in these tests; poll at about that, then every 0.25 s.
_FAST_POLLING: dict[str, Any] = {"expected_render": 0.5, "poll_interval": 0.25, "progress_interval": 0.0}
# Every wait goes through the triggerer (what these tests are about): with renders this short, an
# operator that may ``linger`` on the worker for tasks about to end would never defer.
if "linger" in inspect.signature(ImagenBatchGenerateOperator.__init__).parameters:
    _FAST_POLLING["linger"] = 0.0

#: dag_id suffix → operator settings (beyond prompts/output/journal, which come from the conf).
#: Retries are generous: besides the faults the tests inject, Airflow 3.3.2 itself sometimes fails a
#: try whose trigger fired before the scheduler drained the deferring try's executor event
#: (apache/airflow#72716, "state mismatch"); the journal makes such a retry free.
SCENARIOS: dict[str, dict[str, Any]] = {
    # A 300-prompt batch under 429 storms, 5xx and slow answers: windows of 150, refilled when all ended
    # (three passes on a worker, two triggers).
    "storm": {"max_in_flight": 150, "refill_fraction": 1.0, "max_submit_rate": None, "retries": 3},
    # Triggerer / scheduler restarts, S3 outage, URL expiry: everything in one window, one deferral.
    "defer": {"max_in_flight": 100, "max_submit_rate": None, "retries": 3},
    # Worker killed mid-submit: submits are paced so the kill lands in the middle of them.
    "paced": {"max_in_flight": 100, "max_submit_rate": 6.0, "retries": 3},
    # Out of credits: no retries, so the run's end state is the operator's own verdict.
    "credits": {"max_in_flight": 100, "max_submit_rate": None, "retries": 0},
    # Bad rows are recorded (the default policy) next to good ones.
    "record": {"max_submit_rate": None, "retries": 3},
    # Bad rows fail the task before any POST (the retry it is allowed must not happen).
    "strict": {"on_invalid": "fail", "max_submit_rate": None, "retries": 1},
}

for name, settings in SCENARIOS.items():
    settings = dict(settings)
    with DAG(
        dag_id=f"imagen_sys_{name}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        params={"prompts": "", "output_path": "", "journal_path": ""},
        tags=["imagen-system-test"],
    ):
        ImagenBatchGenerateOperator(
            task_id="generate",
            prompts="{{ params.prompts }}",
            output_path="{{ params.output_path }}",
            journal_path="{{ params.journal_path }}",
            deferrable=True,
            retries=settings.pop("retries"),
            retry_delay=timedelta(seconds=1),
            **_FAST_POLLING,
            **settings,
        )
