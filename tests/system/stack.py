"""A real Airflow for the system tests: api-server, scheduler, dag-processor and triggerer as separate
processes (so a test can SIGKILL one and start it again), plus the reAPI emulator as a process.

Why not ``airflow standalone``: it supervises its components together, so killing "the triggerer"
would be killing a child it restarts or an orphan it forgets. Here every component is started by us, in
its own session (``start_new_session``), with its output in ``AIRFLOW_HOME/<component>.log``; it is
stopped by pid, and every process that ever lived in one of our sessions is swept at the end, so a test
that fails half-way leaves nothing running (``Stack.leftovers()`` proves it).

The settings: LocalExecutor, SQLite, ``[core] parallelism`` 4, a fresh
``AIRFLOW_HOME``, plus short health thresholds so a killed component is noticed in seconds, not minutes.
Nothing here imports Airflow: the tests see Airflow through processes, HTTP and SQL, as users do.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
DAGS = Path(__file__).resolve().parent / "dags"
BIN = Path(sys.executable).parent
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")

# A process started in the background inherits SIGINT = ignored; restore it, then exec (same pid).
_RESTORE_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


class StackError(RuntimeError):
    """The stack could not be started or observed (not: a DAG run failed)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Call ``check`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Component:
    """One long-running process we started, in its own session, logging to ``log``."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Session ids of every incarnation: what :meth:`Stack.sweep` looks for at the end.
    sessions: list[int] = field(default_factory=list)

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RESTORE_SIGINT, *self.argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.sessions.append(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> list[int]:
        """SIGKILL the component and every process under it (a machine losing it), by pid."""
        assert self.proc is not None
        victims = [psutil.Process(self.pid)]
        with contextlib.suppress(psutil.Error):
            victims += victims[0].children(recursive=True)
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=10)
        self.proc.wait(timeout=10)
        return [p.pid for p in victims]

    def stop(self, grace: float = 15.0) -> None:
        """Stop it gently (SIGTERM), then by force; its session is swept by the stack."""
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()


class Emulator(Component):
    """The reAPI emulator CLI as a process; controlled over its ``/_emulator`` routes."""

    base_url: str = ""

    def start(self) -> None:
        super().start()

        def announced() -> str | None:
            if not self.alive():
                raise StackError(f"emulator exited:\n{tail(self.log)}")
            text = self.log.read_text(errors="replace").rsplit("===== start", 1)[-1]
            for word in text.split():
                if word.startswith("http://") and word.count(":") == 2:
                    return word
            return None

        self.base_url = wait_until(announced, 30, "the emulator to listen")

    def get(self, path: str) -> Any:
        reply = httpx.get(self.base_url + path, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        reply = httpx.post(self.base_url + path, json=body, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def ledger(self) -> dict[str, Any]:
        return self.get("/_emulator/ledger")

    def tasks(self) -> list[dict[str, Any]]:
        return self.get("/_emulator/tasks")

    def configure(self, **fields: Any) -> dict[str, Any]:
        return self.post("/_emulator/config", fields)

    def reset(self, **fields: Any) -> None:
        """Back to the base knobs (plus ``fields``), with an empty ledger and fresh balances."""
        self.configure(**{**BASE_EMULATOR, **fields})
        self.post("/_emulator/reset", {})


#: The emulator's knobs every test starts from: ~0.5 s renders, Imagen 4's pixel sizes, no faults.
BASE_EMULATOR: dict[str, Any] = {
    "latency_mean": 0.5,
    "latency_jitter": 0.2,
    "image_scale": 1.0,
    "image_ttl": 86400.0,
    "starting_balance": 1_000_000,
    "moderation_rate": 0.0,
    "failure_rate": 0.0,
    "ambiguous_submit_rate": 0.0,
    "error_rate_5xx": 0.0,
    "response_delay": 0.0,
    "submit_answer_delay": 0.0,
    "late_submit_delay": 20.0,
    "rate_limit_rps": None,
    "rate_limit_burst": None,
    "slow_factor": 10.0,
}


class Stack:
    """api-server, scheduler, dag-processor and triggerer on one fresh ``AIRFLOW_HOME``, plus the emulator.

    :param home: an empty folder to become ``AIRFLOW_HOME``.
    :param api_key: the key the emulator accepts and the ``imagen_default`` connection carries.
    :param extra_env: more environment for every Airflow process (e.g. an S3 connection).
    """

    def __init__(self, home: Path, api_key: str, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.api_key = api_key
        self.db_path = home / "airflow.db"
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.extra_env = dict(extra_env or {})
        self.emulator = Emulator(
            "emulator",
            [
                sys.executable,
                "-m",
                "airflow_provider_imagen.emulator",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--fast",
                "--api-key",
                api_key,
            ],
            # Outside AIRFLOW_HOME: the emulator prints its key, and AIRFLOW_HOME is grepped for it.
            home.parent / "emulator.log",
            self._base_env(),
            REPO,
        )
        self.components: dict[str, Component] = {}
        self.env: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "VIRTUAL_ENV"}
        env.update(PATH=f"{BIN}:{env.get('PATH', '')}", NO_COLOR="1", PYTHONDONTWRITEBYTECODE="1")
        return env

    def airflow_env(self) -> dict[str, str]:
        base = self.api_url
        env = self._base_env()
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM="4",
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{base}/execution/",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{self.db_path}",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(self.api_port),
            AIRFLOW__API__BASE_URL=base,
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
            # A killed component is noticed in seconds (defaults: 30 s, 300 s, 300 s). Not lowered:
            # [scheduler] scheduler_health_check_threshold (30 s). At 10 s, a scheduler whose loop stalls
            # on this busy 2-core machine marks its own job failed and resets its own running tasks.
            AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD="10",
            AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="5",
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="2",
            # A worker's supervisor notices a task process's exit within 1 s instead of 5 s, so the
            # Imagen operators' deferrals are held 3 s instead of 7 s (see min_deferral_seconds).
            AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL="1",
            AIRFLOW_CONN_IMAGEN_DEFAULT=json.dumps(
                {"conn_type": "imagen", "host": self.emulator.base_url, "password": self.api_key}
            ),
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 240.0) -> None:
        self.emulator.start()
        self.emulator.reset()
        self.env = self.airflow_env()
        migrate = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        (self.home / "migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{tail(self.home / 'migrate.log')}")
        for name in COMPONENTS:
            self.components[name] = Component(
                name, [str(BIN / "airflow"), name], self.home / f"{name}.log", self.env, self.home
            )
            self.components[name].start()
        self.wait_healthy(timeout)
        wait_until(self._dags_ready, timeout, "the system DAGs to be parsed", interval=1.0)

    def stop(self, grace: float = 15.0) -> None:
        """Stop every component and the emulator (SIGTERM to all at once, SIGKILL after ``grace``), then
        sweep our sessions: nothing may survive."""
        running = [c for c in [*self.components.values(), self.emulator] if c.alive()]
        for comp in running:
            with contextlib.suppress(ProcessLookupError):
                comp.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        for comp in running:
            try:
                comp.proc.wait(timeout=max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                with contextlib.suppress(Exception):
                    comp.kill()
        self.sweep()

    def all_sessions(self) -> list[int]:
        return [sid for comp in [*self.components.values(), self.emulator] for sid in comp.sessions]

    def leftovers(self) -> list[psutil.Process]:
        """Every live process in a session we created (should be none after :meth:`stop`)."""
        sessions = set(self.all_sessions())
        found = []
        for proc in psutil.process_iter():
            try:
                if (
                    proc.pid != os.getpid()
                    and os.getsid(proc.pid) in sessions
                    and proc.status() != psutil.STATUS_ZOMBIE
                ):
                    found.append(proc)
            except (OSError, psutil.Error):
                continue
        return found

    def sweep(self) -> None:
        left = self.leftovers()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(left, timeout=10)

    # -- health ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        try:
            return httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_healthy(self, timeout: float = 120.0, parts: Iterable[str] | None = None) -> None:
        wanted = tuple(parts or ("metadatabase", "scheduler", "triggerer", "dag_processor"))

        def healthy() -> bool:
            for comp in self.components.values():
                if not comp.alive():
                    raise StackError(f"{comp.name} exited ({comp.proc.returncode}):\n{tail(comp.log)}")  # type: ignore[union-attr]
            body = self.health()
            return all((body.get(p) or {}).get("status") == "healthy" for p in wanted)

        wait_until(healthy, timeout, f"{', '.join(wanted)} to be healthy", interval=1.0)

    def _dags_ready(self) -> bool:
        errors = self.sql("SELECT filename, stacktrace FROM import_error")
        if errors:
            raise StackError(f"DAG import errors: {errors}")
        rows = self.sql(
            "SELECT COUNT(*) AS n FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
            "WHERE d.dag_id LIKE 'imagen_sys_%' AND NOT d.is_paused AND NOT d.is_stale"
        )
        return bool(rows) and rows[0]["n"] >= 6

    # -- the metadata DB ---------------------------------------------------------------------------

    def sql(self, query: str, *params: Any) -> list[dict[str, Any]]:
        """One read-only query on the metadata DB (SQLite; a short busy timeout)."""
        if not self.db_path.exists():
            return []
        for attempt in range(20):
            try:
                with contextlib.closing(
                    sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
                ) as conn:
                    conn.row_factory = sqlite3.Row
                    return [dict(row) for row in conn.execute(query, params)]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                if attempt == 19:
                    raise
                time.sleep(0.2)
        return []

    # -- DAG runs ----------------------------------------------------------------------------------

    def trigger(self, dag_id: str, **conf: Any) -> str:
        reply = httpx.post(
            f"{self.api_url}/api/v2/dags/{dag_id}/dagRuns",
            json={"logical_date": None, "conf": conf},
            timeout=60,
        )
        if reply.status_code >= 300:
            raise StackError(f"trigger of {dag_id} failed: HTTP {reply.status_code} {reply.text[:500]}")
        return str(reply.json()["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.sql("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return str(rows[0]["state"]) if rows else None

    def ti(self, dag_id: str, run_id: str, task_id: str = "generate") -> dict[str, Any]:
        rows = self.sql(
            "SELECT id, state, try_number, pid, hostname, next_method FROM task_instance "
            "WHERE dag_id = ? AND run_id = ? AND task_id = ?",
            dag_id,
            run_id,
            task_id,
        )
        return rows[0] if rows else {}

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 120.0) -> str:
        """Wait for the run to end; return ``success`` or ``failed``."""

        def ended() -> str | None:
            for comp in self.components.values():
                if not comp.alive():
                    raise StackError(f"{comp.name} died during the run:\n{tail(comp.log)}")
            state = self.run_state(dag_id, run_id)
            return state if state in ("success", "failed") else None

        return str(wait_until(ended, timeout, f"{dag_id} {run_id} to end", interval=0.5))

    def wait_ti(
        self, dag_id: str, run_id: str, states: Iterable[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        wanted = set(states)
        return wait_until(
            lambda: (ti := self.ti(dag_id, run_id)) and ti.get("state") in wanted and ti,
            timeout,
            f"{dag_id} {run_id} generate to be {'/'.join(sorted(wanted))}",
            interval=0.1,
        )

    def task_process(self, ti_id: str) -> psutil.Process | None:
        """The process running a task instance: the task runner titles itself ``airflow worker -- <id>``
        (the id as a dashed UUID; SQLite stores it as 32 hex digits)."""
        title = f"airflow worker -- {uuid.UUID(ti_id)}"
        for proc in psutil.process_iter(["cmdline"]):
            if title in " ".join(proc.info.get("cmdline") or ()):
                return proc
        return None

    def abort_unfinished_runs(self, timeout: float = 60.0) -> list[str]:
        """Fail every DAG run still going (a test that failed half-way leaves one), so it cannot spend
        on the next test's ledger; wait until none of its tasks runs or waits any more."""
        runs = self.sql("SELECT dag_id, run_id FROM dag_run WHERE state IN ('running', 'queued')")
        for run in runs:
            httpx.patch(
                f"{self.api_url}/api/v2/dags/{run['dag_id']}/dagRuns/{quote(run['run_id'], safe='')}",
                json={"state": "failed"},
                timeout=30,
            )
        busy = "('running', 'deferred', 'queued', 'scheduled', 'up_for_retry', 'restarting')"
        wait_until(
            lambda: not self.sql(f"SELECT 1 FROM task_instance WHERE state IN {busy}"),
            timeout,
            "aborted runs to stop",
            interval=0.5,
        )
        return [f"{r['dag_id']}/{r['run_id']}" for r in runs]

    def xcom_return(self, dag_id: str, run_id: str) -> Any:
        rows = self.sql(
            "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'generate' "
            "AND key = 'return_value'",
            dag_id,
            run_id,
        )
        if not rows:
            return None
        value = rows[0]["value"]
        return json.loads(value) if isinstance(value, (str, bytes)) else value

    def task_logs(self, dag_id: str, run_id: str) -> str:
        """Every log file of the run's task (all tries, trigger logs included), concatenated."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*")) if p.is_file())
