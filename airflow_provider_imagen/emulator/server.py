"""Run the emulator in a background thread, for tests, benchmarks and demos inside one Python process.

``EmulatorServer`` binds its socket itself (port 0 picks a free port), so it knows its real base URL before
uvicorn starts and can hand it to the app for media URLs. Control calls (``ledger``, ``configure``...) go
straight to the shared :class:`EmulatorState` rather than over HTTP, so they are cheap and always consistent.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from airflow_provider_imagen.emulator.app import create_app
from airflow_provider_imagen.emulator.config import EmulatorConfig
from airflow_provider_imagen.emulator.state import EmulatorState


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host``:``port`` (0 = any free port), ready to hand to uvicorn.

    Listening at once means clients that connect before uvicorn's loop runs wait in the backlog instead of
    being refused, so the address can be announced as soon as this returns.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def base_url_for(host: str, port: int) -> str:
    """Return the ``http://host:port`` a client should use (wildcard hosts map to loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def uvicorn_config(app: Any, **overrides: Any) -> uvicorn.Config:
    """Return the uvicorn settings the emulator always uses (quiet, no access log, no lifespan)."""
    settings: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,
        "lifespan": "off",
        "timeout_graceful_shutdown": 2,
    }
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


class EmulatorServer:
    """A reAPI emulator served by uvicorn in a daemon thread; use it as a context manager.

    >>> with EmulatorServer(EmulatorConfig.fast()) as emulator:  # doctest: +SKIP
    ...     auth = {"Authorization": f"Bearer {emulator.api_key}"}
    ...     httpx.get(f"{emulator.api_url}/balance", headers=auth).json()
    {'balance': 1000000}
    """

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        """Prepare (but do not start) a server; ``port=0`` picks a free port at :meth:`start`."""
        self.host = host
        self.port = port
        self.state = EmulatorState(config)
        self.app = create_app(state=self.state)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 15.0) -> EmulatorServer:
        """Bind, start uvicorn in a daemon thread and return once it is serving."""
        if self._thread is not None:
            raise RuntimeError("EmulatorServer is already running")
        sock = bind_socket(self.host, self.port)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self.app.state.public_base_url = self.base_url
        server = uvicorn.Server(uvicorn_config(self.app))
        self._server = server
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="reapi-emulator", daemon=True
        )
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"reAPI emulator did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for its thread; safe to call twice."""
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
        if sock is not None:
            sock.close()

    def __enter__(self) -> EmulatorServer:
        """Start the server (if not yet running) and return it."""
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ addresses

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the server (the real port once started)."""
        return base_url_for(self.host, self.port)

    @property
    def api_url(self) -> str:
        """The reAPI base URL clients should use: ``<base_url>/api/v1``."""
        return f"{self.base_url}/api/v1"

    @property
    def api_key(self) -> str:
        """The first accepted API key."""
        return self.state.config.api_keys[0]

    @property
    def config(self) -> EmulatorConfig:
        """The current configuration."""
        return self.state.config

    # ------------------------------------------------------------------ control

    def ledger(self) -> dict[str, Any]:
        """Return the same JSON as ``GET /_emulator/ledger``."""
        return self.state.ledger()

    def tasks(self) -> list[dict[str, Any]]:
        """Return the same JSON as ``GET /_emulator/tasks``."""
        return self.state.tasks()

    def configure(self, **fields: Any) -> EmulatorConfig:
        """Change knobs at runtime (same as ``POST /_emulator/config``); returns the new config."""
        return self.state.configure(fields)

    def reset(self) -> None:
        """Clear tasks, ledger and balances, keeping the config (same as ``POST /_emulator/reset``)."""
        self.state.reset()

    def set_balance(self, credits: int, key: str | None = None) -> None:
        """Set a key's balance (default: :attr:`api_key`)."""
        self.state.set_balance(key or self.api_key, credits)
