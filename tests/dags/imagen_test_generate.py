"""DAGs the operator and sensor tests run with ``dag.test()``; parameters come from ``run_conf``."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_imagen.hooks.imagen import ImagenHook
from airflow_provider_imagen.operators.generate import ImagenGenerateOperator
from airflow_provider_imagen.sensors.imagen import ImagenTaskSensor

PARAMS: dict[str, Any] = {
    "prompt": "a test image",
    "size": "1:1",
    "output_path": "",
    "journal_path": "",
    "blocker": "",
    "timeout": 60,
}


def remove_blocker(context: Any) -> None:
    """On retry, remove the file that made the first try's mirroring fail (a storage outage ending)."""
    blocker = context["params"].get("blocker")
    if blocker and os.path.exists(blocker):
        os.remove(blocker)


for deferrable in (True, False):
    with DAG(
        dag_id=f"imagen_test_generate_{'deferrable' if deferrable else 'sync'}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        params=PARAMS,
    ):
        ImagenGenerateOperator(
            task_id="generate",
            prompt="{{ params.prompt }}",
            size="{{ params.size }}",
            output_path="{{ params.output_path }}",
            journal_path="{{ params.journal_path }}",
            deferrable=deferrable,
            expected_render=0.1,
            poll_interval=0.1,
            timeout=float(os.environ.get("IMAGEN_TEST_TIMEOUT", "30")),
            retries=1,
            retry_delay=timedelta(seconds=0),
            on_retry_callback=remove_blocker,
        )

for mode, soft_fail in (
    ("deferrable", False),
    ("poke", False),
    ("reschedule", False),
    ("deferrable", True),
    ("poke", True),
):
    with DAG(
        dag_id=f"imagen_test_sensor_{mode}{'_soft' if soft_fail else ''}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        params=PARAMS,
    ):

        @task
        def submit(**context: Any) -> str:
            from airflow_provider_imagen.api import ImageRequest

            client = ImagenHook().get_conn()
            return client.submit(ImageRequest(context["params"]["prompt"], size="1:1")).id

        ImagenTaskSensor(
            task_id="wait",
            imagen_task_id="{{ ti.xcom_pull(task_ids='submit') }}",
            deferrable=mode == "deferrable",
            mode="reschedule" if mode == "reschedule" else "poke",
            poke_interval=0.2,
            expected_render=0.1,
            poll_interval=0.1,
            timeout=float(os.environ.get("IMAGEN_TEST_TIMEOUT", "30")),
            soft_fail=soft_fail,
        ).set_upstream(submit())
