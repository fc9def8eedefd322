"""Run one benchmark scenario on a real Airflow (``airflow standalone``) against the reAPI emulator.

Why this exists: the figures must be reproducible by anyone, side by side with what users build
without us, on a real scheduler and triggerer (``dag.test()`` runs triggers in-process and would hide
exactly the overhead we claim to keep out of the way). One scenario = one fresh world:

1. a fresh ``AIRFLOW_HOME`` under /tmp (SQLite by default, or a throw-away PostgreSQL), LocalExecutor,
   DAGS_FOLDER = ``benchmarks/dags``, small-machine settings (parallelism, fast DAG refresh, DAGs unpaused at
   creation), every port a free loopback one;
2. ``airflow db migrate``; the emulator as a subprocess on a free port; ``airflow standalone`` in its own
   session with SIGINT restored (a standalone started in the background ignores SIGINT otherwise, and
   ``kill -TERM`` orphans its children); wait until ``/api/v2/monitor/health`` is all healthy and the DAG
   is parsed;
3. one DAG run triggered through the REST API with conf ``{n, max_in_flight, output_dir, ...}``, waited
   for (bounded), while a sampler thread records the process table (psutil, every 0.5 s) and the task
   instance states of the run (from the metadata DB);
4. figures from the metadata DB, the emulator's ledger and per-task timings, the files on disk and the
   sampler; everything stopped by pid (and anything left in the session we created, by pid);
5. one JSON file in ``benchmarks/results/`` and one table row.

Nothing here imports Airflow: the harness talks to it through processes, HTTP and SQL, so it measures
the same thing a user's deployment would do.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
DAGS_DIR = BENCH_DIR / "dags"
RESULTS_DIR = BENCH_DIR / "results"
EMULATOR_KEY = "rk_emulator_key"
MB = 1024 * 1024

# A background ``airflow standalone`` inherits SIGINT = ignored and then never shuts down on Ctrl-C; this
# tiny wrapper restores the default handler and execs the real command in place (same pid).
_RESTORE_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)
_COMPONENTS = ("scheduler", "dag-processor", "api-server", "triggerer")
#: Below the scheduler, by process title: LocalExecutor workers (each supervises one task at a time)
#: and the task processes they fork (the operator's code runs there).
_WORKER_TITLE = "airflow worker -- LocalExecutor"
_TASK_TITLE = "airflow worker -- "


# ------------------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    """One row of the suite: which DAG, with what conf, under which settings.

    ``conf`` is merged over the standard run conf (``n``, ``max_in_flight``, ``output_dir``,
    ``prompt_table``, ``size``, ``poll_interval``). ``airflow_config`` adds ``AIRFLOW__…`` variables
    (e.g. ``{"AIRFLOW__CORE__MAX_MAP_LENGTH": "2048"}``). ``expect`` is the DAG-run state that counts as
    the expected outcome (``"failed"`` for the stock DAG beyond ``max_map_length``).
    """

    name: str
    dag_id: str
    n: int
    max_in_flight: int | None = None
    parallelism: int = 32
    latency_mean: float = 10.0
    latency_jitter: float = 2.0
    timeout_s: float = 900.0
    expect: str = "success"
    conf: Mapping[str, Any] = field(default_factory=dict)
    airflow_config: Mapping[str, str] = field(default_factory=dict)
    emulator_args: tuple[str, ...] = ()
    note: str = ""
    #: DAG runs triggered together (a backfill's runs), N prompts each, each with its own output folder.
    runs: int = 1
    #: The emulator's account-wide cap on renders at once (``--max-concurrent-renders``; 429 beyond it).
    account_cap: int | None = None

    @property
    def total_n(self) -> int:
        """Prompts over all the runs of the scenario."""
        return self.n * self.runs

    @property
    def ideal_s(self) -> float | None:
        """The render-bound lower limit: N over the concurrency allowed × mean latency, when it applies.

        The concurrency is the runs' windows together, or the account's cap when that is smaller.
        """
        if not self.max_in_flight:
            return None
        concurrency = self.max_in_flight * self.runs
        if self.account_cap:
            concurrency = min(concurrency, self.account_cap)
        return self.total_n / concurrency * self.latency_mean


@dataclass(frozen=True)
class Options:
    """Session-wide knobs (the same for every scenario of one suite run)."""

    postgres: bool = False
    keep_home: bool = False
    sample_interval: float = 0.5
    image_scale: float = 1.0
    seed: int | None = 1
    startup_timeout: float = 240.0
    results_dir: Path = RESULTS_DIR
    tag: str = ""


class BenchmarkError(RuntimeError):
    """The harness could not set up or observe a scenario (not: the DAG run failed)."""


# ------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prompt_for(index: int) -> str:
    """The deterministic prompt number ``index``; the baseline DAGs generate the very same ones."""
    return f"Benchmark image {index:05d}: a ceramic teapot on a linen tablecloth, soft morning light"


def write_prompt_table(folder: Path, n: int, size: str) -> Path:
    """Write the N prompts as a Parquet prompt table (``prompt_id``, ``prompt``, ``size``) for our DAG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.parquet"
    table = pa.table(
        {
            "prompt_id": [f"p{i:05d}" for i in range(n)],
            "prompt": [prompt_for(i) for i in range(n)],
            "size": [size] * n,
        }
    )
    pq.write_table(table, path)
    return path


