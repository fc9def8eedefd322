"""Fixtures for the emulator's own tests: one real server per module, reset before each test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from airflow_provider_imagen.emulator import EmulatorConfig, EmulatorServer

#: Fast tasks (0.1-0.3 s), quarter-size images, reproducible faults.
EMU_BASE_CONFIG = EmulatorConfig.fast(seed=1234)


class Api:
    """A tiny synchronous reAPI client for tests: no retries, nothing hidden."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.api_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=10
        )

    def submit(self, prompt: str = "a red fox in the snow", **fields: Any) -> httpx.Response:
        body = {"model": "imagen-4-0", "prompt": prompt, **fields}
        return self.http.post("/images/generations", json=body)

    def submit_ok(self, prompt: str = "a red fox in the snow", **fields: Any) -> str:
        response = self.submit(prompt, **fields)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def poll(self, task_id: str) -> httpx.Response:
        return self.http.get(f"/tasks/{task_id}")

    def wait(self, task_id: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.poll(task_id)
            assert response.status_code == 200, response.text
            body = response.json()
            if body["status"] != "processing":
                return body
            assert time.monotonic() < deadline, f"task {task_id} still processing after {timeout}s"
            time.sleep(0.03)

    def balance(self) -> int:
        response = self.http.get("/balance")
        assert response.status_code == 200, response.text
        return response.json()["balance"]

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def emu_server() -> Iterator[EmulatorServer]:
    with EmulatorServer(EMU_BASE_CONFIG) as server:
        yield server


@pytest.fixture
def emu(emu_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The module's emulator with the base knobs, no tasks and a fresh ledger."""
    emu_server.configure(**EMU_BASE_CONFIG.to_dict())
    emu_server.reset()
    yield emu_server
    emu_server.configure(**EMU_BASE_CONFIG.to_dict())


@pytest.fixture
def api(emu: EmulatorServer) -> Iterator[Api]:
    client = Api(emu)
    yield client
    client.close()
