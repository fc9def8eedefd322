"""DAGs the UI plugin's API tests run with ``dag.test()``: one batch, one single image (their own ids, so
the spend overview's figures for them come from these tests alone)."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator
from airflow_provider_imagen.operators.generate import ImagenGenerateOperator

with DAG(
    dag_id="imagen_test_ui_batch",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    params={"prompts": "", "output_path": "", "journal_path": ""},
):
    ImagenBatchGenerateOperator(
        task_id="generate",
        prompts="{{ params.prompts }}",
        output_path="{{ params.output_path }}",
        journal_path="{{ params.journal_path }}",
        deferrable=False,
        expected_render=0.15,
        poll_interval=0.1,
        progress_interval=0.0,
        retries=0,
    )

with DAG(
    dag_id="imagen_test_ui_single",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    params={"output_path": "", "journal_path": ""},
):
    ImagenGenerateOperator(
        task_id="hero",
        prompt="一只陶瓷茶壶，柔和的晨光，产品摄影",
        size="16:9",
        output_path="{{ params.output_path }}",
        journal_path="{{ params.journal_path }}",
        deferrable=False,
        expected_render=0.1,
        poll_interval=0.1,
        retries=0,
    )