def to_epoch(value: Any) -> float | None:
    """A metadata-DB timestamp (datetime, or SQLite's text form, UTC) as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return float(value.timestamp())


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, nearest-rank on sorted values), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(check: Callable[[], Any], timeout: float, interval: float, what: str) -> Any:
    """Call ``check`` until it returns something truthy; bounded by ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchmarkError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _proc_key(proc: psutil.Process) -> tuple[int, float] | None:
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def stop_process_tree(
    root: subprocess.Popen[bytes], first_signal: int, grace: float, extra: Iterable[psutil.Process] = ()
) -> dict[str, Any]:
    """Stop ``root`` with ``first_signal``, then every descendant (and ``extra``) still alive, by pid.

    Descendants are snapshotted before signalling, so children orphaned by the root's exit are still
    found; the session ``root`` leads (it was started with ``start_new_session``) is swept last.
    """
    report: dict[str, Any] = {"pid": root.pid, "signal": signal.Signals(first_signal).name}
    known: dict[tuple[int, float], psutil.Process] = {}
    for proc in [*_descendants(root.pid), *extra]:
        key = _proc_key(proc)
        if key:
            known[key] = proc
    started = time.monotonic()
    if root.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            root.send_signal(first_signal)
        try:
            root.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            report["root_escalated"] = "SIGTERM"
            root.terminate()
            try:
                root.wait(timeout=10)
            except subprocess.TimeoutExpired:
                report["root_escalated"] = "SIGKILL"
                root.kill()
                root.wait(timeout=10)
    report["root_exit_s"] = round(time.monotonic() - started, 1)
    report["root_returncode"] = root.returncode
    for proc in _session_members(root.pid):
        key = _proc_key(proc)
        if key:
            known[key] = proc
    leftovers = [proc for proc in known.values() if _alive(proc)]
    report["leftovers_after_root"] = len(leftovers)
    if leftovers:
        for proc in leftovers:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for proc in alive:
            _signal(proc, signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=5)
        report["killed"] = len(leftovers)
        report["still_alive"] = [proc.pid for proc in alive]
    return report


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, signum: int) -> None:
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signum)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _session_members(sid: int) -> list[psutil.Process]:
    """Every live process whose session id is ``sid`` (the standalone we started leads its session)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == sid:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


# ------------------------------------------------------------------------------------------ emulator


class Emulator:
    """The reAPI emulator as a subprocess on a free loopback port (its own session; stopped by pid)."""

    def __init__(
        self,
        workdir: Path,
        latency_mean: float,
        latency_jitter: float,
        options: Options,
        extra_args: Iterable[str] = (),
    ) -> None:
        """Remember the settings; :meth:`start` launches it."""
        self.log_path = workdir / "emulator.log"
        self.args = [
            sys.executable, "-m", "airflow_provider_imagen.emulator", "--host", "127.0.0.1", "--port", "0",
            "--latency-mean", str(latency_mean), "--latency-jitter", str(latency_jitter),
            "--image-scale", str(options.image_scale), *extra_args,
        ]  # fmt: skip
        if options.seed is not None:
            self.args += ["--seed", str(options.seed)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self, timeout: float = 30.0) -> str:
        """Start it and return its base URL (read from the line it prints once listening)."""
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )

        def announced() -> str | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchmarkError(f"emulator exited early:\n{_tail(self.log_path)}")
            found = re.search(r"running at (http://\S+?) ", self.log_path.read_text(errors="replace"))
            return found.group(1) if found else None

        self.base_url = wait_until(announced, timeout, 0.1, "the emulator to listen")
        return self.base_url

    def get(self, path: str) -> Any:
        """GET a control route (``/_emulator/ledger``, ``/_emulator/tasks``) and return its JSON."""
        reply = httpx.get(self.base_url + path, timeout=60)
        reply.raise_for_status()
        return reply.json()

    def stop(self) -> dict[str, Any]:
        """Stop it by pid (SIGTERM: it exits cleanly on either SIGINT or SIGTERM)."""
        if self.proc is None:
            return {}
        return stop_process_tree(self.proc, signal.SIGTERM, grace=15)


# ------------------------------------------------------------------------------------------ postgres


class Postgres:
    """A throw-away PostgreSQL cluster under /tmp on a free loopback port, run as the ``postgres`` user.

    The server runs in the foreground as OUR child (not daemonized by pg_ctl), so stopping it is a
    SIGINT ("fast shutdown") to a pid we own, and it is reaped here rather than left as a zombie of init.
    """

    def __init__(self, workdir: Path) -> None:
        """Find the server binaries; :meth:`start` creates and starts the cluster."""
        self.dir = workdir / "pg"
        self.port = free_port()
        self.bindir = self._find_bindir()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _find_bindir() -> Path:
        def found() -> list[Path]:
            return sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)

        if not found() and os.geteuid() == 0 and shutil.which("apt-get"):
            # Debian's package, the PostgreSQL users of this kind of machine get; `apt-get update` only if the
            # first try fails.
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
            if subprocess.run(install, capture_output=True, timeout=900, env=env).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
                subprocess.run(install, capture_output=True, timeout=900, env=env)
        if not found():
            raise BenchmarkError("PostgreSQL server binaries not found: apt-get install postgresql")
        return found()[0].parent

    @staticmethod
    def _user() -> dict[str, Any]:
        return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``airflow`` database (psycopg2 driver, TCP on loopback)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/airflow"

    def start(self) -> str:
        """initdb (trust auth), start on 127.0.0.1 only, create database ``airflow``; return the URL."""
        for module in ("psycopg2", "asyncpg"):  # Airflow's sync and (derived) async drivers
            try:
                __import__(module)
            except ImportError as exc:
                raise BenchmarkError(
                    "--postgres needs psycopg2 and asyncpg in the venv: "
                    "uv pip install --python .venv/bin/python psycopg2-binary asyncpg"
                ) from exc
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.dir.parent.chmod(0o755)
        data = str(self.dir / "data")
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            capture_output=True, check=True, timeout=120, cwd=self.dir, **self._user(),
        )  # fmt: skip
        with (self.dir.parent / "postgres.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", data, "-p", str(self.port), "-k", str(self.dir),
                 "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True, **self._user(),
            )  # fmt: skip

        def accepting() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchmarkError(f"postgres exited:\n{_tail(self.dir.parent / 'postgres.log')}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True, timeout=10,
            )  # fmt: skip
            return ready.returncode == 0

        wait_until(accepting, 60, 0.3, "postgres to accept connections")
        subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-c", "CREATE DATABASE airflow"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        return self.url

    def stop(self) -> dict[str, Any]:
        """SIGINT (fast shutdown) to the server's pid, escalating by pid if it lingers."""
        if self.proc is None:
            return {}
        return stop_process_tree(self.proc, signal.SIGINT, grace=30)


# ------------------------------------------------------------------------------------------ metadata DB


