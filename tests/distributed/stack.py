"""A distributed Airflow on one machine: CeleryExecutor over Redis, PostgreSQL as the metadata DB, two
Celery workers and two triggerers, plus the reAPI emulator; every process started, observed and stopped
by pid from the tests.

Each "host" is a set of processes with its own ``AIRFLOW_HOME`` (its own config, its own task and trigger
logs) and its own name (``[core] hostname_callable`` → ``tests.distributed.hostname``):

- ``main``: api-server, scheduler, dag-processor;
- ``worker-1`` and ``worker-2``: ``airflow celery worker``, one queue shared by both;
- ``triggerer-1`` and ``triggerer-2``: ``airflow triggerer``.

Nothing is shared between hosts but PostgreSQL, Redis, the emulator, the S3 server (prompt tables,
images, journals and manifests live there) and the DAG files, as on a real deployment. PostgreSQL and
Redis are Debian's packages (``postgresql``, ``redis-server``), installed with apt-get when missing, each
a throwaway instance under the stack's folder on a free loopback port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.system.stack import BIN, REPO, Component, Stack, StackError, free_port, tail, wait_until

#: The DAG files every host sees: the example backfill DAG and this suite's own DAGs.
DAG_FILES = (
    REPO / "dags" / "imagen_prompt_backfill.py",
    Path(__file__).resolve().parent / "dags" / "imagen_dist.py",
)
WORKERS = ("worker-1", "worker-2")
TRIGGERERS = ("triggerer-1", "triggerer-2")
#: Slots per Celery worker (``[celery] worker_concurrency``).
WORKER_CONCURRENCY = 4

#: Settings of the distributed stack beyond the defaults, as ``AIRFLOW__SECTION__KEY``: short health
#: thresholds so that a killed or frozen component is noticed in seconds, not minutes.
FAULT_SETTINGS = {
    # A triggerer whose heartbeat is this old loses its triggers to a live one (default 30 s). Measured
    # here with the default heartbeat (every 5 s): a busy triggerer's heartbeat was 11 s old at times, so
    # at 10 s triggers hopped between two healthy triggerers. Beat every 2 s, take over after 15 s.
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "15",
    # A task whose worker vanished is failed (and retried) after this long without a heartbeat (300 s).
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    # A task sent to Celery that no worker started (a broker that lost its queue) is sent again after
    # this long (600 s).
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60",
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5",
}


def _apt_install(package: str, binary: str) -> None:
    """Install a Debian package when its binary is missing; raise when it cannot be had."""
    if shutil.which(binary) or list(Path("/usr/lib/postgresql").glob(f"*/bin/{binary}")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(f"{binary} is missing and cannot be installed here: apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(install, capture_output=True, timeout=900, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env, check=False)
        done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env, check=False)
        if done.returncode != 0:
            raise StackError(f"apt-get install {package} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


class Postgres:
    """A throwaway PostgreSQL cluster under ``folder`` on a free loopback port (trust auth, fsync off).

    The server runs in the foreground as our child, as the ``postgres`` user when we are root, in its
    own session; it is stopped by pid with SIGINT (fast shutdown).
    """

    def __init__(self, folder: Path) -> None:
        _apt_install("postgresql", "postgres")
        self.bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)[0].parent
        self.dir = folder
        self.port = free_port()
        self.log = folder.parent / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _as_owner(self) -> dict[str, Any]:
        return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/airflow"

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=airflow"

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            for parent in (self.dir.parent, self.dir.parent.parent):
                parent.chmod(0o755)
        data = str(self.dir / "data")
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            capture_output=True, check=True, timeout=120, cwd=self.dir, **self._as_owner(),
        )  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", data, "-p", str(self.port), "-k", str(self.dir),
                 "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=400",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True,
                **self._as_owner(),
            )  # fmt: skip

        def accepting() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"postgres exited:\n{tail(self.log)}")
            probe = [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)]
            return subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0

        wait_until(accepting, 60, "postgres to accept connections", interval=0.3)
        subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-c", "CREATE DATABASE airflow"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    @property
    def session(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Redis(Component):
    """A throwaway ``redis-server`` on a loopback port, without persistence: a restart empties it."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        _apt_install("redis-server", "redis-server")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder), "--protected-mode", "yes", "--daemonize", "no",
        ]  # fmt: skip
        super().__init__("redis", argv, folder.parent / "redis.log", env, folder)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        super().start()

        def up() -> bool:
            if not self.alive():
                raise StackError(f"redis-server exited:\n{tail(self.log)}")
            return self.ping()

        wait_until(up, 30, "redis to answer PING", interval=0.1)


