"""Throughput on a distributed Airflow beside a single machine, in the same hour: N = 2,000 prompts, one
batch task (``imagen_batch_w100``: window 100), renders of 10 ± 2 s (ideal bound 2,000 / 100 × 10 s =
200 s), on

- ``celery``: CeleryExecutor over Redis, PostgreSQL, two Celery workers (4 slots each), two triggerers
  (the stack of ``tests/distributed``), and
- ``local``: LocalExecutor on SQLite, one scheduler and one triggerer (the stack of ``tests/system``).

Both read the prompt table from and write images, journal and manifest to the same kind of storage: a
local S3 server (moto), since the Celery workers share no disk. Measured per run: wall time (dag_run
start → end) against the bound; every pass of the task (its worker, when it started) and, for each
resume, the gap between the trigger's event (the task instance leaving ``deferred``, sampled every
0.1 s in the metadata DB) and the pass starting on a worker (the first line of the pass in the worker's
task log); polls per image from the emulator's ledger.

    .venv/bin/python -m benchmarks.distributed              # both, one run each (~12 min)
    .venv/bin/python -m benchmarks.distributed --only celery --n 400
    .venv/bin/python -m benchmarks.distributed --n 400 --linger 0    # every wait deferred: many resumes

Needs the ``distributed`` extra (``make test-distributed`` installs it). Prints one JSON line per run and
writes them to ``benchmarks/results/<time>-distributed.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import prompt_for  # noqa: E402
from tests.distributed.helpers import StateSampler  # noqa: E402
from tests.distributed.stack import PASS_START, DistributedStack, _epoch, _json_line  # noqa: E402
from tests.system.conftest import S3Server  # noqa: E402
from tests.system.stack import Stack  # noqa: E402

DAG_ID = "imagen_batch_w100"
DAG_FILE = REPO / "benchmarks" / "dags" / "imagen_batch.py"
BUCKET = "imagen-bench"
CONN_ID = "imagen_bench_s3"


def passes_from_logs(folders: dict[str, Path]) -> list[dict[str, Any]]:
    """host → log folder of the task: every pass's start (first line of the pass) and host."""
    found = []
    for host, folder in folders.items():
        for path in sorted(folder.glob("attempt=*.log")) if folder.exists() else ():
            for line in path.read_text(errors="replace").splitlines():
                record = _json_line(line)
                if record and PASS_START.search(str(record.get("event", ""))):
                    found.append({"host": host, "at": _epoch(record.get("timestamp"))})
    return sorted(found, key=lambda p: p["at"] or 0.0)


def resume_gaps(sampler: StateSampler, passes: list[dict[str, Any]]) -> list[float]:
    """For each event (``deferred`` → ``scheduled``), seconds until the next pass started on a worker."""
    gaps = []
    previous = None
    for at, *_rest, state, _host in sampler.changes:
        if previous == "deferred" and state != "deferred":
            starts = [p["at"] for p in passes if p["at"] and p["at"] >= at - 0.2]
            if starts:
                gaps.append(round(min(starts) - at, 2))
        previous = state
    return gaps


def run_one(kind: str, n: int, latency: float, jitter: float, linger: float | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-dist-{kind}-"))
    s3 = S3Server()
    s3.start()
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    import pandas as pd

    table = pd.DataFrame(
        {
            "prompt_id": [f"p{i:05d}" for i in range(n)],
            "prompt": [prompt_for(i) for i in range(n)],
            "size": "1:1",
        }
    )
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    client.put_object(Bucket=BUCKET, Key="prompts.parquet", Body=buffer.getvalue())
    conn = {"conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": s3.url}}
    env = {f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(conn)}
    if linger is not None:  # read by the DAG file on every host (the operator's default is 5 s)
        env["IMAGEN_BENCH_LINGER"] = str(linger)
    key = f"rk_live_{secrets.token_hex(8)}"
    stack: Stack
    if kind == "celery":
        stack = DistributedStack(root, key, env, dag_files=[DAG_FILE])
        dsn = ""
    else:
        dags = root / "dags"
        dags.mkdir()
        (dags / DAG_FILE.name).symlink_to(DAG_FILE)
        (root / "airflow").mkdir()
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
        stack = Stack(root / "airflow", key, env)
        stack._dags_ready = lambda: bool(  # type: ignore[method-assign]
            stack.sql("SELECT 1 FROM dag WHERE dag_id = ? AND NOT is_paused AND NOT is_stale", DAG_ID)
        )
        dsn = f"sqlite:{stack.db_path}"
    result: dict[str, Any] = {
        "kind": kind,
        "n": n,
        "linger": linger,
        "latency": [latency, jitter],
        "bound_s": n / 100 * latency,
    }
    try:
        booted = time.monotonic()
        stack.start()
        result["boot_s"] = round(time.monotonic() - booted, 1)
        stack.emulator.reset(latency_mean=latency, latency_jitter=jitter, seed=1)
        if kind == "celery":
            dsn = stack.postgres.dsn  # type: ignore[attr-defined]
        with StateSampler(dsn, [DAG_ID]) as sampler:
            run_id = stack.trigger(
                DAG_ID,
                prompt_table=f"s3://{CONN_ID}@{BUCKET}/prompts.parquet",
                output_uri=f"s3://{CONN_ID}@{BUCKET}/out",
            )
            state = stack.wait_run(DAG_ID, run_id, timeout=1200)
        (run,) = stack.sql("SELECT start_date, end_date FROM dag_run WHERE run_id = ?", run_id)
        wall = (_as_dt(run["end_date"]) - _as_dt(run["start_date"])).total_seconds()
        ledger = stack.emulator.ledger()
        if kind == "celery":
            hosts = ("worker-1", "worker-2")
            folders = {h: stack.log_folder(h, DAG_ID, run_id, "generate") for h in hosts}  # type: ignore[attr-defined]
        else:
            folders = {
                "local": stack.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=generate"
            }
        passes = passes_from_logs(folders)
        gaps = resume_gaps(sampler, passes)
        completed = ledger["status_counts"]["completed"]
        result.update(
            state=state,
            wall_s=round(wall, 1),
            wall_over_bound=round(wall / result["bound_s"], 2),
            passes=len(passes),
            pass_hosts=[p["host"] for p in passes],
            resume_gaps_s=gaps,
            resume_gap_mean_s=round(statistics.mean(gaps), 2) if gaps else None,
            resume_gap_max_s=max(gaps) if gaps else None,
            polls=ledger["polls"],
            completed=completed,
            polls_per_image=round(ledger["polls"] / max(completed, 1), 2),
            posts=ledger["posts"],
        )
    finally:
        stack.stop()
        result["leftovers"] = [f"{p.pid} {p.name()}" for p in stack.leftovers()]
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


def _as_dt(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("celery", "local"), action="append")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency-mean", type=float, default=10.0)
    parser.add_argument("--latency-jitter", type=float, default=2.0)
    parser.add_argument("--linger", type=float, help="the batch operator's linger (0: defer at every wait)")
    args = parser.parse_args(argv)
    results = []
    for kind in args.only or ("celery", "local"):
        result = run_one(kind, args.n, args.latency_mean, args.latency_jitter, args.linger)
        print(json.dumps(result), flush=True)
        results.append(result)
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{time.strftime('%Y%m%d-%H%M%S')}-distributed.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("state") == "success" and not r["leftovers"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