class MetadataDB:
    """Read-only SQL over Airflow's metadata DB (no Airflow import: plain SQLAlchemy)."""

    def __init__(self, url: str) -> None:
        """Open a small engine; for SQLite a short busy timeout so a sample never stalls the writers."""
        connect_args = {"timeout": 5} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Run one SELECT and return its rows as dicts."""
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]

    def dag_ready(self, dag_id: str) -> bool:
        """True when the DAG is serialized, active and unpaused (the scheduler can run it)."""
        rows = self.rows(
            "SELECT d.is_paused, d.is_stale FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
            "WHERE d.dag_id = :dag_id",
            dag_id=dag_id,
        )
        return bool(rows) and not rows[0]["is_paused"] and not rows[0]["is_stale"]

    def import_errors(self) -> list[dict[str, Any]]:
        """DAG files that failed to parse (filename and the last line of the trace)."""
        rows = self.rows("SELECT filename, stacktrace FROM import_error")
        return [
            {"file": r["filename"], "error": (r["stacktrace"] or "").strip().splitlines()[-1:]} for r in rows
        ]

    def run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """The dag_run row (state, queued_at, start_date, end_date) or None."""
        rows = self.rows(
            "SELECT state, queued_at, start_date, end_date FROM dag_run WHERE dag_id = :d AND run_id = :r",
            d=dag_id,
            r=run_id,
        )
        return rows[0] if rows else None

    def state_counts(self, dag_id: str, run_id: str | list[str]) -> dict[str, int]:
        """How many task instances of the run (or runs) are in each state right now."""
        run_ids = [run_id] if isinstance(run_id, str) else run_id
        query = sa.text(
            "SELECT state, COUNT(*) AS n FROM task_instance WHERE dag_id = :d AND run_id IN :r GROUP BY state"
        ).bindparams(sa.bindparam("r", expanding=True))
        with self.engine.connect() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query, {"d": dag_id, "r": run_ids})]
        return {str(r["state"]): int(r["n"]) for r in rows}

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run (one row per map index)."""
        return self.rows(
            "SELECT task_id, map_index, state, try_number, start_date, end_date, duration "
            "FROM task_instance WHERE dag_id = :d AND run_id = :r",
            d=dag_id,
            r=run_id,
        )

    def count(self, table: str, dag_id: str, run_id: str) -> int | None:
        """Rows of ``table`` for the run (None if the table does not exist in this Airflow)."""
        try:
            rows = self.rows(
                f"SELECT COUNT(*) AS n FROM {table} WHERE dag_id = :d AND run_id = :r", d=dag_id, r=run_id
            )
        except sa.exc.DBAPIError:
            return None
        return int(rows[0]["n"])

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()


# ------------------------------------------------------------------------------------------ sampler


@dataclass
class Sample:
    """One tick of the sampler (times are epoch seconds; CPU is cumulative seconds per component)."""

    t: float
    rss: dict[str, int]
    pss: dict[str, int] | None
    cpu: dict[str, float]
    procs: dict[str, int]
    system_cpu_percent: float
    states: dict[str, int] | None = None
    #: The largest single process's RSS per component.
    rss_max: dict[str, int] = field(default_factory=dict)


class Sampler(threading.Thread):
    """Every ``interval`` s: RSS and CPU of each Airflow component's process tree, the emulator, and the
    run's task-instance states. CPU per component is the sum of the last-seen user+system time of every
    process ever seen in it (short-lived task processes lose at most one interval each: a lower bound).
    """

    def __init__(self, root_pid: int, emulator_pid: int | None, interval: float) -> None:
        """Sample the tree under ``root_pid`` (the standalone supervisor) and the emulator."""
        super().__init__(name="bench-sampler", daemon=True)
        self.root_pid = root_pid
        self.emulator_pid = emulator_pid
        self.interval = interval
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()
        self.state_source: Callable[[], dict[str, int]] | None = None
        self.own_cpu_s = 0.0
        self.pss_every = max(1, round(10.0 / interval))
        self._ticks = 0
        self._component: dict[tuple[int, float], str] = {}
        self._cpu: dict[tuple[int, float], float] = {}
        self.errors = 0
        psutil.cpu_percent(None)

    def _walk(self) -> list[tuple[str, tuple[int, float], psutil.Process]]:
        """(component, key, process) for the standalone tree and the emulator, from ONE scan of /proc."""
        procs: dict[int, psutil.Process] = {}
        kids: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid", "create_time"]):  # psutil caches these objects
            procs[proc.pid] = proc
            kids.setdefault(proc.info["ppid"], []).append(proc.pid)
        found: list[tuple[str, tuple[int, float], psutil.Process]] = []
        stack: list[tuple[int, str | None]] = [(self.root_pid, None)]
        while stack:
            pid, name = stack.pop()
            proc = procs.get(pid)
            if proc is None:
                continue
            key = (pid, proc.info["create_time"])
            if name is None:  # the root itself, or one of its direct children: name the component
                if pid == self.root_pid:
                    component = "standalone"
                else:
                    component = self._component.get(key) or self._name_component(proc)
                stack += [(kid, None if pid == self.root_pid else component) for kid in kids.get(pid, ())]
            else:
                component = name
                stack += [(kid, name) for kid in kids.get(pid, ())]
            found.append((component, key, proc))
        emulator = procs.get(self.emulator_pid or -1)
        if emulator is not None:
            found.append(("emulator", (emulator.pid, emulator.info["create_time"]), emulator))
        return [(self._below_scheduler(name, key, proc), key, proc) for name, key, proc in found]

    def _below_scheduler(self, name: str, key: tuple[int, float], proc: psutil.Process) -> str:
        """Name a process of the scheduler's tree by its title: ``worker``, ``task`` or ``scheduler``.

        A forked process takes its title a moment after it starts (a task process first bears its
        worker's), so any not yet named ``task`` is looked at again on the next tick (a few dozen).
        """
        if name != "scheduler":
            return name
        known = self._component.get(key)
        if known == "task":
            return known
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            return name
        if title.startswith(_WORKER_TITLE):
            self._component[key] = "worker"
        elif title.startswith(_TASK_TITLE):
            self._component[key] = "task"
        return self._component.get(key, name)

    @staticmethod
    def _name_component(proc: psutil.Process) -> str:
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            return "other"
        return next((c for c in _COMPONENTS if c in cmd), "other")

    def sample(self) -> Sample:
        """Take one sample now."""
        now = time.time()
        rss: dict[str, int] = {}
        rss_max: dict[str, int] = {}
        pss: dict[str, int] = {}
        procs: dict[str, int] = {}
        # PSS (smaps_rollup) costs up to 6 ms per big Airflow process, ~0.4 s for the whole tree: read it
        # only every ``pss_every`` ticks (10 s), so the sampler stays near 1 % of a core.
        full = self._ticks % self.pss_every == 0
        self._ticks += 1
        for name, key, proc in self._walk():
            self._component.setdefault(key, name)
            try:
                with proc.oneshot():
                    mem = proc.memory_full_info() if full else proc.memory_info()
                    times = proc.cpu_times()
            except psutil.Error:
                continue
            self._cpu[key] = times.user + times.system
            rss[name] = rss.get(name, 0) + mem.rss
            rss_max[name] = max(rss_max.get(name, 0), mem.rss)
            if full:
                pss[name] = pss.get(name, 0) + getattr(mem, "pss", mem.rss)
            procs[name] = procs.get(name, 0) + 1
        cpu: dict[str, float] = {}
        for key, seconds in self._cpu.items():
            name = self._component[key]
            cpu[name] = cpu.get(name, 0.0) + seconds
        states = None
        if self.state_source is not None:
            try:
                states = self.state_source()
            except Exception:  # a locked SQLite or a restarting DB must not end the sampling
                self.errors += 1
        return Sample(now, rss, pss if full else None, cpu, procs, psutil.cpu_percent(None), states, rss_max)

    def run(self) -> None:
        """Sample until :meth:`stop` (bounded by the caller, who always stops it)."""
        while not self.stop_event.is_set():
            started = time.monotonic()
            self.samples.append(self.sample())
            self.own_cpu_s = time.thread_time()
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self.stop_event.set()
        self.join(timeout=30)


