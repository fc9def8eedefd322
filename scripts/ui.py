"""``make ui``: serve the demo's Airflow (after ``make demo``) with the Imagen plugin, and say where to look.

It starts ``airflow api-server`` on the demo's Airflow home (``.demo/airflow``, SQLite) with the simple
auth manager in all-admins mode (a local demo: no login), waits until it answers, then prints the URLs
of the night's gallery and of the spend overview, and serves until Ctrl-C. Only the API server runs:
the pages read what the demo's runs recorded and wrote; no DAG runs and nothing is paid.

``IMAGEN_UI_PORT`` changes the port (default 8080). ``--check`` stops once the gallery's data answers
(used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
AIRFLOW_HOME = DEMO / "airflow"
DB = AIRFLOW_HOME / "airflow.db"
DAG_ID = "imagen_catalog_nightly"


def say(text: str = "") -> None:
    print(text, flush=True)


def night_run() -> str | None:
    """Return the run id of the demo's night one: the run whose batch task returned a manifest."""
    with sqlite3.connect(f"file:{DB}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT run_id, value FROM xcom WHERE dag_id = ? AND task_id = 'generate' "
            "AND key = 'return_value' ORDER BY timestamp DESC",
            (DAG_ID,),
        ).fetchall()
    for run_id, value in rows:
        if "manifest_uri" in str(value):
            return str(run_id)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit once the gallery's data answers")
    args = parser.parse_args()
    if not DB.exists():
        say("No demo to show: run `make demo` first (it makes the night's images in .demo/).")
        return 1
    run_id = night_run()
    if run_id is None:
        say("The demo's Airflow has no run with a manifest: run `make demo` again.")
        return 1
    port = int(os.environ.get("IMAGEN_UI_PORT", "8080"))
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "VIRTUAL_ENV"}
    env.update(
        AIRFLOW_HOME=str(AIRFLOW_HOME),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{DB}",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=base,
        AIRFLOW__API__WORKERS="1",
    )
    # A SIGTERM (a CI job's timeout, `kill`) stops the API server too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log_path = DEMO / "logs" / "api-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    gallery = f"{base}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/plugin/imagen-gallery"
    data = f"{base}/imagen/api/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "api-server"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        say(f"Starting Airflow's API server with the Imagen plugin on {base} (log: {log_path}) …")
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                say(log_path.read_text(errors="replace")[-3000:])
                say(
                    f"The API server exited ({server.returncode}); is port {port} free? "
                    "IMAGEN_UI_PORT=… picks another."
                )
                return 1
            try:
                if httpx.get(data, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                say(f"The API server did not answer in 120 s; see {log_path}.")
                return 1
            time.sleep(1)
        summary = httpx.get(data, timeout=30).json()["header"]
        say(f"\nThe night's gallery ({summary['rows']} images requested, {summary['credits']:,} credits):")
        say(f"  {gallery}")
        say(f"Spend overview:\n  {base}/plugin/imagen-spend")
        say(f"Airflow:\n  {base}/dags/{DAG_ID}\n")
        if args.check:
            say(json.dumps(summary["counts"]))
            return 0
        say("Serving until Ctrl-C.")
        server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


if __name__ == "__main__":
    sys.exit(main())
