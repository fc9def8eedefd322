"""Test-wide setup: an isolated Airflow home and one real emulator on loopback for the whole run.

Airflow reads its configuration at import, so the environment is set here, before any test module
imports it. Tests talk to the emulator over HTTP exactly as users' DAGs talk to reAPI.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="imagen-airflow-home-"))
#: ``dag.test()`` runs only DAGs of the dags folder, so it holds both the example DAGs users copy and
#: the DAGs written for the tests (as links: nothing is copied, nothing goes stale).
DAGS_FOLDER = _AIRFLOW_HOME / "dags"
DAGS_FOLDER.mkdir()
(DAGS_FOLDER / "examples").symlink_to(ROOT / "dags", target_is_directory=True)
(DAGS_FOLDER / "tests").symlink_to(ROOT / "tests" / "dags", target_is_directory=True)
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")

from airflow_provider_imagen.emulator import EmulatorConfig, EmulatorServer  # noqa: E402

#: The emulator's knobs every test starts from: fast renders at Imagen 4's pixel sizes.
BASE_CONFIG = EmulatorConfig.fast()


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    with EmulatorServer(BASE_CONFIG) as server:
        yield server


@pytest.fixture
def emulator(emulator_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The shared emulator, reset to the base knobs with an empty ledger for this test."""
    emulator_server.configure(**_config_fields(BASE_CONFIG))
    emulator_server.reset()
    yield emulator_server
    emulator_server.configure(**_config_fields(BASE_CONFIG))


def _config_fields(config: EmulatorConfig) -> dict[str, object]:
    from dataclasses import fields

    return {f.name: getattr(config, f.name) for f in fields(config)}


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated SQLite metadata DB for ``dag.test()`` runs (about 6 s, once per session)."""
    from airflow.utils.db import initdb

    initdb()


@pytest.fixture
def imagen_connection(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the ``imagen_default`` connection at the emulator (JSON form keeps typed extras)."""
    conn = {"conn_type": "imagen", "host": emulator.base_url, "password": emulator.api_key}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_DEFAULT", json.dumps(conn))
    return "imagen_default"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto), so nothing can silently assume a local disk."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).create_bucket(Bucket="imagen")
    yield url
    server.stop()