class DistributedStack(Stack):
    """The distributed Airflow (see the module docstring); ``Stack``'s helpers over PostgreSQL.

    :param root: an empty folder: every host's ``AIRFLOW_HOME``, the database, Redis and the DAG folder.
    """

    def __init__(
        self,
        root: Path,
        api_key: str,
        extra_env: dict[str, str] | None = None,
        dag_files: Iterable[Path] = DAG_FILES,
    ) -> None:
        super().__init__(root / "main", api_key, extra_env)
        self.root = root
        self.dag_files = tuple(dag_files)
        self.dags = root / "dags"
        self.postgres = Postgres(root / "pg")
        self.redis = Redis(root / "redis", self._base_env())
        self.secrets = {
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
        }
        self._db: Any = None

    # -- configuration ---------------------------------------------------------------------------

    def host_env(self, host: str) -> dict[str, str]:
        """The environment of every process of one host."""
        env = self.airflow_env()  # the system stack's settings (SQLite, LocalExecutor…), overridden here
        home = self.root / host
        env.update(
            AIRFLOW_HOME=str(home),
            IMAGEN_DIST_HOST=host,
            PYTHONPATH=str(REPO),
            AIRFLOW__CORE__HOSTNAME_CALLABLE="tests.distributed.hostname.hostname",
            AIRFLOW__CORE__DAGS_FOLDER=str(self.dags),
            AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
            AIRFLOW__CORE__PARALLELISM=str(2 * WORKER_CONCURRENCY),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=self.postgres.url,
            AIRFLOW__CELERY__BROKER_URL=self.redis.url,
            AIRFLOW__CELERY__RESULT_BACKEND=f"db+postgresql+psycopg2://postgres@127.0.0.1:{self.postgres.port}/airflow",
            AIRFLOW__CELERY__WORKER_CONCURRENCY=str(WORKER_CONCURRENCY),
            # The example DAGs poll at about the emulator's render time (the demo's is 3 s).
            IMAGEN_EXAMPLES_EXPECTED_RENDER="1.5",
            **self.secrets,
            **FAULT_SETTINGS,
        )
        env.pop("AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL", None)
        env.update(FAULT_SETTINGS)
        env.update(self.extra_env)
        return env

    def _component(self, name: str, host: str, argv: list[str]) -> Component:
        home = self.root / host
        home.mkdir(exist_ok=True)
        comp = Component(name, [str(BIN / "airflow"), *argv], home / f"{name}.log", self.host_env(host), home)
        self.components[name] = comp
        return comp

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 300.0) -> None:
        self.dags.mkdir(parents=True)
        for path in self.dag_files:
            (self.dags / path.name).symlink_to(path)
        self.postgres.start()
        self.redis.start()
        self.emulator.start()
        self.emulator.reset()
        self.home.mkdir(exist_ok=True)
        self.env = self.host_env("main")
        migrate = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"],
            env=self.env, cwd=self.home, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        (self.home / "migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{tail(self.home / 'migrate.log')}")
        for name in ("api-server", "scheduler", "dag-processor"):
            self._component(name, "main", [name])
        for name in WORKERS:
            argv = ["celery", "worker", "--celery-hostname", f"{name}@%h",
                    "--concurrency", str(WORKER_CONCURRENCY), "--skip-serve-logs"]  # fmt: skip
            self._component(name, name, argv)
        for name in TRIGGERERS:
            self._component(name, name, ["triggerer", "--skip-serve-logs"])
        for comp in self.components.values():
            comp.start()
        self.wait_healthy(timeout)
        for name in WORKERS:
            self.wait_worker_ready(name, timeout)
        wait_until(lambda: len(self.live_triggerers()) == 2, timeout, "two triggerers to heartbeat")
        wait_until(self._dags_ready, timeout, "the DAGs to be parsed", interval=1.0)

    def wait_worker_ready(self, name: str, timeout: float = 120.0) -> None:
        comp = self.components[name]

        def ready() -> bool:
            if not comp.alive():
                raise StackError(f"{name} exited:\n{tail(comp.log)}")
            return " ready." in comp.log.read_text(errors="replace").rsplit("===== start", 1)[-1]

        wait_until(ready, timeout, f"{name} to be ready", interval=0.5)

    def restart(self, name: str) -> None:
        """Start a component again (after a test killed it) and wait until it serves."""
        self.components[name].start()
        if name in WORKERS:
            self.wait_worker_ready(name)
        elif name in TRIGGERERS:
            wait_until(lambda: name in {t["hostname"] for t in self.live_triggerers()}, 120, f"{name} up")
        else:
            self.wait_healthy()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to every Airflow component and the emulator at once (SIGKILL after ``grace``), then
        Redis and PostgreSQL, then sweep our sessions: nothing may survive."""
        running = [c for c in [*self.components.values(), self.emulator] if c.alive()]
        for comp in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(comp.pid, signal.SIGCONT)  # a test may have frozen one
                comp.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        for comp in running:
            try:
                comp.proc.wait(timeout=max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                with contextlib.suppress(Exception):
                    comp.kill()
        if self.redis.alive():
            self.redis.stop()
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None
        self.postgres.stop()
        self.sweep()

    def all_sessions(self) -> list[int]:
        sessions = [*super().all_sessions(), *self.redis.sessions]
        if self.postgres.session is not None:
            sessions.append(self.postgres.session)
        return sessions

    # -- observation -----------------------------------------------------------------------------

    def _dags_ready(self) -> bool:
        errors = self.sql("SELECT filename, stacktrace FROM import_error")
        if errors:
            raise StackError(f"DAG import errors: {errors}")
        rows = self.sql(
            "SELECT COUNT(*) AS n FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
            "WHERE (d.dag_id LIKE 'imagen_dist_%%' OR d.dag_id = 'imagen_prompt_backfill') "
            "AND NOT d.is_paused AND NOT d.is_stale"
        )
        return (bool(rows) and rows[0]["n"] >= 3) or (self.dag_files != DAG_FILES and self._any_dag())

    def _any_dag(self) -> bool:
        rows = self.sql("SELECT COUNT(*) AS n FROM dag WHERE NOT is_paused AND NOT is_stale")
        return bool(rows) and rows[0]["n"] >= 1

    def sql(self, query: str, *params: Any) -> list[dict[str, Any]]:
        """One read-only query on the metadata DB (``?`` placeholders, as for SQLite)."""
        import psycopg2
        import psycopg2.extras

        query = query.replace("?", "%s")
        for attempt in range(5):
            try:
                if self._db is None or self._db.closed:
                    self._db = psycopg2.connect(self.postgres.dsn, connect_timeout=10)
                    self._db.set_session(readonly=True, autocommit=True)
                with self._db.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                    cur.execute(query, params)
                    return [dict(row) for row in cur.fetchall()]
            except psycopg2.errors.UndefinedTable:
                return []
            except psycopg2.OperationalError:
                self._db = None
                if attempt == 4:
                    raise
                time.sleep(0.5)
        return []

    def live_triggerers(self, within: float = 10.0) -> list[dict[str, Any]]:
        """Triggerer jobs that heartbeat in the last ``within`` seconds: id and hostname."""
        return self.sql(
            "SELECT id, hostname FROM job WHERE job_type = 'TriggererJob' AND state = 'running' "
            "AND latest_heartbeat > now() - make_interval(secs => ?)",
            within,
        )

    def triggerer_of(self, trigger_id: int) -> str | None:
        rows = self.sql(
            "SELECT j.hostname FROM trigger t JOIN job j ON j.id = t.triggerer_id WHERE t.id = ?", trigger_id
        )
        return str(rows[0]["hostname"]) if rows else None

    def log_folder(self, host: str, dag_id: str, run_id: str, task_id: str) -> Path:
        return self.root / host / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"

    def task_logs(self, dag_id: str, run_id: str, task_id: str = "generate") -> str:
        """Every host's log files of one task (all tries, trigger logs included), host by host."""
        parts = []
        for host in ("main", *WORKERS, *TRIGGERERS):
            folder = self.log_folder(host, dag_id, run_id, task_id)
            for path in sorted(folder.rglob("*")) if folder.exists() else ():
                if path.is_file():
                    parts.append(f"===== {host}: {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def passes(self, dag_id: str, run_id: str, task_id: str = "generate") -> list[dict[str, Any]]:
        """Every pass of a task that started on a worker, from the workers' own task logs: the host, the
        try, the time it started (epoch seconds) and whether it was ``execute`` or a resume."""
        found = []
        for host in WORKERS:
            folder = self.log_folder(host, dag_id, run_id, task_id)
            for path in sorted(folder.glob("attempt=*.log")) if folder.exists() else ():
                attempt = int(re.search(r"attempt=(\d+)", path.name).group(1))  # type: ignore[union-attr]
                for line in path.read_text(errors="replace").splitlines():
                    record = _json_line(line)
                    if record and PASS_START.search(str(record.get("event", ""))):
                        found.append(
                            {
                                "host": host,
                                "try": attempt,
                                "at": _epoch(record.get("timestamp")),
                                "event": str(record.get("event"))[:80],
                            }
                        )
        return sorted(found, key=lambda p: p["at"] or 0.0)

    def wait_healthy(self, timeout: float = 120.0, parts: Iterable[str] | None = None) -> None:
        wanted = tuple(parts or ("metadatabase", "scheduler", "triggerer", "dag_processor"))

        def healthy() -> bool:
            for comp in self.components.values():
                if comp.proc is not None and not comp.alive() and comp.name not in self.expected_dead:
                    raise StackError(f"{comp.name} exited ({comp.proc.returncode}):\n{tail(comp.log)}")
            body = self.health()
            return all((body.get(p) or {}).get("status") == "healthy" for p in wanted)

        wait_until(healthy, timeout, f"{', '.join(wanted)} to be healthy", interval=1.0)

    #: Components a test killed on purpose and has not started again (not an error while waiting).
    expected_dead: set[str] = set()

    def wait_run_components_alive(self) -> None:
        """Raise when a component died that no test killed on purpose."""
        for comp in self.components.values():
            if comp.proc is not None and not comp.alive() and comp.name not in self.expected_dead:
                raise StackError(f"{comp.name} died during the run:\n{tail(comp.log)}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 120.0) -> str:
        def ended() -> str | None:
            self.wait_run_components_alive()
            state = self.run_state(dag_id, run_id)
            return state if state in ("success", "failed") else None

        return str(wait_until(ended, timeout, f"{dag_id} {run_id} to end", interval=0.5))

    def airflow(self, *argv: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """An ``airflow`` CLI call on the main host."""
        return subprocess.run(
            [str(BIN / "airflow"), *argv],
            env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip


#: The first line a pass writes in its try's log on the worker (the supervisor starting the task).
PASS_START = re.compile(r"^::group::Pre Execute")


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _epoch(stamp: Any) -> float | None:
    from datetime import datetime

    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _fernet_key() -> str:
    import base64

    return base64.urlsafe_b64encode(os.urandom(32)).decode()
