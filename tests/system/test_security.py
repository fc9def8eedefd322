"""Security across every run of the session: no API key and no signed image URL anywhere Airflow or the
provider writes; downloads refuse what is not an image or is too big; output names stay inside the
output root.

The key of the stack is unique to the session (``rk_live_<random>``), so any hit is a leak. The files
grepped are everything under the stack's ``AIRFLOW_HOME`` (task and trigger logs of every try, the
scheduler's, triggerer's, dag-processor's and api-server's own output, the SQLite metadata DB with its
XComs, trigger kwargs, Asset events and rendered fields, even rows already deleted), every test's output
and journal folders, and every object in the S3 bucket. This module runs after the fault modules (file
order), so in a full run it checks their artefacts too; run alone, it makes its own deferring run first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_provider_imagen.api.client import ClientSettings, ImagenClient
from airflow_provider_imagen.api.errors import DownloadError
from airflow_provider_imagen.api.models import ImageRequest
from airflow_provider_imagen.batch.journal import Journal
from airflow_provider_imagen.batch.manifest import read_manifest
from airflow_provider_imagen.batch.mirror import image_file_name, mirror_image
from tests.system import conftest as system
from tests.system.checks import SIGNED_URL, leaks, write_table
from tests.system.stack import Stack, wait_until
from tests.system.test_bad_input import WRONG_KEY

pytestmark = pytest.mark.system


def test_trigger_kwargs_xcom_and_events_carry_no_key_url_or_prompt(stack: Stack, workdir: Path) -> None:
    """Read what Airflow stores while the batch is deferred (the trigger row) and after it (XCom, the
    Asset event): JSON scalars and ids only; no key, no URL, no prompt."""
    stack.emulator.reset(latency_mean=6.0, latency_jitter=0.5)
    prompts = [f"secret-prompt-{i} a teal armchair" for i in range(5)]
    table = write_table(
        workdir / "p.parquet", [{"prompt_id": f"s{i}", "prompt": p} for i, p in enumerate(prompts)]
    )
    run_id = stack.trigger(
        "imagen_sys_defer", prompts=table, output_path=str(workdir / "out"), journal_path=str(workdir / "j")
    )
    stack.wait_ti("imagen_sys_defer", run_id, {"deferred"}, timeout=120)
    (trigger,) = wait_until(
        lambda: stack.sql(
            "SELECT t.classpath, t.kwargs FROM trigger t JOIN task_instance ti ON ti.trigger_id = t.id "
            "WHERE ti.dag_id = 'imagen_sys_defer' AND ti.run_id = ?",
            run_id,
        ),
        30,
        "the trigger row",
    )
    assert stack.wait_run("imagen_sys_defer", run_id, timeout=120) == "success"
    xcom = stack.xcom_return("imagen_sys_defer", run_id)
    events = stack.sql("SELECT extra FROM asset_event")
    stored = " ".join([str(trigger["kwargs"]), json.dumps(xcom), *(str(e["extra"]) for e in events)])
    print(f"\n[security] trigger kwargs as stored: {str(trigger['kwargs'])[:400]}")

    assert trigger["classpath"] == "airflow_provider_imagen.triggers.imagen.ImagenTaskTrigger"
    assert stack.api_key not in stored
    assert "http://" not in stored.replace(f"{workdir}", "") and "sig=" not in stored
    assert not any(p in stored for p in prompts)
    assert set(xcom) == {"manifest_uri", "counts", "credits", "this_try"}


def test_no_key_and_no_signed_url_in_any_log_db_manifest_journal_or_object(
    stack: Stack, s3_server: Any
) -> None:
    secrets = [stack.api_key.encode(), WRONG_KEY.encode()]
    roots = [stack.home, system._state["home"] / "tests"]
    found = leaks(roots, secrets)
    # The dag.test()/execute() runs of this session keep their logs and DB in the test session's home.
    session_home = Path(os.environ["AIRFLOW_HOME"])
    found += leaks([session_home], [WRONG_KEY.encode()])
    client = s3_server.client()
    objects = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=system.S3_BUCKET):
        for obj in page.get("Contents", []):
            objects += 1
            body = client.get_object(Bucket=system.S3_BUCKET, Key=obj["Key"])["Body"].read()
            for secret in secrets:
                if secret in body:
                    found.append(f"s3://{system.S3_BUCKET}/{obj['Key']}: the key")
            if SIGNED_URL.search(body):
                found.append(f"s3://{system.S3_BUCKET}/{obj['Key']}: a signed URL")
    files = sum(1 for root in roots for p in root.rglob("*") if p.is_file())
    logs = list(stack.home.rglob("*.log"))
    print(
        f"\n[security] grepped {files} files ({len(logs)} logs) and {objects} S3 objects: {len(found)} leaks"
    )

    assert logs and any("trigger" in p.name for p in logs)  # trigger logs were there to grep
    assert not found, "\n".join(found)


def test_downloads_refuse_html_and_bodies_over_the_cap_and_write_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """The emulator's CDN answers ``[[html]]`` tasks with an HTML page (as a CDN error page would); a
    client capped at 1,000 bytes meets a normal PNG. Both are refused, and nothing lands at the
    destination; the same image without the cap is mirrored."""
    base = stack.emulator.base_url
    with (
        ImagenClient(ClientSettings(api_key=stack.api_key, base_url=base)) as client,
        ImagenClient(ClientSettings(api_key=stack.api_key, base_url=base, max_image_bytes=1000)) as capped,
    ):
        ids = [client.submit(ImageRequest(p, "1:1")).id for p in ("a lamp [[html]]", "a lamp, studio light")]

        def rendered() -> list[Any] | None:
            found = [client.get_task(i) for i in ids]
            return found if all(t.is_terminal for t in found) else None

        tasks = wait_until(rendered, 30, "the two renders")
        html_url, image_url = (t.image_url for t in tasks)
        assert html_url and image_url
        with pytest.raises(DownloadError, match="text/html") as refused_html:
            mirror_image(client, html_url, _path(tmp_path / "html.png"))
        with pytest.raises(DownloadError, match="1000") as refused_big:
            mirror_image(capped, image_url, _path(tmp_path / "big.png"))
        mirror_image(client, image_url, _path(tmp_path / "ok.png"))  # the same image, uncapped: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]  # nothing half-written
    for error in (refused_html.value, refused_big.value):
        assert not SIGNED_URL.search(str(error).encode()) and stack.api_key not in str(error)


def _path(path: Path) -> Any:
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(f"file://{path}")


@pytest.mark.parametrize(
    "prompt_id",
    [
        "../../etc/passwd",
        "..",
        ".",
        "/abs",
        "a\\..\\b",
        "~root",
        "%2e%2e%2fx",
        "／..／x",
        "CON",
        "x" * 300,
        "",
    ],
)
def test_image_names_stay_inside_the_output_root(prompt_id: str, tmp_path: Path) -> None:
    """Even ids the table validation would refuse cannot make the mirror write outside ``images/``."""
    root = (tmp_path / "out" / "images").resolve()
    name = image_file_name(prompt_id, "1:1", 0)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert (root / name).resolve().parent == root


def test_journal_paths_stay_inside_the_journal_root(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    journal = Journal(str(root), dag_id="../../d", run_id="../r/..", task_id="/etc", map_index=-1)
    journal.append([{"e": "try", "k": "/try", "ts": 0.0}])
    (written,) = [p for p in tmp_path.rglob("*.jsonl")]
    assert root.resolve() in written.resolve().parents


def test_a_bad_prompt_id_on_the_stack_wrote_nothing_outside_its_output(stack: Stack) -> None:
    """Every file the session's runs wrote is inside a test's own folder, under ``out/`` or ``j/``."""
    tests_root = system._state["home"] / "tests"
    outside = []
    for path in tests_root.rglob("*"):
        if path.is_file():
            relative = path.relative_to(tests_root).parts
            if len(relative) < 2 or relative[1] not in ("out", "j", "in", "p.parquet", "prompts.parquet"):
                outside.append(str(path))
    assert not outside, outside
    for manifest_dir in tests_root.glob("*/out"):
        # Every manifest of the folder: reruns into one output path leave one per run id.
        for path in sorted((manifest_dir / "manifests").rglob("*.parquet")):
            for uri in read_manifest(str(path))["image_uri"].dropna():
                assert Path(uri.removeprefix("file://")).resolve().is_relative_to(manifest_dir.resolve())


def test_the_stack_stops_and_leaves_no_process_behind(system_stack: Stack) -> None:
    """Last test of the session: stop everything we started and prove with psutil that nothing is left."""
    pids = [c.pid for c in system_stack.components.values()] + [system_stack.emulator.pid]
    system._shutdown()
    assert not system_stack.leftovers()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)
