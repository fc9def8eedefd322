"""Ours: ImagenBatchGenerateOperator over the harness's prompt table, one DAG per window size.

Run conf (written by the harness): ``prompt_table`` (Parquet URI), ``output_uri`` (folder URI). The
window (``max_in_flight``) is not templated, so each window size is its own DAG: ``imagen_batch_w<W>``.
Connection: ``imagen_default`` (the harness points it at its emulator).
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

#: Window sizes the suite uses; the harness picks the DAG by name.
WINDOWS = (40, 100, 400, 1000, 2000)

for window in WINDOWS:
    with DAG(
        dag_id=f"imagen_batch_w{window}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        max_active_runs=1,
        tags=["benchmark", "ours"],
    ):
        ImagenBatchGenerateOperator(
            task_id="generate",
            prompts="{{ dag_run.conf['prompt_table'] }}",
            output_path="{{ dag_run.conf['output_uri'] }}",
            max_in_flight=window,
            max_submit_rate=float(os.environ["IMAGEN_BENCH_SUBMIT_RATE"])
            if os.environ.get("IMAGEN_BENCH_SUBMIT_RATE")
            else None,
            deferrable=True,
            # Seconds the worker may wait for completions instead of deferring (the operator's default
            # is 5); IMAGEN_BENCH_LINGER trades worker-slot time for throughput.
            linger=float(os.environ.get("IMAGEN_BENCH_LINGER", "5")),
            # IMAGEN_BENCH_REFILL: "1" refills on the worker, "0" defers between refills, unset decides.
            refill_on_worker={"1": True, "0": False}.get(os.environ.get("IMAGEN_BENCH_REFILL", "")),
            progress_interval=10.0,
        )

with DAG(
    dag_id="imagen_batch_defaults",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["benchmark", "ours"],
):
    # What a user gets without tuning: every knob at its default, deferrable, no retries.
    ImagenBatchGenerateOperator(
        task_id="generate",
        prompts="{{ dag_run.conf['prompt_table'] }}",
        output_path="{{ dag_run.conf['output_uri'] }}",
        deferrable=True,
    )

# One DAG whose knobs come from the environment (the harness sets them per scenario through
# ``airflow_config``), for the scale and contention scenarios: the window, the poll schedule for fast
# renders, the window's adaptation to 429s, and how many runs may be active at once (a backfill).
with DAG(
    dag_id="imagen_batch_tuned",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=int(os.environ.get("IMAGEN_BENCH_MAX_ACTIVE_RUNS", "16")),
    max_active_tasks=int(os.environ.get("IMAGEN_BENCH_MAX_ACTIVE_RUNS", "16")),
    tags=["benchmark", "ours"],
):
    ImagenBatchGenerateOperator(
        task_id="generate",
        prompts="{{ dag_run.conf['prompt_table'] }}",
        output_path="{{ dag_run.conf['output_uri'] }}",
        max_in_flight=int(os.environ.get("IMAGEN_BENCH_MAX_IN_FLIGHT", "100")),
        max_submit_rate=float(os.environ["IMAGEN_BENCH_SUBMIT_RATE"])
        if os.environ.get("IMAGEN_BENCH_SUBMIT_RATE")
        else None,
        expected_render=float(os.environ.get("IMAGEN_BENCH_EXPECTED_RENDER", "10")),
        poll_interval=float(os.environ.get("IMAGEN_BENCH_POLL_INTERVAL", "2")),
        adaptive_window=os.environ.get("IMAGEN_BENCH_ADAPTIVE", "1") != "0",
        deferrable=True,
        linger=float(os.environ.get("IMAGEN_BENCH_LINGER", "5")),
        progress_interval=10.0,
    )
