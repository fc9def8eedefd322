"""ImagenBatchGenerateOperator in real runs against the emulator: the manifest matches the ledger."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from airflow.triggers.base import TriggerEvent

from airflow_provider_imagen.api.models import PIXEL_SIZES, SIZES
from airflow_provider_imagen.batch.engine import BatchSettings
from airflow_provider_imagen.batch.manifest import MANIFEST_COLUMNS, read_manifest
from airflow_provider_imagen.triggers.imagen import ImagenTaskTrigger
from tests.airflow_helpers import run_dag, task_states, try_numbers, xcoms

pytestmark = pytest.mark.usefixtures("airflow_db", "imagen_connection")


def knobs(monkeypatch: pytest.MonkeyPatch, **values: Any) -> None:
    """Set the operator's non-templated arguments for the next parse of the test DAGs."""
    monkeypatch.setenv("IMAGEN_TEST_BATCH_KNOBS", json.dumps(values))


def table(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def run_batch(tmp_path: Path, prompts: str, flavour: str = "deferrable") -> tuple[Any, pd.DataFrame]:
    dr = run_dag(
        f"imagen_test_batch_{flavour}",
        prompts=prompts,
        output_path=str(tmp_path / "out"),
        journal_path=str(tmp_path / "journal"),
    )
    result = xcoms(dr).get(("generate", "return_value"))
    manifest = read_manifest(result["manifest_uri"]) if result else pd.DataFrame()
    return dr, manifest


def mixed_rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        prompt = f"catalog item {i}, studio light"
        if i % 10 == 3:
            prompt = f"第{i}号商品，白色背景，产品摄影"
        if i % 29 == 5:
            prompt += " [[moderate]]"
        if i % 31 == 7:
            prompt += " [[fail]]"
        rows.append({"prompt_id": f"sku-{i:04d}", "prompt": prompt, "size": SIZES[i % 5]})
    return rows


@pytest.fixture
def trigger_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The task ids of every trigger run (``dag.test()`` runs triggers in this process): one per deferral."""
    runs: list[list[str]] = []
    original = ImagenTaskTrigger.run

    async def run(self: ImagenTaskTrigger) -> AsyncIterator[TriggerEvent]:
        runs.append(list(self.task_ids))
        async for event in original(self):
            yield event

    monkeypatch.setattr(ImagenTaskTrigger, "run", run)
    return runs


def test_300_rows_manifest_matches_the_ledger_row_by_row(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trigger_runs: list[list[str]]
) -> None:
    knobs(monkeypatch, max_in_flight=60, max_submit_rate=None)
    rows = mixed_rows(300)
    dr, manifest = run_batch(tmp_path, table(tmp_path / "prompts.parquet", rows))
    assert task_states(dr) == {"generate": "success"}
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == 300 and manifest["prompt_id"].tolist() == [r["prompt_id"] for r in rows]

    tasks = {t["id"]: t for t in emulator.tasks()}
    assert len(tasks) == 300  # one paid task per row, no more
    assert set(manifest["task_id"]) == set(tasks)
    for row in manifest.itertuples():
        task = tasks[row.task_id]
        assert (task["prompt"], task["size"]) == (row.prompt, row.size)
        expected = {"completed": "completed", "moderated": "moderated", "failed": "failed"}[task["outcome"]]
        assert row.status == expected, row
        if row.status == "completed":
            data = Path(row.image_uri.removeprefix("file://")).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.bytes
            assert (row.width, row.height) == PIXEL_SIZES[row.size]
            assert row.task_id in Path(row.image_uri).name  # a name no other paid task can take
        elif row.status == "moderated":  # the API's own words, not a generic reason
            assert (row.error_code, row.error_message) == (80006, "Request violates content policy")
        else:
            assert row.error_code is not None and row.error_message, row
    ledger = emulator.ledger()
    assert int(manifest["credits"].sum()) == ledger["net_credits"]
    assert max(ledger["submissions_by_prompt"].values()) == 1
    result = xcoms(dr)[("generate", "return_value")]
    assert result["credits"] == ledger["net_credits"]
    assert result["counts"]["moderated"] == ledger["status_counts"]["moderated"] > 0
    assert result["counts"]["failed"] == ledger["status_counts"]["failed"] > 0
    assert set(result) == {"manifest_uri", "counts", "credits", "this_try"}
    assert result["this_try"] == {"submitted": 300, "reattached": 0, "credits": ledger["net_credits"]}
    assert len(trigger_runs) >= 3  # deferred between refills


def test_one_row_fanned_out_to_all_ratios_and_two_variations(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs(monkeypatch, variations=2)
    rows = [{"prompt_id": "hero", "prompt": "a mountain lodge at dusk", "size": list(SIZES)}]
    dr, manifest = run_batch(tmp_path, table(tmp_path / "p.parquet", rows), flavour="sync")
    assert task_states(dr) == {"generate": "success"}
    assert sorted(zip(manifest["size"], manifest["variation"], strict=True)) == sorted(
        (s, v) for s in SIZES for v in (0, 1)
    )
    assert (manifest["status"] == "completed").all()
    assert manifest["image_uri"].nunique() == 10 and manifest["sha256"].nunique() == 10
    assert emulator.ledger()["submissions_by_prompt"] == {"a mountain lodge at dusk": 10}


def test_budget_stops_exactly_at_the_budget(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs(monkeypatch, max_credits=46 * 7 + 45, max_in_flight=3)
    rows = [{"prompt_id": f"b{i}", "prompt": f"budget image {i}"} for i in range(20)]
    dr, manifest = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "success"}
    assert emulator.ledger()["tasks_created"] == 7
    assert manifest["status"].tolist() == ["completed"] * 7 + ["skipped_budget"] * 13  # table order kept
    assert int(manifest["credits"].sum()) == 46 * 7 == emulator.ledger()["net_credits"]
    assert "max_credits=367" in manifest["error_message"].iloc[-1]


def test_invalid_rows_are_recorded_and_never_sent(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs(monkeypatch)
    rows = [
        {"prompt_id": "ok-1", "prompt": "a valid prompt", "size": "1:1"},
        {"prompt_id": "empty", "prompt": "   ", "size": "1:1"},
        {"prompt_id": "wide", "prompt": "too wide", "size": "2:1"},
        {"prompt_id": "ok-1", "prompt": "duplicate id", "size": "1:1"},
        {"prompt_id": "../escape", "prompt": "path traversal", "size": "1:1"},
        {"prompt_id": "long", "prompt": "x" * 4001, "size": "1:1"},
        {"prompt_id": "ok-2", "prompt": "another valid prompt", "size": "9:16"},
    ]
    dr, manifest = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "success"}
    assert emulator.ledger()["submissions_by_prompt"] == {"a valid prompt": 1, "another valid prompt": 1}
    assert manifest["status"].tolist() == [
        "completed",
        "invalid",
        "invalid",
        "invalid",
        "invalid",
        "invalid",
        "completed",
    ]
    reasons = manifest["error_message"].tolist()
    assert "row 1" in reasons[1] and "whitespace" in reasons[1]
    assert "size='2:1'" in reasons[2]
    assert "duplicate" in reasons[3] and "row 0" in reasons[3]
    assert "prompt_id" in reasons[4]
    assert "4001 characters" in reasons[5]
    assert (manifest.loc[manifest["status"] == "invalid", "credits"] == 0).all()


def test_on_invalid_fail_stops_before_any_post(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs(monkeypatch, on_invalid="fail")
    rows = [{"prompt_id": "a", "prompt": "fine"}, {"prompt_id": "b", "prompt": ""}]
    dr, _ = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "failed"}
    assert try_numbers(dr)["generate"] == 1
    assert emulator.ledger()["posts"] == 0


def test_ambiguous_submit_is_unknown_not_paid_twice(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs(monkeypatch)
    rows = [{"prompt_id": "amb", "prompt": "[[ambiguous]] lost"}, {"prompt_id": "fine", "prompt": "fine"}]
    dr, manifest = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "success"}
    assert manifest["status"].tolist() == ["unknown_submit", "completed"]
    assert manifest["credits"].tolist() == [46, 46]
    ledger = emulator.ledger()
    assert ledger["posts"] == 2 and ledger["submissions_by_prompt"]["[[ambiguous]] lost"] == 1
    assert int(manifest["credits"].sum()) == ledger["net_credits"]  # the ambiguous task was charged


def test_fail_on_error_rate_fails_after_writing_the_manifest(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs(monkeypatch, fail_on_error_rate=0.2, retries=0)
    rows = [{"prompt_id": f"f{i}", "prompt": f"img {i}" + (" [[fail]]" if i < 3 else "")} for i in range(10)]
    dr, _ = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "failed"}
    (manifest_file,) = (tmp_path / "out" / "manifests").rglob("*.parquet")
    assert read_manifest(str(manifest_file))["status"].value_counts().to_dict() == {
        "completed": 7,
        "failed": 3,
    }


def test_out_of_credits_mid_batch_stops_submitting_and_finishes_the_rest(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs(monkeypatch, max_in_flight=4, retries=0)
    emulator.configure(starting_balance=46 * 6)
    emulator.reset()
    rows = [{"prompt_id": f"c{i}", "prompt": f"credit {i}"} for i in range(10)]
    dr, _ = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "failed"}  # InsufficientCreditsError, after the manifest
    (manifest_file,) = (tmp_path / "out" / "manifests").rglob("*.parquet")
    manifest = read_manifest(str(manifest_file))
    assert manifest["status"].value_counts().to_dict() == {"completed": 6, "skipped_budget": 4}
    assert emulator.ledger()["tasks_created"] == 6


def test_table_and_output_on_s3(emulator: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt table, images, journal and manifest all on an S3-compatible server: no local disk."""
    from airflow.sdk import ObjectStoragePath

    conn = {"conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": s3_endpoint}}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_S3", json.dumps(conn))
    knobs(monkeypatch)
    root = ObjectStoragePath("s3://imagen/batch-test/", conn_id="imagen_s3")
    rows = [{"prompt_id": f"s{i}", "prompt": f"s3 image {i}", "size": "1:1"} for i in range(6)]
    (root / "prompts" / "part-0.parquet").write_bytes(pd.DataFrame(rows).to_parquet())
    dr = run_dag(
        "imagen_test_batch_deferrable",
        prompts="s3://imagen_s3@imagen/batch-test/prompts/",
        output_path="s3://imagen_s3@imagen/batch-test/out",
        journal_path="s3://imagen_s3@imagen/batch-test/journal",
    )
    assert task_states(dr) == {"generate": "success"}
    manifest = read_manifest(xcoms(dr)[("generate", "return_value")]["manifest_uri"])
    assert (manifest["status"] == "completed").all()
    assert all(uri.startswith("s3://") for uri in manifest["image_uri"])
    assert len(list((root / "out" / "images").iterdir())) == 6
    assert any((root / "journal").rglob("*.jsonl"))
    assert emulator.ledger()["tasks_created"] == 6