AIRFLOW_PARTS = ("standalone", *_COMPONENTS, "worker", "task", "other")


def summarize_samples(samples: list[Sample], t0: float, t1: float, interval: float) -> dict[str, Any]:
    """RSS peaks and growth, CPU shares (of one core) and slot-seconds over the window [t0, t1]."""
    window = [s for s in samples if t0 <= s.t <= t1]
    before = [s for s in samples if s.t < t0]
    if len(window) < 2:
        return {"samples": len(window)}
    first = before[-1] if before else window[0]
    last = window[-1]
    span = max(1e-9, last.t - first.t)

    def rss_of(sample: Sample, parts: Iterable[str]) -> int:
        return sum(sample.rss.get(p, 0) for p in parts)

    def pss_of(sample: Sample, parts: Iterable[str]) -> int:
        return sum((sample.pss or {}).get(p, 0) for p in parts)

    with_pss = [s for s in samples if s.pss is not None and t0 - 15 <= s.t <= t1]
    pss_first = next((s for s in reversed(with_pss) if s.t <= t0), with_pss[0] if with_pss else None)

    def cpu_of(sample: Sample, parts: Iterable[str]) -> float:
        return sum(sample.cpu.get(p, 0.0) for p in parts)

    def peak_cpu_percent(parts: Iterable[str], width: float = 2.0) -> float:
        parts = tuple(parts)
        best = 0.0
        j = 0
        for i, sample in enumerate(window):
            while window[j].t < sample.t - width and j < i:
                j += 1
            if sample.t - window[j].t >= width * 0.75:
                best = max(
                    best, (cpu_of(sample, parts) - cpu_of(window[j], parts)) / (sample.t - window[j].t)
                )
        return 100 * best

    groups = {
        "triggerer": ("triggerer",),
        "airflow": AIRFLOW_PARTS,
        "emulator": ("emulator",),
        # The batch's own processes: LocalExecutor workers (supervisors) and the task processes.
        "worker": ("worker", "task"),
        "task": ("task",),
    }
    out: dict[str, Any] = {"samples": len(window), "window_s": round(span, 1)}
    for label, parts in groups.items():
        peak = max(rss_of(s, parts) for s in window)
        pss_peak = max((pss_of(s, parts) for s in with_pss), default=0)
        pss_start = pss_of(pss_first, parts) if pss_first else 0
        out[label] = {
            "rss_start_mb": round(rss_of(first, parts) / MB, 1),
            "rss_peak_mb": round(peak / MB, 1),
            "rss_growth_mb": round((peak - rss_of(first, parts)) / MB, 1),
            "pss_start_mb": round(pss_start / MB, 1),
            "pss_peak_mb": round(pss_peak / MB, 1),
            "pss_growth_mb": round((pss_peak - pss_start) / MB, 1),
            "cpu_mean_percent": round(100 * (cpu_of(last, parts) - cpu_of(first, parts)) / span, 1),
            "cpu_peak_2s_percent": round(peak_cpu_percent(parts), 1),
            "cpu_seconds": round(cpu_of(last, parts) - cpu_of(first, parts), 1),
            "rss_peak_one_process_mb": round(
                max(max((s.rss_max.get(p, 0) for p in parts), default=0) for s in window) / MB, 1
            ),
        }
    out["pss_peak_mb_by_component"] = {
        part: round(max(((s.pss or {}).get(part, 0) for s in with_pss), default=0) / MB, 1)
        for part in AIRFLOW_PARTS
    }
    out["cpu_seconds_by_component"] = {
        part: round(last.cpu.get(part, 0.0) - first.cpu.get(part, 0.0), 1)
        for part in (*AIRFLOW_PARTS, "emulator")
    }
    out["max_processes"] = max(sum(s.procs.get(p, 0) for p in AIRFLOW_PARTS) for s in window)
    machine = statistics.fmean(s.system_cpu_percent for s in window)
    out["machine_cpu_mean_percent"] = round(machine, 1)
    # Everything else on the machine (other engineers' tests, this harness), in % of one core.
    airflow_and_emulator = out["airflow"]["cpu_mean_percent"] + out["emulator"]["cpu_mean_percent"]
    out["other_cpu_mean_percent"] = round(machine * (os.cpu_count() or 1) - airflow_and_emulator, 1)
    # Task-instance states, integrated over time: slot-seconds are TI-seconds spent in 'running'.
    state_samples = [s for s in window if s.states is not None]
    if len(state_samples) >= 2:
        slot_s = 0.0
        deferred_s = 0.0
        for a, b in itertools.pairwise(state_samples):
            dt = b.t - a.t
            slot_s += dt * (a.states.get("running", 0) + b.states.get("running", 0)) / 2  # type: ignore[union-attr]
            deferred_s += dt * (a.states.get("deferred", 0) + b.states.get("deferred", 0)) / 2  # type: ignore[union-attr]
        out["running_slot_seconds"] = round(slot_s, 1)
        # The triggerer while a task waits in it (scenario 3: "CPU while waiting").
        waiting = [
            (a, b)
            for a, b in itertools.pairwise(state_samples)
            if a.states.get("deferred", 0) and b.states.get("deferred", 0)  # type: ignore[union-attr]
        ]
        waited = sum(b.t - a.t for a, b in waiting)
        if waited > 0:
            busy = sum(cpu_of(b, ("triggerer",)) - cpu_of(a, ("triggerer",)) for a, b in waiting)
            out["triggerer_cpu_while_deferred_percent"] = round(100 * busy / waited, 1)
            out["deferred_wall_s"] = round(waited, 1)
        out["deferred_ti_seconds"] = round(deferred_s, 1)
        out["max_running"] = max(s.states.get("running", 0) for s in state_samples)  # type: ignore[union-attr]
        out["max_deferred"] = max(s.states.get("deferred", 0) for s in state_samples)  # type: ignore[union-attr]
        out["max_queued"] = max(s.states.get("queued", 0) for s in state_samples)  # type: ignore[union-attr]
    return out


