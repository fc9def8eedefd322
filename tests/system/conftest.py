"""Fixtures of the system tests: one real Airflow stack (+ emulator + S3 server) for the whole session.

Starting the stack costs 20-45 s on this machine (a migrated SQLite DB, four Airflow processes healthy,
the DAGs parsed), so it is started once, in a background thread as soon as collection shows a test that
needs it (the rest of ``make test`` runs meanwhile), and shared: every test resets the emulator and uses
its own output folders and a fresh DAG run. A test that kills a component starts it again; the
``stack`` fixture restarts anything a failed test left dead. At the end every process is stopped by pid
and the sessions we created are swept; :func:`test_nothing_left_running` style checks use
``Stack.leftovers()``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system.stack import Stack, free_port

#: A key shaped like a live one, unique per session: any hit when grepping artefacts is a leak.
API_KEY = f"rk_live_{secrets.token_hex(16)}"
#: The bucket and connection the S3 tests use (the moto server runs in this process; see S3Server).
S3_BUCKET = "imagen-system"
S3_CONN_ID = "imagen_system_s3"

_durations: dict[str, float] = {}
_state: dict[str, Any] = {}
_lock = threading.Lock()


class S3Server:
    """A moto S3 server in this process on a fixed port, so it can be stopped and started again.

    Its data lives in moto's in-process backend, not in the server thread: a restart keeps every object,
    exactly like an S3 endpoint that was unreachable for a while.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="k",
            aws_secret_access_key="s",
            region_name="us-east-1",
        )


def _connection_env(s3: S3Server) -> dict[str, str]:
    import json

    conn = {"conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": s3.url}}
    return {f"AIRFLOW_CONN_{S3_CONN_ID.upper()}": json.dumps(conn)}


def _boot() -> None:
    """Start S3, then the stack; record the outcome for the fixture (runs in a thread)."""
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="imagen-system-"))
    s3 = S3Server()
    stack = Stack(home / "airflow", API_KEY, extra_env=_connection_env(s3))
    (home / "airflow").mkdir()
    with _lock:
        _state.update(home=home, s3=s3, stack=stack)
    try:
        s3.start()
        s3.client().create_bucket(Bucket=S3_BUCKET)
        stack.start()
    except BaseException as exc:  # reported by the fixture, in the test that needs the stack
        _state["error"] = exc
    _state["boot_s"] = time.monotonic() - started


def _ensure_booting() -> threading.Thread:
    with _lock:
        thread = _state.get("thread")
        if thread is None:
            thread = threading.Thread(target=_boot, name="system-stack-boot", daemon=True)
            _state["thread"] = thread
            thread.start()
            atexit.register(_shutdown)
        return thread


def _shutdown() -> None:
    """Stop everything we started; safe to call twice (session end, fixture finalizer, atexit)."""
    with _lock:
        stack: Stack | None = _state.pop("stack", None)
        s3: S3Server | None = _state.pop("s3", None)
        home: Path | None = _state.get("home")
    thread = _state.get("thread")
    if thread is not None:
        thread.join(timeout=300)
    if stack is not None:
        stack.stop()
        left = stack.leftovers()
        _state["leftovers"] = [f"{p.pid} {p.name()}" for p in left]
    if s3 is not None:
        s3.stop()
    if home is not None and not _state.get("keep_home"):
        shutil.rmtree(home, ignore_errors=True)


#: The test that stops the stack and proves nothing is left: it must run after every test that uses it.
LAST_TEST = "test_the_stack_stops_and_leaves_no_process_behind"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    """Run the stack's own shutdown test last, whatever file names sort after its own."""
    items.sort(key=lambda item: item.name == LAST_TEST)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the stack in the background as soon as the session is known to need it."""
    _state["load_at_start"] = os.getloadavg()
    if any("system_stack" in getattr(item, "fixturenames", ()) for item in session.items):
        _ensure_booting()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _shutdown()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _durations:
        return
    write = terminalreporter.write_line
    terminalreporter.section("system tests: runtime")
    for name, seconds in sorted(_durations.items(), key=lambda kv: -kv[1]):
        write(f"{seconds:7.1f} s  {name}")
    if "boot_s" in _state:
        write(f"{_state['boot_s']:7.1f} s  (stack start: emulator, S3, airflow db migrate, 4 components)")
    write(f"{sum(_durations.values()):7.1f} s  total of the system tests (stack start overlaps other tests)")
    start, end = (
        "/".join(f"{x:.1f}" for x in load) for load in (_state.get("load_at_start", ()), os.getloadavg())
    )
    write(f"load average (1/5/15 min) at start {start}, at end {end}; {os.cpu_count()} CPUs")
    if _state.get("keep_home") and _state.get("home"):
        write(f"a system test failed: its AIRFLOW_HOME, logs and outputs are kept in {_state['home']}")
    if _state.get("leftovers"):
        write(f"LEFT RUNNING after stop: {_state['leftovers']}")
    else:
        write("processes left running after the stack stopped: none")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Time every system test (setup + call + teardown); keep the session's folder if one failed."""
    if "tests/system/" not in report.nodeid:
        return
    name = report.nodeid.split("tests/system/", 1)[1]
    _durations[name] = _durations.get(name, 0.0) + report.duration
    if report.failed:
        _state["keep_home"] = True


@pytest.fixture(scope="session")
def system_stack() -> Iterator[Stack]:
    """The shared stack (started by :func:`pytest_collection_finish`, or here when run alone)."""
    thread = _ensure_booting()
    thread.join(timeout=400)
    if "error" in _state:
        stack = _state.get("stack")
        detail = ""
        if stack is not None:
            from tests.system.stack import tail

            detail = "\n".join(f"--- {c.name}\n{tail(c.log, 15)}" for c in stack.components.values())
        pytest.fail(f"the system stack did not start: {_state['error']!r}\n{detail}")
    yield _state["stack"]
    _shutdown()


@pytest.fixture(scope="session")
def s3_server(system_stack: Stack) -> S3Server:
    return _state["s3"]


@pytest.fixture
def stack(system_stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The shared stack with every component alive and the emulator at its base knobs, ledger empty."""
    revived = [c.name for c in system_stack.components.values() if not c.alive()]
    for name in revived:
        system_stack.components[name].start()
    if revived:
        system_stack.wait_healthy()
    s3 = _state.get("s3")
    if s3 is not None and not s3.running:
        s3.start()
    system_stack.emulator.reset()
    yield system_stack
    with contextlib.suppress(Exception):
        aborted = system_stack.abort_unfinished_runs()
        if aborted:
            print(f"\naborted unfinished DAG runs: {aborted}")
    with contextlib.suppress(Exception):
        system_stack.emulator.reset()


@pytest.fixture
def workdir(system_stack: Stack, request: pytest.FixtureRequest) -> Path:
    """A folder for one test's tables and outputs, inside the session's folder (kept until its end)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "_")[:60]
    path = _state["home"] / "tests" / name
    path.mkdir(parents=True)
    return path
