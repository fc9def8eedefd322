"""Fixtures of the distributed tests: one distributed Airflow (see ``stack.py``) and one S3 server for the
whole session, started here and stopped by pid at the end.

Nothing is skipped: a machine that cannot install PostgreSQL, Redis or the Celery provider fails the
suite with the reason (``make test-distributed`` installs the ``distributed`` extra; the stack installs
Debian's ``postgresql`` and ``redis-server`` with apt-get when they are missing).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.stack import WORKERS, DistributedStack
from tests.system.conftest import S3Server
from tests.system.stack import tail

API_KEY = f"rk_live_{secrets.token_hex(16)}"
S3_BUCKET = "imagen-distributed"
S3_CONN_ID = "imagen_dist_s3"

_state: dict[str, Any] = {}


def s3_uri(key: str) -> str:
    """An ``s3://`` URI of the session's bucket, through the Airflow connection every host has."""
    return f"s3://{S3_CONN_ID}@{S3_BUCKET}/{key}"


def _check_installed() -> None:
    missing = []
    for module in ("airflow.providers.celery", "redis", "psycopg2", "asyncpg"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        pytest.fail(
            f"the distributed tests need {', '.join(missing)}: run them with `make test-distributed` "
            "(it installs the `distributed` extra)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    server.client().create_bucket(Bucket=S3_BUCKET)
    _state["s3"] = server
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dist_stack(s3_server: S3Server) -> Iterator[DistributedStack]:
    _check_installed()
    root = Path(tempfile.mkdtemp(prefix="imagen-distributed-"))
    _state["root"] = root
    conn = {"conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": s3_server.url}}
    stack = DistributedStack(root, API_KEY, {f"AIRFLOW_CONN_{S3_CONN_ID.upper()}": json.dumps(conn)})
    _state["stack"] = stack
    started = time.monotonic()
    try:
        stack.start()
    except BaseException as exc:
        detail = "\n".join(f"--- {c.name}\n{tail(c.log, 15)}" for c in stack.components.values())
        _stop()
        pytest.fail(f"the distributed stack did not start: {exc!r}\n{detail}", pytrace=False)
    _state["boot_s"] = time.monotonic() - started
    yield stack
    _stop()


def _stop() -> None:
    stack: DistributedStack | None = _state.pop("stack", None)
    if stack is None:
        return
    stack.stop()
    _state["leftovers"] = [f"{p.pid} {p.name()}" for p in stack.leftovers()]
    root = _state.get("root")
    if root is not None and not _state.get("keep") and not os.environ.get("IMAGEN_DIST_KEEP"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stack(dist_stack: DistributedStack) -> Iterator[DistributedStack]:
    """The shared stack with every component alive, the emulator at its base knobs and ledger empty."""
    for name, comp in dist_stack.components.items():
        if not comp.alive():
            dist_stack.restart(name)
    dist_stack.expected_dead.clear()
    if not dist_stack.redis.alive():
        dist_stack.redis.start()
    dist_stack.emulator.reset()
    yield dist_stack
    dist_stack.expected_dead.clear()
    with contextlib.suppress(Exception):
        aborted = dist_stack.abort_unfinished_runs(timeout=120)
        if aborted:
            print(f"\naborted unfinished DAG runs: {aborted}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/distributed/" in report.nodeid and report.failed:
        _state["keep"] = True


def pytest_sessionfinish(session: pytest.Session) -> None:
    _stop()
    if _state.get("leftovers"):
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "root" not in _state:
        return
    write = terminalreporter.write_line
    terminalreporter.section("distributed stack")
    if "boot_s" in _state:
        write(f"stack start: {_state['boot_s']:.1f} s (PostgreSQL, Redis, emulator, migrate, 7 components)")
    write(f"load average (1/5/15 min) at end: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    if _state.get("keep"):
        write(f"a test failed: every host's AIRFLOW_HOME and logs are kept in {_state['root']}")
    if _state.get("leftovers"):
        write(f"LEFT RUNNING after stop (this fails the session): {_state['leftovers']}")
    else:
        write("processes left running after the stack stopped: none")


__all__ = ["S3_BUCKET", "S3_CONN_ID", "WORKERS", "s3_uri"]
