"""Helpers of the distributed tests: tables and manifests on S3, the bill, and a sampler of task states."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import time
from typing import Any

import pandas as pd

from tests.distributed.conftest import S3_BUCKET
from tests.system.checks import s3_objects


def put_table(client: Any, key: str, rows: list[dict[str, Any]]) -> None:
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    client.put_object(Bucket=S3_BUCKET, Key=key, Body=buffer.getvalue())


def read_parquets(client: Any, prefix: str, suffix: str = ".parquet") -> dict[str, pd.DataFrame]:
    """key → table of every Parquet object under ``prefix`` whose key ends with ``suffix``."""
    found = {}
    for key in sorted(s3_objects(client, S3_BUCKET, prefix)):
        if key.endswith(suffix):
            body = client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
            found[key] = pd.read_parquet(io.BytesIO(body))
    return found


def images_on_s3(client: Any, manifest: pd.DataFrame) -> int:
    """Assert every completed row's image is on S3 with the row's sha256; return how many."""
    completed = manifest[manifest["status"] == "completed"]
    for row in completed.itertuples():
        assert isinstance(row.image_uri, str) and f"{S3_BUCKET}/" in row.image_uri, row
        key = row.image_uri.split(f"{S3_BUCKET}/", 1)[1]
        body = client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == row.sha256, f"{row.image_uri} is not {row.sha256}"
    return len(completed)


def report(name: str, **figures: Any) -> None:
    print(f"\n[distributed] {name}: {json.dumps(figures, sort_keys=True, default=str)}")


class StateSampler:
    """Every ``interval`` seconds, the state of the task instances of some DAGs; keeps the changes.

    Its own connection to PostgreSQL (the tests' one is not shared between threads), or reads of a SQLite
    file (``dsn="sqlite:<path>"``). ``changes`` holds
    ``(epoch seconds, dag_id, run_id, task_id, try_number, state, hostname)`` whenever one of the last
    four changed for a task instance.
    """

    def __init__(self, dsn: str, dag_ids: list[str], interval: float = 0.1) -> None:
        self.dsn = dsn
        self.dag_ids = dag_ids
        self.interval = interval
        self.changes: list[tuple[float, str, str, str, int, str | None, str | None]] = []
        #: The most backfill runs of these DAGs seen running at once.
        self.max_running_runs = 0
        self._last: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-sampler", daemon=True)

    def __enter__(self) -> StateSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _query(self) -> tuple[list[tuple[Any, ...]], int]:
        """The task instances and the number of running backfill runs (PostgreSQL, or SQLite when the
        DSN is ``sqlite:<path>``)."""
        tis = (
            "SELECT dag_id, run_id, task_id, try_number, state, hostname FROM task_instance "
            f"WHERE dag_id IN ({', '.join(['?'] * len(self.dag_ids))})"
        )
        runs = (
            "SELECT COUNT(*) FROM dag_run WHERE state = 'running' AND run_type = 'backfill' "
            f"AND dag_id IN ({', '.join(['?'] * len(self.dag_ids))})"
        )
        if self.dsn.startswith("sqlite:"):
            import sqlite3

            path = self.dsn.removeprefix("sqlite:")
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
                return conn.execute(tis, self.dag_ids).fetchall(), conn.execute(
                    runs, self.dag_ids
                ).fetchone()[0]
        import psycopg2

        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.dsn, connect_timeout=5)
            self._conn.set_session(readonly=True, autocommit=True)
        with self._conn.cursor() as cur:
            cur.execute(tis.replace("?", "%s"), self.dag_ids)
            rows = cur.fetchall()
            cur.execute(runs.replace("?", "%s"), self.dag_ids)
            return rows, cur.fetchone()[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rows, running = self._query()
            except Exception:  # a busy or restarting database: sample again
                self._conn = None
                self._stop.wait(self.interval)
                continue
            now = time.time()
            self.max_running_runs = max(self.max_running_runs, running)
            for dag_id, run_id, task_id, try_number, state, hostname in rows:
                key = (dag_id, run_id, task_id)
                value = (try_number, state, hostname)
                if self._last.get(key) != value:
                    self._last[key] = value
                    self.changes.append((now, dag_id, run_id, task_id, try_number, state, hostname))
            self._stop.wait(self.interval)
        if self._conn is not None:
            self._conn.close()

    def first(self, state: str, task_id: str = "generate", after: float = 0.0) -> float | None:
        """When a task instance of ``task_id`` was first seen in ``state`` after ``after``."""
        for at, _dag, _run, task, _try, seen, _host in self.changes:
            if task == task_id and seen == state and at >= after:
                return at
        return None

    def states(self, run_id: str, task_id: str = "generate") -> list[tuple[Any, ...]]:
        """``(epoch seconds, try_number, state, hostname)`` of every change of one task instance."""
        return [
            (at, tn, st, host)
            for at, _d, run, task, tn, st, host in self.changes
            if run == run_id and task == task_id
        ]
