"""Baseline: what a user builds with apache-airflow-providers-http alone, mapped one task per prompt.

Why it exists: the benchmarks compare our provider against the DAG a user would most plausibly write
without it (scenario 4 of docs/benchmarks.md). It deliberately does NOT import
``airflow_provider_imagen``; it talks to reAPI (or the emulator) through the ``reapi_http`` HTTP
connection (host = base URL, password = API key).

Shape (three mapped task instances per prompt, plus two):
  build_requests            one task: N JSON bodies from the run conf (this push is what trips
                            ``[core] max_map_length`` = 1024: at N = 1,500 it fails with "pushed value is
                            too large to map as a downstream's dependency")
  submit[i]   HttpOperator  POST /api/v1/images/generations, Bearer key from the connection, returns the id
  wait[i]     HttpSensor    GET /api/v1/tasks/{id} every 2 s, ``deferrable=True``, with a ``response_check``
                            on the status field. NOTE: HttpSensor silently ignores ``deferrable`` when a
                            ``response_check`` is given (providers-http 6.x ``execute``), so these poke on a
                            worker slot. Without a check, reAPI's ``200 {"status": "processing"}`` would count
                            as done and the run would "succeed" with no images; so a user has to pass one.
  download[i] @task         GET the task again (the sensor returns nothing) and save the PNG
  manifest    @task         one JSON manifest of everything downloaded

Run conf: ``n`` (number of prompts; or ``prompts``: an explicit list), ``output_dir`` (local folder),
``size`` (default ``1:1``), ``poll_interval`` (default 2 s), ``sensor_timeout`` (default 900 s).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from airflow.providers.http.hooks.http import HttpHook
from airflow.providers.http.operators.http import HttpOperator
from airflow.providers.http.sensors.http import HttpSensor
from airflow.sdk import DAG, task

CONN_ID = "reapi_http"
AUTH_HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Bearer {{ conn.reapi_http.password }}",
}


def prompt_for(index: int) -> str:
    """The deterministic prompt number ``index`` (the harness writes the same ones to its prompt table)."""
    return f"Benchmark image {index:05d}: a ceramic teapot on a linen tablecloth, soft morning light"


def _prompts(conf: dict[str, Any]) -> list[str]:
    if conf.get("prompts"):
        return [str(prompt) for prompt in conf["prompts"]]
    return [prompt_for(index) for index in range(int(conf.get("n", 10)))]


def _render_finished(response: Any) -> bool:
    """``response_check`` of the sensor: done when completed; a failed render fails the sensor."""
    body = response.json()
    if body.get("status") == "failed":
        raise RuntimeError(f"render failed: {body.get('error')}")
    return body.get("status") == "completed"


with DAG(
    dag_id="stock_http",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["benchmark", "baseline"],
):

    @task
    def build_requests(**context: Any) -> list[str]:
        conf = context["dag_run"].conf or {}
        size = conf.get("size", "1:1")
        return [json.dumps({"model": "imagen-4-0", "prompt": p, "size": size}) for p in _prompts(conf)]

    submit = HttpOperator.partial(
        task_id="submit",
        http_conn_id=CONN_ID,
        endpoint="/api/v1/images/generations",
        method="POST",
        headers=AUTH_HEADERS,
        response_filter=lambda response: response.json()["id"],
    ).expand(data=build_requests())

    wait = HttpSensor.partial(
        task_id="wait",
        http_conn_id=CONN_ID,
        method="GET",
        headers=AUTH_HEADERS,
        response_check=_render_finished,
        poke_interval=2,
        timeout=900,
        deferrable=True,
    ).expand(endpoint=submit.output.map(lambda reapi_id: f"/api/v1/tasks/{reapi_id}"))

    @task
    def download(reapi_id: str, **context: Any) -> dict[str, Any]:
        conf = context["dag_run"].conf or {}
        hook = HttpHook(method="GET", http_conn_id=CONN_ID)
        password = hook.get_connection(CONN_ID).password
        body = hook.run(f"/api/v1/tasks/{reapi_id}", headers={"Authorization": f"Bearer {password}"}).json()
        url = body["output"]["image_urls"][0]
        reply = requests.get(url, timeout=60)
        reply.raise_for_status()
        image = reply.content
        out = Path(conf["output_dir"]) / f"{reapi_id}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(image)
        return {"reapi_id": reapi_id, "path": str(out), "bytes": len(image)}

    @task
    def manifest(rows: Any, **context: Any) -> dict[str, Any]:
        conf = context["dag_run"].conf or {}
        rows = list(rows)
        out = Path(conf["output_dir"]) / "manifest.json"
        out.write_text(json.dumps(rows, indent=1))
        return {"manifest": str(out), "images": len(rows)}

    files = download.expand(reapi_id=submit.output)
    wait >> files
    manifest(files)