# ------------------------------------------------------------------------------------------ Airflow


def airflow_env(
    home: Path, api_port: int, db_url: str, parallelism: int, emulator_url: str, extra: Mapping[str, str]
) -> dict[str, str]:
    """The environment of every Airflow process of a scenario (inherited AIRFLOW_* variables dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "VIRTUAL_ENV"}
    bindir = str(Path(sys.executable).parent)
    base = f"http://127.0.0.1:{api_port}"
    env.update(
        PATH=f"{bindir}:{env.get('PATH', '')}",
        NO_COLOR="1",
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_DIR),
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM=str(parallelism),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{base}/execution/",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=db_url,
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(api_port),
        AIRFLOW__API__BASE_URL=base,
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
        AIRFLOW_CONN_IMAGEN_DEFAULT=json.dumps(
            {"conn_type": "imagen", "host": emulator_url, "password": EMULATOR_KEY}
        ),
        AIRFLOW_CONN_REAPI_HTTP=json.dumps(
            {"conn_type": "http", "host": emulator_url, "password": EMULATOR_KEY}
        ),
    )
    env.update(extra)
    return env


def start_standalone(env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    """``airflow standalone`` in a new session, SIGINT restored, output to ``home/standalone.log``."""
    airflow = str(Path(sys.executable).parent / "airflow")
    with (home / "standalone.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", _RESTORE_SIGINT, airflow, "standalone"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
            start_new_session=True,
        )


def wait_healthy(api: str, proc: subprocess.Popen[bytes], home: Path, timeout: float) -> dict[str, Any]:
    """Wait until metadatabase, scheduler, triggerer and dag-processor all report healthy."""

    def healthy() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise BenchmarkError(
                f"airflow standalone exited ({proc.returncode}):\n{_tail(home / 'standalone.log')}"
            )
        try:
            body = httpx.get(f"{api}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        ok = all((body.get(p) or {}).get("status") == "healthy" for p in parts)
        return body if ok else None

    return wait_until(healthy, timeout, 1.0, "airflow standalone to be healthy")


def first_errors(home: Path, dag_id: str, run_id: str, task_ids: Iterable[str], limit: int = 3) -> list[str]:
    """The first error lines of the failed tasks' logs (Airflow 3 writes JSON lines per attempt)."""
    messages: list[str] = []
    run_dir = home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    for task_id in task_ids:
        for path in sorted((run_dir / f"task_id={task_id}").rglob("*.log"))[:5]:
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if str(record.get("level", "")).lower() not in ("error", "critical"):
                    continue
                text = str(record.get("event", ""))
                detail = record.get("error_detail")
                if isinstance(detail, list) and detail and isinstance(detail[-1], dict):
                    text += f" | {detail[-1].get('exc_type')}: {detail[-1].get('exc_value')}"
                text = f"{task_id}: {text}"[:400]
                if text not in messages:
                    messages.append(text)
                if len(messages) >= limit:
                    return messages
    return messages


def manifest_rows(output_dir: Path) -> dict[str, Any]:
    """Find the run's manifest (manifest*.json or manifest*.parquet under ``output_dir``), count rows."""
    found = sorted(output_dir.rglob("manifest*.json")) + sorted(output_dir.rglob("manifest*.parquet"))
    if not found:
        return {"path": None, "rows": None}
    path = found[0]
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            rows = len(data) if isinstance(data, list) else len(data.get("rows", []))
        else:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError, KeyError, AttributeError):
        rows = None
    return {"path": str(path), "rows": rows}


