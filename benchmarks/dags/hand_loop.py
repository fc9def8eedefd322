"""Baseline: the single hand-written task a user writes next, once the mapped DAG proves too slow.

Why it exists: scenario 5 of docs/benchmarks.md compares our provider with this loop. It is fast (Airflow
schedules one task instance), but it holds a worker slot from the first POST to the last download, polls
every pending id every 2 s with no backoff (about five polls per image at 10 s renders), and has no retry
safety: a retry of this task re-submits, and re-pays, every prompt. It deliberately does NOT import
``airflow_provider_imagen``; it reads the base URL and the key from the ``reapi_http`` connection.

Run conf: ``n`` (number of prompts; or ``prompts``: an explicit list), ``output_dir`` (local folder),
``size`` (default ``1:1``), ``poll_interval`` (default 2 s), ``timeout`` (default 900 s, for the loop).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from airflow.sdk import DAG, BaseHook, task

CONN_ID = "reapi_http"


def prompt_for(index: int) -> str:
    """The deterministic prompt number ``index`` (the harness writes the same ones to its prompt table)."""
    return f"Benchmark image {index:05d}: a ceramic teapot on a linen tablecloth, soft morning light"


def _prompts(conf: dict[str, Any]) -> list[str]:
    if conf.get("prompts"):
        return [str(prompt) for prompt in conf["prompts"]]
    return [prompt_for(index) for index in range(int(conf.get("n", 10)))]


with DAG(
    dag_id="hand_loop",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["benchmark", "baseline"],
):

    @task
    def generate_all(**context: Any) -> dict[str, Any]:
        conf = context["dag_run"].conf or {}
        prompts = _prompts(conf)
        size = conf.get("size", "1:1")
        interval = float(conf.get("poll_interval", 2.0))
        deadline = time.monotonic() + float(conf.get("timeout", 900))
        out_dir = Path(conf["output_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        conn = BaseHook.get_connection(CONN_ID)
        headers = {"Authorization": f"Bearer {conn.password}"}
        with httpx.Client(base_url=str(conn.host).rstrip("/"), headers=headers, timeout=60) as client:
            prompt_of: dict[str, str] = {}
            for prompt in prompts:
                reply = client.post(
                    "/api/v1/images/generations",
                    json={"model": "imagen-4-0", "prompt": prompt, "size": size},
                )
                reply.raise_for_status()
                prompt_of[reply.json()["id"]] = prompt

            pending = set(prompt_of)
            finished: dict[str, dict[str, Any]] = {}
            while pending and time.monotonic() < deadline:
                for reapi_id in sorted(pending):
                    body = client.get(f"/api/v1/tasks/{reapi_id}").json()
                    if body.get("status") in ("completed", "failed"):
                        finished[reapi_id] = body
                        pending.discard(reapi_id)
                if pending:
                    time.sleep(interval)

            rows = []
            for reapi_id, body in finished.items():
                row: dict[str, Any] = {"reapi_id": reapi_id, "prompt": prompt_of[reapi_id]}
                if body["status"] == "completed":
                    reply = client.get(body["output"]["image_urls"][0])
                    reply.raise_for_status()
                    path = out_dir / f"{reapi_id}.png"
                    path.write_bytes(reply.content)
                    row.update(status="completed", path=str(path), bytes=len(reply.content))
                else:
                    row.update(status="failed", error=body.get("error"))
                rows.append(row)
            rows += [{"reapi_id": i, "prompt": prompt_of[i], "status": "timeout"} for i in sorted(pending)]
        (out_dir / "manifest.json").write_text(json.dumps(rows, indent=1))
        if pending:
            raise RuntimeError(f"{len(pending)} renders still pending at the deadline")
        return {"images": sum(row["status"] == "completed" for row in rows), "rows": len(rows)}

    generate_all()
