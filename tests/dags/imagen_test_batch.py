"""Batch DAGs for the batch operator tests; table, output and knobs come from ``run_conf``."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

#: Knobs that are not templated are read at parse time from this environment variable (JSON).
KNOBS: dict[str, Any] = json.loads(os.environ.get("IMAGEN_TEST_BATCH_KNOBS", "{}"))

for deferrable in (True, False):
    knobs = dict(KNOBS)
    # The deferrable flavour defers at every wait unless a test asks to linger, so the triggerer path is
    # what it exercises.
    knobs.setdefault("linger", 0.0 if deferrable else 5.0)
    with DAG(
        dag_id=f"imagen_test_batch_{'deferrable' if deferrable else 'sync'}",
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
            deferrable=deferrable,
            expected_render=0.15,
            poll_interval=0.1,
            retries=int(knobs.pop("retries", 1)),
            retry_delay=timedelta(seconds=0),
            progress_interval=0.0,
            **knobs,
        )
