"""ImagenGenerateOperator in real ``dag.test()`` runs against the emulator: paid once, never lost."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from airflow_provider_imagen.batch.journal import Journal
from tests.airflow_helpers import metadata_db_bytes, run_dag, task_states, try_numbers, xcoms

pytestmark = pytest.mark.usefixtures("airflow_db", "imagen_connection")


def journal_for(root: Path, dag_run: Any) -> dict:
    return Journal(
        str(root), dag_id=dag_run.dag_id, task_id="generate", run_id=dag_run.run_id, map_index=-1
    ).load()


@pytest.mark.parametrize("flavour", ["deferrable", "sync"])
def test_success_mirrors_the_image_and_returns_a_small_dict(
    flavour: str, emulator: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "images"
    dr = run_dag(
        f"imagen_test_generate_{flavour}",
        prompt="a brass lamp on a desk",
        size="9:16",
        output_path=str(out),
        journal_path=str(tmp_path / "journal"),
    )
    assert task_states(dr) == {"generate": "success"}
    result = xcoms(dr)[("generate", "return_value")]
    path = Path(result["image_uri"].removeprefix("file://"))
    assert path.parent == out and path.suffix == ".png"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == result["sha256"] and len(data) == result["bytes"]
    with Image.open(path) as image:
        assert image.size == (result["width"], result["height"])
        assert image.height > image.width  # 9:16
    assert result["status"] == "completed" and result["credits"] == 46
    assert result["task_id"].startswith("task_") and result["url_expires_at"] > 0
    assert not any("http" in str(v) for v in result.values())
    ledger = emulator.ledger()
    assert ledger["submissions_by_prompt"] == {"a brass lamp on a desk": 1}
    logs = capfd.readouterr()
    assert "/_emulator/media/" not in logs.out + logs.err  # the signed URL is never logged


@pytest.mark.parametrize(
    ("prompt", "error", "code"),
    [
        ("[[moderate]] a scene", "ContentModeratedError", 80006),
        ("[[fail]] a scene", "TaskFailedError", 60001),
    ],
)
def test_failed_renders_raise_typed_errors_are_refunded_and_not_repaid_on_retry(
    prompt: str, error: str, code: int, emulator: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dr = run_dag(
        "imagen_test_generate_deferrable",
        prompt=prompt,
        output_path=str(tmp_path),
        journal_path=str(tmp_path / "j"),
    )
    assert task_states(dr) == {"generate": "failed"}
    assert try_numbers(dr)["generate"] == 2  # the retry ran…
    ledger = emulator.ledger()
    assert ledger["submissions_by_prompt"] == {prompt: 1}  # …and re-attached instead of paying again
    assert ledger["credits_refunded"] == 46 and ledger["net_credits"] == 0
    entry = journal_for(tmp_path / "j", dr)["image"]
    assert (entry.status, entry.error_code) == ("failed", code)
    assert error in capfd.readouterr().out


def test_timeout_records_the_processing_task_and_the_retry_reattaches(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_TEST_TIMEOUT", "0.5")
    emulator.configure(latency_mean=1.5, latency_jitter=0.0)
    dr = run_dag(
        "imagen_test_generate_deferrable",
        prompt="a slow render",
        output_path=str(tmp_path / "out"),
        journal_path=str(tmp_path / "j"),
    )
    entry = journal_for(tmp_path / "j", dr)["image"]
    assert entry.timed_out_at is not None  # the first try's timeout, kept whatever the retry found
    records = "".join(p.read_text() for p in (tmp_path / "j").rglob("*.jsonl"))
    assert '"e":"timeout"' in records and entry.task_id in records
    assert emulator.ledger()["submissions_by_prompt"] == {"a slow render": 1}
    assert try_numbers(dr)["generate"] == 2


def test_a_failure_after_the_submit_is_retried_without_paying_again(emulator: Any, tmp_path: Path) -> None:
    """Mirroring fails on the first try (storage 'down'), the retry re-attaches to the paid task."""
    blocker = tmp_path / "down"
    blocker.write_text("a file where the output folder should be")
    dr = run_dag(
        "imagen_test_generate_deferrable",
        prompt="paid once",
        output_path=str(blocker / "images"),
        journal_path=str(tmp_path / "j"),
        blocker=str(blocker),
    )
    assert task_states(dr) == {"generate": "success"}
    assert try_numbers(dr)["generate"] == 2
    assert emulator.ledger()["submissions_by_prompt"] == {"paid once": 1}
    assert len(list((blocker / "images").glob("*.png"))) == 1


@pytest.mark.parametrize(
    ("prompt", "size", "message"),
    [
        ("", "1:1", "prompt=''"),
        ("   ", "1:1", "whitespace"),
        ("x" * 4001, "1:1", "4001 characters"),
        ("fine", "2:1", "size='2:1'"),
    ],
)
def test_bad_input_fails_before_any_post(
    prompt: str, size: str, message: str, emulator: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dr = run_dag(
        "imagen_test_generate_deferrable", prompt=prompt, size=size, journal_path=str(tmp_path / "j")
    )
    assert task_states(dr) == {"generate": "failed"}
    assert try_numbers(dr)["generate"] == 1  # AirflowFailException: no retry for input that cannot improve
    assert emulator.ledger()["posts"] == 0
    assert message in capfd.readouterr().out
    assert not (tmp_path / "j").exists()  # nothing journalled: nothing was about to be paid


def test_unknown_submit_is_not_paid_again_without_consent(emulator: Any, tmp_path: Path) -> None:
    prompt = "[[ambiguous]] lost answer"
    dr = run_dag("imagen_test_generate_deferrable", prompt=prompt, journal_path=str(tmp_path / "j"))
    assert task_states(dr) == {"generate": "failed"}
    assert try_numbers(dr)["generate"] == 2
    ledger = emulator.ledger()
    assert ledger["posts"] == 1 and ledger["submissions_by_prompt"] == {prompt: 1}
    entry = journal_for(tmp_path / "j", dr)["image"]
    assert entry.unknown_submit and "502" in (entry.ambiguous_reason or "")


def test_the_key_appears_in_no_log_xcom_or_metadata_row(
    emulator: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dr = run_dag(
        "imagen_test_generate_deferrable",
        prompt="secret hunt",
        output_path=str(tmp_path / "o"),
        journal_path=str(tmp_path / "j"),
    )
    assert task_states(dr) == {"generate": "success"}
    logs = capfd.readouterr()
    key = emulator.api_key
    assert key not in logs.out and key not in logs.err
    assert key not in repr(xcoms(dr))
    assert key.encode() not in metadata_db_bytes()  # trigger kwargs, events, XCom, rendered fields
    assert not any(key in p.read_text() for p in tmp_path.rglob("*.jsonl"))


@pytest.mark.parametrize(
    ("uri", "link"),
    [
        ("s3://aws_conn@bucket/a/b.png", "https://s3.console.aws.amazon.com/s3/object/bucket?prefix=a/b.png"),
        ("s3://bucket/a/b.png", "https://s3.console.aws.amazon.com/s3/object/bucket?prefix=a/b.png"),
        ("gs://gcp@bucket/a.png", "https://storage.cloud.google.com/bucket/a.png"),
        ("file:///tmp/a.png", "file:///tmp/a.png"),
    ],
)
def test_the_image_link_opens_in_a_browser(uri: str, link: str) -> None:
    from airflow_provider_imagen.operators.generate import browsable_uri

    assert browsable_uri(uri) == link
