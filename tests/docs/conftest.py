"""Fixtures the doc tests share: a real batch output to read, and a fake task context to run operators in."""

from __future__ import annotations

import json
import shutil
import types
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the example projects the session will check, so they run alongside the other tests."""
    from tests.docs import projects

    for item in session.items:
        if getattr(item, "originalname", None) == "test_example_project_runs":
            projects.start(item.callspec.params["page"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.docs import projects

    projects.stop_all()


#: The identity the docs use in their examples of reading a journal or a manifest.
DOCS_DAG_ID = "imagen_catalog"
DOCS_RUN_ID = "manual__2026-01-01"


class FakeTaskInstance:
    """Just what the operators read from ``context["ti"]`` (identity and XCom pushes)."""

    def __init__(self, task_id: str, *, dag_id: str = "docs", run_id: str = "docs_run") -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = dag_id, task_id, run_id, -1
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def fake_context(ti: FakeTaskInstance) -> dict[str, Any]:
    """Return the parts of an Airflow context the provider's operators use."""
    return {"ti": ti, "outlet_events": defaultdict(lambda: types.SimpleNamespace(extra=None))}


@pytest.fixture(scope="session")
def batch_output(emulator_server: Any, tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """A real batch run (emulator, sync) into ``<root>/imagery/catalog``: images, journal, manifest.

    Returns ``root`` (the folder) and ``result`` (what the operator returned to XCom).
    """
    from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

    base = tmp_path_factory.mktemp("batch-output")
    rows = [
        {"prompt_id": "teapot", "prompt": "A ceramic teapot, product photo", "size": ["1:1", "16:9"]},
        {"prompt_id": "lamp", "prompt": "一盏黄铜台灯，产品摄影", "size": None},
        {"prompt_id": "vase", "prompt": "A glass vase [[moderate]]", "size": None},
        {"prompt_id": "bad/id", "prompt": "never sent", "size": None},
    ]
    conn = {"conn_type": "imagen", "host": emulator_server.base_url, "password": emulator_server.api_key}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_IMAGEN_DEFAULT", json.dumps(conn))
        operator = ImagenBatchGenerateOperator(
            task_id="generate",
            prompts=rows,
            output_path=str(base / "imagery" / "catalog"),
            expected_render=0.2,
            poll_interval=0.1,
            deferrable=False,
        )
        ti = FakeTaskInstance("generate", dag_id=DOCS_DAG_ID, run_id=DOCS_RUN_ID)
        result = operator.execute(fake_context(ti))  # type: ignore[arg-type]
    return types.SimpleNamespace(root=base, result=result)


@pytest.fixture
def snippet_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory for one snippet."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work


def copy_tree(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, dirs_exist_ok=True)


@pytest.fixture
def s3_as_aws_default(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The local S3 server as the ``aws_default`` connection, with an empty bucket ``my-bucket``."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region_name="us-east-1",
    )
    existing = {b["Name"] for b in client.list_buckets()["Buckets"]}
    if "my-bucket" in existing:
        for item in client.list_objects_v2(Bucket="my-bucket").get("Contents", []):
            client.delete_object(Bucket="my-bucket", Key=item["Key"])
    else:
        client.create_bucket(Bucket="my-bucket")
    conn = {"conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": s3_endpoint}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
    return s3_endpoint
