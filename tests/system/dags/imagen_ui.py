"""The DAG the browser tests run on the real stack: a batch whose run the Imagen pages then show.

Its own DAG id, so the spend overview's row for it comes from the browser tests alone. The prompt table
and the output folder come from the run's conf; connection ``imagen_default`` (the stack's emulator).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

with DAG(
    dag_id="imagen_sys_ui",
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
        expected_render=0.5,
        poll_interval=0.25,
        progress_interval=0.0,
        max_submit_rate=None,
        retries=2,
        retry_delay=timedelta(seconds=1),
    )