def test_worker_killed_mid_submit_then_retried_pays_nothing_twice(emulator: Any, tmp_path: Path) -> None:
    """A real crash: SIGKILL the process running the batch halfway through its submits, then run the
    same task instance again (as Airflow's retry would): it re-attaches to every journalled task."""
    n = 80
    prompts = table(
        tmp_path / "p.parquet", [{"prompt_id": f"k{i}", "prompt": f"crash {i}"} for i in range(n)]
    )
    env = {**os.environ, "IMAGEN_TEST_BATCH_KNOBS": json.dumps({"max_in_flight": 200, "max_submit_rate": 25})}
    conf = json.dumps(
        {"prompts": prompts, "output_path": str(tmp_path / "out"), "journal_path": str(tmp_path / "j")}
    )
    airflow = [sys.executable, "-m", "airflow"]
    first = subprocess.Popen(
        [*airflow, "dags", "test", "-c", conf, "imagen_test_batch_sync"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started = time.monotonic()
    while emulator.ledger()["posts"] < n // 2 and time.monotonic() - started < 90 and first.poll() is None:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    posted_before_kill = emulator.ledger()["posts"]
    assert 0 < posted_before_kill < n

    db = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        (run_id,) = conn.execute(
            "select run_id from dag_run where dag_id='imagen_test_batch_sync' order by id desc limit 1"
        ).fetchone()
    retry = subprocess.run(
        [*airflow, "tasks", "test", "imagen_test_batch_sync", "generate", run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert retry.returncode == 0, retry.stdout[-3000:]
    ledger = emulator.ledger()
    assert max(ledger["submissions_by_prompt"].values()) == 1  # zero duplicate POSTs
    assert len(ledger["submissions_by_prompt"]) == ledger["tasks_created"]
    (manifest_file,) = (tmp_path / "out" / "manifests").rglob("*.parquet")
    manifest = read_manifest(str(manifest_file))
    counts = manifest["status"].value_counts().to_dict()
    assert counts.get("completed", 0) + counts.get("unknown_submit", 0) == n
    # At most the POSTs in flight when it was killed: one per concurrent submitter (local journal: one
    # request per journal segment).
    assert counts.get("unknown_submit", 0) <= BatchSettings().submit_concurrency
    assert int(manifest["credits"].sum()) >= ledger["net_credits"]  # an unknown submit is assumed charged


def test_lingering_on_the_worker_when_tasks_end_soon(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trigger_runs: list[list[str]]
) -> None:
    """With renders shorter than ``linger``, a deferrable batch waits on the worker: one try, no deferral."""
    knobs(monkeypatch, linger=5.0, max_in_flight=10)
    rows = [{"prompt_id": f"l{i}", "prompt": f"linger {i}"} for i in range(30)]
    dr, manifest = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "success"}
    assert (manifest["status"] == "completed").all()
    ledger = emulator.ledger()
    assert ledger["tasks_created"] == 30
    assert ledger["polls"] <= 3 * 30
    assert trigger_runs == []  # never deferred


def test_a_wrong_key_fails_before_any_post(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The balance is read first (free): a wrong key fails the task with the API's answer, nothing sent."""
    knobs(monkeypatch, retries=0)
    conn = {"conn_type": "imagen", "host": emulator.base_url, "password": "rk_wrong_key_for_the_batch"}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_DEFAULT", json.dumps(conn))
    rows = [{"prompt_id": f"w{i}", "prompt": f"wrong key {i}"} for i in range(5)]
    dr, _ = run_batch(tmp_path, table(tmp_path / "p.parquet", rows))
    assert task_states(dr) == {"generate": "failed"}
    assert emulator.ledger()["posts"] == 0 and emulator.ledger()["tasks_created"] == 0
    assert not (tmp_path / "journal").exists()  # nothing was about to be paid
    out = capfd.readouterr().out
    assert "AuthenticationError" in out and "10003" in out and "rk_wrong_key_for_the_batch" not in out


def test_images_at_the_wrong_pixel_size_are_not_filed_as_completed(emulator: Any, tmp_path: Path) -> None:
    """The API answers every image at 1/8 of Imagen 4's size: each row is ``wrong_size`` (paid, kept on
    storage, both sizes in the message), none ``completed``, and the run still ends."""
    emulator.configure(image_scale=0.125)
    rows = [{"prompt_id": f"w{i}", "prompt": f"a small lamp {i}", "size": SIZES[i]} for i in range(5)]
    dr, manifest = run_batch(tmp_path, table(tmp_path / "prompts.parquet", rows))
    assert task_states(dr) == {"generate": "success"}
    assert manifest["status"].tolist() == ["wrong_size"] * 5
    assert manifest["credits"].tolist() == [46] * 5
    assert int(manifest["credits"].sum()) == emulator.ledger()["net_credits"]
    first = manifest.iloc[0]
    assert first["error_message"].startswith("the image is 128x128 px; Imagen 4 makes 1024x1024 px for 1:1")
    assert Path(first["image_uri"]).read_bytes()  # the paid image is kept for a look
