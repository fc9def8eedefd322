"""A DAG for the bad-input system tests: prompt records whose texts look like Jinja, sent verbatim.

Its records hold ``{{ ds }}``, a ``{# comment #}`` and ``{{ name }}`` (undefined: Airflow's strict
undefined would fail the task if it were rendered). ``max_credits`` is templated from a param.
The output and journal folders come from the run's conf. Connection: ``imagen_default``.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

#: Sent exactly as written: braces are ordinary in prompts.
VERBATIM_PROMPTS = [
    {"prompt_id": "v1", "prompt": "Poster headline: {{ ds }} {# hidden #} end"},
    {"prompt_id": "v2", "prompt": "{{ name }}"},
]

with DAG(
    dag_id="imagen_sys_verbatim",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    params={"output_path": "", "journal_path": "", "budget": 460},
    tags=["imagen-system-test"],
):
    ImagenBatchGenerateOperator(
        task_id="generate",
        prompts=VERBATIM_PROMPTS,
        output_path="{{ params.output_path }}",
        journal_path="{{ params.journal_path }}",
        max_credits="{{ params.budget }}",
        deferrable=True,
        expected_render=0.5,
        poll_interval=0.25,
        linger=0.0,
        max_submit_rate=None,
        retries=0,
    )