def summarize_tis(tis: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, states and durations of the run's task instances, per task id and in total."""
    per_task: dict[str, dict[str, Any]] = {}
    for ti in tis:
        entry = per_task.setdefault(ti["task_id"], {"count": 0, "states": {}, "durations": []})
        entry["count"] += 1
        state = str(ti["state"])
        entry["states"][state] = entry["states"].get(state, 0) + 1
        start, end = to_epoch(ti["start_date"]), to_epoch(ti["end_date"])
        if start is not None and end is not None:
            entry["durations"].append(end - start)
    total = 0.0
    for entry in per_task.values():
        durations = entry.pop("durations")
        entry["sum_duration_s"] = round(sum(durations), 1)
        entry["median_duration_s"] = _round(statistics.median(durations)) if durations else None
        total += sum(durations)
    return {"count": len(tis), "sum_duration_s": round(total, 1), "per_task": per_task}


# ------------------------------------------------------------------------------------------ batch figures

PASS_START = re.compile(r"^::group::Pre Execute")
PROGRESS_WINDOW = re.compile(r"^Progress: .*\(window (\d+)\)")


def _log_events(path: Path) -> Iterable[str]:
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield str(record.get("event", ""))


def batch_figures(
    home: Path, scenario: Scenario, run_ids: list[str], output_dir: Path, ledger: Mapping[str, Any]
) -> dict[str, Any]:
    """What a batch run leaves behind: passes and windows (task logs), journal bytes, manifest statuses,
    and 429s as a share of POSTs (the emulator's counters)."""
    run_dirs = [output_dir] if len(run_ids) == 1 else [output_dir / f"run{i}" for i in range(len(run_ids))]
    passes: list[int] = []
    windows: list[dict[str, Any]] = []
    shrinks = 0
    for run_id in run_ids:
        folder = home / "logs" / f"dag_id={scenario.dag_id}" / f"run_id={run_id}"
        count, seen = 0, []
        for path in sorted(folder.rglob("*.log")) if folder.exists() else ():
            for event in _log_events(path):
                if PASS_START.search(event):
                    count += 1
                elif found := PROGRESS_WINDOW.search(event):
                    seen.append(int(found.group(1)))
                elif "rate-limits submits" in event:
                    shrinks += 1
        passes.append(count)
        windows.append({"min": min(seen, default=None), "last": seen[-1] if seen else None,
                        "mean": _round(statistics.fmean(seen), 1) if seen else None})  # fmt: skip
    journal_bytes = 0
    statuses: dict[str, int] = {}
    manifests = 0
    for run_dir in run_dirs:
        if not run_dir.exists():
            continue
        journal_bytes += sum(
            f.stat().st_size for f in run_dir.rglob("*") if "_journal" in f.parts and f.is_file()
        )
        found = sorted((run_dir / "manifests").rglob("*.parquet"), key=lambda f: f.stat().st_mtime)
        if found:  # the last manifest of the run (a retry writes its own)
            import pyarrow.parquet as pq

            manifests += 1
            for status in pq.read_table(found[-1], columns=["status"]).column("status").to_pylist():
                statuses[status] = statuses.get(status, 0) + 1
    posts = int(ledger.get("posts") or 0)
    limited = int(ledger.get("rate_limited") or 0)
    return {
        "passes": passes,
        "resumes": [max(0, c - 1) for c in passes],
        "windows": windows,
        "window_shrinks": shrinks,
        "journal_bytes": journal_bytes,
        "manifests": manifests,
        "manifest_statuses": statuses,
        "rows_not_completed": sum(v for k, v in statuses.items() if k != "completed"),
        "posts": posts,
        "posts_429": limited,
        "share_429": _round(limited / posts, 4) if posts else None,
    }


def derive_figures(result: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    """Per-image figures of a batch run: CPU per 1,000 images by part, peak RSS of one task process,
    journal bytes per image, wall time against the bound and throughput."""
    batch = result.get("batch") or {}
    resources = result.get("resources") or {}
    images = int((batch.get("manifest_statuses") or {}).get("completed") or 0) or int(
        ((result.get("ledger") or {}).get("status_counts") or {}).get("completed") or 0
    )
    if not images:
        return {}

    def per_1000(group: str) -> float | None:
        seconds = (resources.get(group) or {}).get("cpu_seconds")
        return None if seconds is None else round(1000 * seconds / images, 2)

    wall = result.get("wall_s")
    ideal = scenario.ideal_s
    worker, trigger = per_1000("worker"), per_1000("triggerer")
    return {
        "images": images,
        "ideal_s": _round(ideal, 1),
        "x_bound": _round(wall / ideal) if wall and ideal else None,
        "images_per_s": _round(images / wall, 1) if wall else None,
        "share_of_bound_throughput": _round(ideal / wall, 3) if wall and ideal else None,
        "cpu_s_per_1000": {
            "worker": worker,
            "task": per_1000("task"),
            "triggerer": trigger,
            "worker_plus_triggerer": _round((worker or 0) + (trigger or 0)),
            "emulator": per_1000("emulator"),
            "airflow": per_1000("airflow"),
        },
        "task_rss_peak_mb": (resources.get("task") or {}).get("rss_peak_one_process_mb"),
        "worker_rss_peak_mb": (resources.get("worker") or {}).get("rss_peak_one_process_mb"),
        "journal_bytes_per_image": _round(batch.get("journal_bytes", 0) / images, 1),
        "other_cpu_mean_percent": resources.get("other_cpu_mean_percent"),
    }


def figures_line(result: dict[str, Any]) -> str:
    """The batch figures of one result in one line (empty when there are none)."""
    d = result.get("derived") or {}
    b = result.get("batch") or {}
    if not d:
        return ""
    cpu = d["cpu_s_per_1000"]
    return (
        f"{result['name']}: {d['images']} images, wall {result.get('wall_s')} s = {d['x_bound']} x bound "
        f"{d['ideal_s']} s ({d['images_per_s']} img/s); CPU-s per 1,000 images: worker {cpu['worker']} "
        f"(task {cpu['task']}), triggerer {cpu['triggerer']}, emulator {cpu['emulator']}; peak RSS task "
        f"{d['task_rss_peak_mb']} MB, any worker process {d['worker_rss_peak_mb']} MB; journal "
        f"{d['journal_bytes_per_image']} B/image; passes {b.get('passes')}; polls/image "
        f"{result.get('polls_per_image')}; 429s {b.get('posts_429')}/{b.get('posts')} POSTs "
        f"({b.get('share_429')}); not completed {b.get('rows_not_completed')} {b.get('manifest_statuses')}; "
        f"windows {[w.get('mean') for w in b.get('windows', [])]}; other CPU {d['other_cpu_mean_percent']} %"
    )


# ------------------------------------------------------------------------------------------ one scenario


def run_scenario(
    scenario: Scenario, options: Options, repeat: int = 0, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run one scenario end to end in a fresh world and return its result (also written as JSON)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{scenario.name}-", dir="/tmp"))
    home = workdir / "airflow"
    output_dir = workdir / "out"
    home.mkdir()
    result: dict[str, Any] = {
        "scenario": asdict(scenario)
        | {"conf": dict(scenario.conf), "airflow_config": dict(scenario.airflow_config)},
        "name": scenario.name,
        "repeat": repeat,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "workdir": str(workdir),
        "db": "postgres" if options.postgres else "sqlite",
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
    }
    emulator_args = tuple(scenario.emulator_args)
    if scenario.account_cap:
        emulator_args += ("--max-concurrent-renders", str(scenario.account_cap))
    emulator = Emulator(workdir, scenario.latency_mean, scenario.latency_jitter, options, emulator_args)
    postgres: Postgres | None = None
    standalone: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    db: MetadataDB | None = None
    try:
        if options.postgres:
            postgres = Postgres(workdir)
            db_url = postgres.start()
        else:
            db_url = f"sqlite:///{home / 'airflow.db'}"
        emulator_url = emulator.start()
        log(f"[{scenario.name}] emulator at {emulator_url}; AIRFLOW_HOME {home}")
        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}"
        env = airflow_env(home, api_port, db_url, scenario.parallelism, emulator_url, scenario.airflow_config)
        result["airflow_settings"] = {
            k: v for k, v in sorted(env.items()) if k.startswith("AIRFLOW__") and "SECRET" not in k
        }
        t = time.monotonic()
        migrate = subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
            env=env, cwd=home, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        (home / "migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise BenchmarkError(f"airflow db migrate failed:\n{_tail(home / 'migrate.log')}")
        result["migrate_s"] = round(time.monotonic() - t, 1)

        t = time.monotonic()
        standalone = start_standalone(env, home)
        sampler = Sampler(
            standalone.pid, emulator.proc.pid if emulator.proc else None, options.sample_interval
        )
        sampler.start()
        wait_healthy(api, standalone, home, options.startup_timeout)
        result["healthy_s"] = round(time.monotonic() - t, 1)
        db = MetadataDB(db_url)

        def dag_parsed() -> bool:
            if db.import_errors():
                raise BenchmarkError(f"DAG import errors: {db.import_errors()}")
            return db.dag_ready(scenario.dag_id)

        wait_until(dag_parsed, 180, 1.0, f"DAG {scenario.dag_id} to be parsed")
        result["ready_s"] = round(time.monotonic() - t, 1)
        log(
            f"[{scenario.name}] airflow healthy in {result['healthy_s']} s, "
            f"DAG parsed at {result['ready_s']} s"
        )

        size = str(scenario.conf.get("size", "1:1"))
        prompt_table = write_prompt_table(workdir / "input", scenario.n, size).as_uri()
        # One output folder per run (images, journal, manifest); a single run keeps ``out/`` itself.
        run_dirs = (
            [output_dir] if scenario.runs == 1 else [output_dir / f"run{i}" for i in range(scenario.runs)]
        )
        confs: list[dict[str, Any]] = []
        for run_dir in run_dirs:
            conf: dict[str, Any] = {
                "n": scenario.n,
                "max_in_flight": scenario.max_in_flight,
                "output_dir": str(run_dir),
                "output_uri": run_dir.as_uri(),
                "prompt_table": prompt_table,
                "size": size,
                "poll_interval": 2,
            }
            conf.update(scenario.conf)
            confs.append(conf)
        result["conf"] = confs[0]
        loadavg_at_trigger = os.getloadavg()
        harness_cpu_at_trigger = time.process_time()
        t_trigger = time.time()
        run_ids: list[str] = []
        for conf in confs:
            reply = httpx.post(
                f"{api}/api/v2/dags/{scenario.dag_id}/dagRuns",
                json={"logical_date": None, "conf": conf},
                timeout=60,
            )
            if reply.status_code >= 300:
                raise BenchmarkError(f"trigger failed: HTTP {reply.status_code} {reply.text[:500]}")
            run_ids.append(reply.json()["dag_run_id"])
        run_id = run_ids[0]
        result["run_id"] = run_id
        if len(run_ids) > 1:
            result["run_ids"] = run_ids
        sampler.state_source = lambda: db.state_counts(scenario.dag_id, run_ids)
        log(
            f"[{scenario.name}] triggered {len(run_ids)} run(s) of N={scenario.n} ({run_id}…); "
            f"waiting up to {scenario.timeout_s:.0f} s"
        )

        def finished() -> list[dict[str, Any]] | None:
            if standalone is not None and standalone.poll() is not None:
                raise BenchmarkError(f"airflow standalone died during the run ({standalone.returncode})")
            rows = [db.run(scenario.dag_id, r) for r in run_ids]
            done = all(row and str(row["state"]) in ("success", "failed") for row in rows)
            return rows if done else None  # type: ignore[return-value]

        try:
            run_rows = wait_until(finished, scenario.timeout_s, 1.0, "the DAG run(s) to finish")
            states = {str(row["state"]) for row in run_rows}
            state = "failed" if "failed" in states else "success"
        except BenchmarkError as exc:
            if "timed out" not in str(exc):
                raise
            run_rows = [db.run(scenario.dag_id, r) or {} for r in run_ids]
            state = "timeout"
        t_seen = time.time()
        harness_cpu = time.process_time() - harness_cpu_at_trigger
        time.sleep(min(2.0, 4 * options.sample_interval))
        sampler.stop()

        starts = [to_epoch(row.get("start_date")) for row in run_rows]
        ends = [to_epoch(row.get("end_date")) for row in run_rows]
        start = min((x for x in starts if x), default=None)
        end = max(ends) if ends and all(ends) else None  # type: ignore[type-var]
        end_or_seen = end or t_seen
        run_row = run_rows[0]
        tis = [ti for r in run_ids for ti in db.task_instances(scenario.dag_id, r)]
        ti_summary = summarize_tis(tis)
        failed_tasks = sorted(
            {ti["task_id"] for ti in tis if str(ti["state"]) in ("failed", "upstream_failed")}
        )
        ledger = emulator.get("/_emulator/ledger")
        ledger.pop("submissions_by_prompt", None)
        tasks = emulator.get("/_emulator/tasks")
        notices = [
            task["first_terminal_poll_at"] - task["ready_at"]
            for task in tasks
            if task["first_terminal_poll_at"]
        ]
        completed = int(ledger["status_counts"].get("completed", 0))
        images = sorted(output_dir.rglob("*.png")) if output_dir.exists() else []
        if len(run_ids) > 1:
            result["runs"] = [
                {"run_id": r, "state": str(row.get("state")), "start": a, "end": b,
                 "wall_s": _round(b - a) if a and b else None}
                for r, row, a, b in zip(run_ids, run_rows, starts, ends, strict=True)
            ]  # fmt: skip
        result["batch"] = batch_figures(home, scenario, run_ids, output_dir, ledger)
        result.update(
            state=state,
            as_expected=state == scenario.expect,
            wall_s=_round(end - start) if start and end else None,
            trigger_to_end_s=round(end_or_seen - t_trigger, 2),
            queued_to_start_s=_round(start - to_epoch(run_row.get("queued_at")))
            if start and run_row.get("queued_at")
            else None,
            ideal_s=scenario.ideal_s,
            task_instances=ti_summary["count"],
            ti_sum_duration_s=ti_summary["sum_duration_s"],
            ti_per_task=ti_summary["per_task"],
            ti_history_rows=sum(db.count("task_instance_history", scenario.dag_id, r) or 0 for r in run_ids),
            failed_tasks=failed_tasks,
            errors=first_errors(home, scenario.dag_id, run_id, failed_tasks) if failed_tasks else [],
            ledger=ledger,
            polls_per_image=_round(ledger["polls"] / completed) if completed else None,
            notice_latency_s={
                "count": len(notices),
                "mean": _round(statistics.fmean(notices)) if notices else None,
                "p50": _round(percentile(notices, 50)),
                "p95": _round(percentile(notices, 95)),
                "max": _round(max(notices)) if notices else None,
            },
            images_on_disk=len(images),
            image_bytes=sum(p.stat().st_size for p in images),
            manifest=manifest_rows(output_dir) if output_dir.exists() else {"path": None, "rows": None},
            resources=summarize_samples(sampler.samples, t_trigger, end_or_seen, options.sample_interval),
            sampler_db_errors=sampler.errors,
            harness_cpu_percent=round(100 * harness_cpu / max(1e-9, t_seen - t_trigger), 1),
            sampler_cpu_s_total=round(sampler.own_cpu_s, 1),
            machine=result["machine"] | {"loadavg_at_trigger": [round(x, 2) for x in loadavg_at_trigger]},
        )
        result["derived"] = derive_figures(result, scenario)
    except BenchmarkError as exc:
        result.update(state="harness_error", as_expected=False, error=str(exc))
        log(f"[{scenario.name}] HARNESS ERROR: {exc}")
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if db is not None:
            db.dispose()
        stops: dict[str, Any] = {}
        if standalone is not None:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            stops["airflow"] = stop_process_tree(standalone, signal.SIGINT, grace=60)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            stops["airflow_session_cpu_s"] = round(
                (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 1
            )
        stops["emulator"] = emulator.stop()
        if postgres is not None:
            stops["postgres"] = postgres.stop()
        result["stop"] = stops
        if options.keep_home or result.get("state") == "harness_error":
            result["kept_workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    options.results_dir.mkdir(parents=True, exist_ok=True)
    tag = f"-{options.tag}" if options.tag else ""
    path = options.results_dir / f"{stamp}-{scenario.name}-r{repeat}{tag}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    result["result_file"] = str(path)
    return result


# ------------------------------------------------------------------------------------------ table

COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("scenario", "<18", lambda r: r["name"]),
    ("rep", ">3", lambda r: r.get("repeat")),
    ("state", "<14", lambda r: r.get("state", "") + ("" if r.get("as_expected") else "!")),
    ("N", ">5", lambda r: r["scenario"]["n"]),
    ("wall_s", ">7", lambda r: r.get("wall_s")),
    ("trig→end", ">8", lambda r: r.get("trigger_to_end_s")),
    ("TIs", ">5", lambda r: r.get("task_instances")),
    ("slot_s", ">7", lambda r: (r.get("resources") or {}).get("running_slot_seconds")),
    ("ΣTI_s", ">7", lambda r: r.get("ti_sum_duration_s")),
    ("posts", ">5", lambda r: (r.get("ledger") or {}).get("posts")),
    ("polls/img", ">9", lambda r: r.get("polls_per_image")),
    (
        "notice",
        ">11",
        lambda r: _pair(
            (r.get("notice_latency_s") or {}).get("mean"), (r.get("notice_latency_s") or {}).get("p95")
        ),
    ),
    ("imgs", ">5", lambda r: r.get("images_on_disk")),
    ("trigRSS+MB", ">10", lambda r: _res(r, "triggerer", "rss_growth_mb")),
    ("trigCPU%", ">8", lambda r: _res(r, "triggerer", "cpu_mean_percent")),
    ("afPSS_MB", ">8", lambda r: _res(r, "airflow", "pss_peak_mb")),
    ("afCPU%", ">6", lambda r: _res(r, "airflow", "cpu_mean_percent")),
)


def _pair(a: Any, b: Any) -> str:
    return "" if a is None else f"{a}/{b}"


def _res(result: dict[str, Any], group: str, key: str) -> Any:
    return ((result.get("resources") or {}).get(group) or {}).get(key)


def _cell(value: Any, spec: str) -> str:
    text = "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
    return format(text, spec)


def table_header() -> str:
    """The table's header line (notice = mean/p95 seconds from render-ready to first terminal poll)."""
    return "  ".join(_cell(name, spec) for name, spec, _ in COLUMNS)


def table_row(result: dict[str, Any]) -> str:
    """One result as a table line."""
    cells = []
    for _, spec, get in COLUMNS:
        try:
            cells.append(_cell(get(result), spec))
        except (KeyError, TypeError):
            cells.append(_cell(None, spec))
    return "  ".join(cells)
