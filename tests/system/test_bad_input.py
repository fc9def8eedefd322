"""Bad input: every case is a clear error (naming the row and the field) before any POST, and nothing
is written half — or, under the default ``on_invalid="record"``, the bad row is recorded and never sent.

Where each case runs, and why:
- the whole matrix runs the operator's ``execute()`` directly (a fake context, ``deferrable=False``)
  against the in-process emulator. Bad input is caught before the first POST and before any deferral,
  so a scheduler or triggerer adds nothing but ~20 s per case; this is the same entry point Airflow
  calls, and the emulator's ledger still proves that nothing was sent;
- the operator's settings (budget, ``variations``) fail when the DAG file is parsed: constructing the
  operator is that parse;
- two runs on the real stack show what Airflow does with it: ``on_invalid="fail"`` fails the task
  without a retry (no POST, no manifest), and ``on_invalid="record"`` records every kind of bad row next
  to good ones (only the good ones are sent and charged).
"""

from __future__ import annotations

import json
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_imagen.api.errors import ImagenError, RequestValidationError
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, ImageRequest
from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator
from tests.system.checks import local_manifest, write_table
from tests.system.stack import Stack

pytestmark = pytest.mark.system

GOOD = {"prompt_id": "good-1", "prompt": "a brass desk lamp, product photo", "size": "1:1"}


class FakeTaskInstance:
    """What the batch operator reads from ``context["ti"]``."""

    def __init__(self) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index, self.try_number = (
            "bad",
            "generate",
            "r1",
            -1,
            1,
        )


def fake_context() -> dict[str, Any]:
    return {"ti": FakeTaskInstance(), "outlet_events": defaultdict(lambda: types.SimpleNamespace(extra=None))}


# -- writers of broken tables ----------------------------------------------------------------------


def rows(*bad: dict[str, Any]) -> Callable[[Path], str]:
    """A table of one good row followed by ``bad`` rows."""
    return lambda path: write_table(path, [GOOD, *bad])


def arrow(table: pa.Table) -> Callable[[Path], str]:
    def write(path: Path) -> str:
        pq.write_table(table, path)
        return str(path)

    return write


def invalid_utf8_strings(path: Path) -> str:
    """A Parquet *string* column holding bytes that are not UTF-8 (latin-1 text from another writer):
    pyarrow writes it without checking, as other Parquet writers do."""
    data = GOOD["prompt"].encode() + b"caf\xe9 cr\xe8me, \xff\xfe"
    offsets = np.array([0, len(GOOD["prompt"]), len(data)], dtype=np.int32)
    prompts = pa.Array.from_buffers(
        pa.string(), 2, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)]
    )
    pq.write_table(pa.table({"prompt_id": ["good-1", "latin1"], "prompt": prompts}), path)
    return str(path)


def not_parquet(path: Path) -> str:
    path.write_text("prompt_id,prompt\ngood-1,a lamp\n")
    return str(path)


def missing(path: Path) -> str:
    return str(path.parent / "no-such-table.parquet")


#: name → (writer of the table, operator settings, a fragment the error must contain).
TABLE_CASES: dict[str, tuple[Callable[[Path], str], dict[str, Any], str]] = {
    "missing prompt column": (lambda p: write_table(p, [{"prompt_id": "a", "text": "x"}]), {}, "'prompt'"),
    "empty table": (
        arrow(pa.table({"prompt_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})),
        {},
        "no rows",
    ),
    "not a Parquet file": (not_parquet, {}, "not a readable Parquet file"),
    "missing file": (missing, {}, "does not exist"),
    "table-wide size 2:1": (rows(), {"sizes": ["2:1"]}, "size='2:1'"),
    "default_size 2:1": (rows(), {"default_size": "2:1"}, "size='2:1'"),
}
ROW_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "empty prompt": (
        rows({"prompt_id": "e", "prompt": ""}),
        "row 1 (prompt_id 'e'): prompt='': must not be empty",
    ),
    "whitespace prompt": (
        rows({"prompt_id": "w", "prompt": " \t\n "}),
        "row 1 (prompt_id 'w'): prompt=' \\t\\n ': must not be empty",
    ),
    "4001-character prompt": (
        rows({"prompt_id": "long", "prompt": "x" * 4001}),
        "4001 characters; at most 4000",
    ),
    "size 2:1": (
        rows({"prompt_id": "wide", "prompt": "a wide lamp", "size": "2:1"}),
        "size='2:1': must be one of",
    ),
    "null prompt": (rows({"prompt_id": "np", "prompt": None}), "row 1 (prompt_id 'np'): prompt="),
    "NaN prompt": (
        arrow(pa.table({"prompt_id": ["nan"], "prompt": pa.array([float("nan")])})),
        "row 0 (prompt_id 'nan'): prompt=nan: is missing",
    ),
    "null prompt_id": (rows({"prompt_id": None, "prompt": "orphan"}), "is missing (null)"),
    "NaN prompt_id": (
        arrow(pa.table({"prompt_id": pa.array([float("nan")]), "prompt": ["x"]})),
        "row 0: prompt_id=nan: is missing",
    ),
    "duplicate prompt_id": (rows({**GOOD, "prompt": "another lamp"}), "duplicates row 0"),
    "prompt_id with ../": (rows({"prompt_id": "../escape", "prompt": "up"}), "must not contain '/'"),
    "prompt_id with /": (rows({"prompt_id": "a/b", "prompt": "down"}), "must not contain '/'"),
    "300-character prompt_id": (rows({"prompt_id": "i" * 300, "prompt": "x"}), "300 characters; at most 200"),
    "non-UTF-8 bytes (binary column)": (
        arrow(pa.table({"prompt_id": ["b"], "prompt": pa.array([b"caf\xe9"], pa.binary())})),
        "must be a string, not bytes",
    ),
}


def operator(prompts: str, tmp_path: Path, **settings: Any) -> ImagenBatchGenerateOperator:
    return ImagenBatchGenerateOperator(
        task_id="generate",
        prompts=prompts,
        output_path=str(tmp_path / "out"),
        journal_path=str(tmp_path / "journal"),
        deferrable=False,
        expected_render=0.2,
        poll_interval=0.1,
        **settings,
    )


def assert_nothing_sent_or_written(emulator: Any, tmp_path: Path) -> None:
    ledger = emulator.ledger()
    assert ledger["posts"] == 0 and ledger["tasks_created"] == 0, ledger
    assert not (tmp_path / "out").exists(), sorted((tmp_path / "out").rglob("*"))  # no image, no manifest
    intents = [
        line
        for segment in (tmp_path / "journal").rglob("*.jsonl")
        for line in segment.read_text().splitlines()
        if '"e":"intent"' in line
    ]
    assert not intents  # nothing was about to be paid for


@pytest.fixture
def table_dir(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    return tmp_path / "in"


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_a_bad_table_fails_before_any_post(
    case: str, emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    write, settings, fragment = TABLE_CASES[case]
    prompts = write(table_dir / "prompts.parquet")
    with pytest.raises(AirflowFailException) as caught:  # no retry: bad input does not improve
        operator(prompts, tmp_path, **settings).execute(fake_context())
    assert fragment in str(caught.value), str(caught.value)
    assert "nothing was submitted" in str(caught.value)
    assert_nothing_sent_or_written(emulator, tmp_path)


def test_non_utf8_bytes_in_a_string_column_fail_clearly_before_any_post(
    emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    prompts = invalid_utf8_strings(table_dir / "prompts.parquet")
    for policy in ("fail", "record"):  # the table cannot be read as text: no policy can send it
        with pytest.raises(AirflowFailException) as caught:  # a clear, final error (no Airflow retry)
            operator(prompts, tmp_path, on_invalid=policy).execute(fake_context())
        assert "row 1: column 'prompt' holds bytes that are not valid UTF-8" in str(caught.value)
        assert_nothing_sent_or_written(emulator, tmp_path)


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_a_bad_row_fails_the_batch_before_any_post_when_on_invalid_is_fail(
    case: str, emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    write, fragment = ROW_CASES[case]
    prompts = write(table_dir / "prompts.parquet")
    with pytest.raises(AirflowFailException) as caught:
        operator(prompts, tmp_path, on_invalid="fail").execute(fake_context())
    message = str(caught.value)
    assert fragment in message, message
    assert "nothing was submitted and nothing was charged" in message
    assert_nothing_sent_or_written(emulator, tmp_path)


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_a_bad_row_is_recorded_never_sent_when_on_invalid_is_record(
    case: str, emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    """The default policy: the bad row is ``invalid`` (0 credits) in the manifest, the good row is made."""
    write, fragment = ROW_CASES[case]
    prompts = write(table_dir / "prompts.parquet")
    result = operator(prompts, tmp_path).execute(fake_context())
    manifest = local_manifest(tmp_path / "out")
    invalid = manifest[manifest["status"] == "invalid"]
    assert len(invalid) >= 1 and any(fragment in m for m in invalid["error_message"]), invalid
    assert (invalid["credits"] == 0).all() and invalid["task_id"].isna().all()
    ledger = emulator.ledger()
    sent = set(ledger["submissions_by_prompt"])
    assert sent <= {GOOD["prompt"]} and all(n == 1 for n in ledger["submissions_by_prompt"].values())
    assert set(manifest.loc[manifest["status"] == "completed", "prompt"]) == sent
    assert result["credits"] == ledger["net_credits"] == CREDITS_PER_IMAGE * len(sent)


# -- settings: refused when the DAG file is parsed ----------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"max_credits": 0}, "max_credits=0: must be a positive number of credits"),
        ({"max_credits": -46}, "max_credits=-46: must be a positive number of credits"),
        ({"variations": 0}, "variations=0: must be at least 1"),
        ({"on_invalid": "ignore"}, "on_invalid='ignore'"),
    ],
    ids=["zero budget", "negative budget", "zero variations", "unknown policy"],
)
def test_bad_operator_settings_fail_at_dag_parse(
    settings: dict[str, Any], fragment: str, emulator: Any, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        operator("unused.parquet", tmp_path, **settings)
    assert fragment in str(caught.value)
    assert emulator.ledger()["requests"] == 0


def test_n_other_than_1_is_refused_by_the_request_itself(emulator: Any) -> None:
    """The contract fixes ``n`` at 1 for Imagen 4: variations are separate requests (``variations=``)."""
    for n in (0, 2, 4):
        with pytest.raises(RequestValidationError, match=r"n=\d: must be 1 for imagen-4-0"):
            ImageRequest("a lamp", "1:1", n=n)
    assert emulator.ledger()["requests"] == 0


# -- connections ----------------------------------------------------------------------------------------


def use_connection(monkeypatch: pytest.MonkeyPatch, **conn: Any) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_DEFAULT", json.dumps({"conn_type": "imagen", **conn}))


def test_a_connection_without_a_key_fails_before_any_post(
    emulator: Any, tmp_path: Path, table_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_connection(monkeypatch, host=emulator.base_url)
    prompts = rows()(table_dir / "prompts.parquet")
    with pytest.raises(ImagenError, match="has no API key: put the reAPI key in its password"):
        operator(prompts, tmp_path).execute(fake_context())
    assert emulator.ledger()["requests"] == 0
    assert_nothing_sent_or_written(emulator, tmp_path)


WRONG_KEY = "rk_live_wrong_0123456789abcdef"


def ten_rows(table_dir: Path) -> str:
    """More rows than the window (4): what a real batch looks like."""
    return write_table(
        table_dir / "p.parquet", [{"prompt_id": f"k{i}", "prompt": f"lamp {i}"} for i in range(10)]
    )


def test_a_wrong_key_is_a_clear_error_before_any_post(
    emulator: Any, tmp_path: Path, table_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_imagen.api.errors import AuthenticationError

    use_connection(monkeypatch, host=emulator.base_url, password=WRONG_KEY)
    try:
        operator(ten_rows(table_dir), tmp_path, max_in_flight=4).execute(fake_context())
    except Exception as exc:
        error: Exception = exc
    else:
        raise AssertionError("a batch with a wrong key succeeded")
    message = f"{type(error).__name__}: {error}"
    ledger = emulator.ledger()
    assert WRONG_KEY not in message and ledger["tasks_created"] == 0
    assert isinstance(error, AuthenticationError), message
    assert ledger["posts"] == 0, f"{ledger['posts']} POSTs answered 401 before the error"


def test_an_unreachable_host_is_a_clear_error(
    emulator: Any, tmp_path: Path, table_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.system.stack import free_port

    host = f"http://127.0.0.1:{free_port()}"
    use_connection(monkeypatch, host=host, password="rk_live_x", extra={"max_retries": 1})
    try:
        operator(ten_rows(table_dir), tmp_path, max_in_flight=4).execute(fake_context())
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
    else:
        raise AssertionError("a batch whose API host refuses every connection succeeded")
    assert "override_status" not in message, message
    assert "connect" in message.lower(), message
    # Found by the free balance read before any POST: nothing sent, so nothing to write down either.
    assert_nothing_sent_or_written(emulator, tmp_path)


# -- the same on the real stack -------------------------------------------------------------------------


def test_on_invalid_fail_on_the_stack_fails_once_without_retry_or_post(stack: Stack, workdir: Path) -> None:
    prompts = write_table(workdir / "p.parquet", [GOOD, {"prompt_id": "../up", "prompt": "escape"}])
    run_id = stack.trigger(
        "imagen_sys_strict",
        prompts=prompts,
        output_path=str(workdir / "out"),
        journal_path=str(workdir / "j"),
    )
    state = stack.wait_run("imagen_sys_strict", run_id, timeout=120)
    ti = stack.ti("imagen_sys_strict", run_id)
    logs = stack.task_logs("imagen_sys_strict", run_id)
    assert state == "failed" and ti["state"] == "failed"
    assert ti["try_number"] == 1  # the DAG allows a retry; bad input does not get one
    assert "row 1: prompt_id='../up': must not contain" in logs
    assert stack.emulator.ledger()["posts"] == 0
    assert not (workdir / "out").exists()


def test_every_bad_row_recorded_next_to_good_ones_on_the_stack(stack: Stack, workdir: Path) -> None:
    """One table with every kind of bad row, two good rows and a moderated one: only the three valid
    rows are sent, the bad ones are ``invalid`` with their reasons, and the run succeeds."""
    bad = [
        {"prompt_id": "empty", "prompt": ""},
        {"prompt_id": "blank", "prompt": "   "},
        {"prompt_id": "long", "prompt": "y" * 4001},
        {"prompt_id": "wide", "prompt": "wide", "size": "2:1"},
        {"prompt_id": "null", "prompt": None},
        {"prompt_id": None, "prompt": "no id"},
        {"prompt_id": "good-1", "prompt": "duplicate id"},
        {"prompt_id": "../escape", "prompt": "climb out"},
        {"prompt_id": "a/b", "prompt": "nested"},
        {"prompt_id": "i" * 300, "prompt": "long id"},
    ]
    rows_ = [
        GOOD,
        *bad,
        {"prompt_id": "good-2", "prompt": "a walnut side table, studio light", "size": "16:9"},
        {"prompt_id": "moderated", "prompt": "a lamp [[moderate]]", "size": "1:1"},
    ]
    prompts = write_table(workdir / "p.parquet", rows_)
    run_id = stack.trigger(
        "imagen_sys_record",
        prompts=prompts,
        output_path=str(workdir / "out"),
        journal_path=str(workdir / "j"),
    )
    state = stack.wait_run("imagen_sys_record", run_id, timeout=120)
    manifest = local_manifest(workdir / "out")
    ledger = stack.emulator.ledger()
    statuses = dict(zip(manifest["row"], manifest["status"], strict=True))
    figures = {k: ledger[k] for k in ("posts", "tasks_created", "net_credits", "downloads")}
    figures.update(state=state, counts=manifest["status"].value_counts().to_dict())
    print(f"\n[reliability] record_bad_rows: {json.dumps(figures)}")

    assert state == "success"
    assert [statuses[i] for i in range(1, 11)] == ["invalid"] * 10
    assert statuses[0] == statuses[11] == "completed" and statuses[12] == "moderated"
    assert set(ledger["submissions_by_prompt"]) == {
        GOOD["prompt"],
        "a walnut side table, studio light",
        "a lamp [[moderate]]",
    }
    assert max(ledger["submissions_by_prompt"].values()) == 1
    # Credits: the two images; the moderated one was refunded.
    assert int(manifest["credits"].sum()) == ledger["net_credits"] == 2 * CREDITS_PER_IMAGE
    images = sorted(p.name for p in (workdir / "out" / "images").iterdir())
    assert len(images) == 2 and all(name.endswith(".png") for name in images)


def test_an_html_page_instead_of_an_image_is_refused_once_and_reported(
    emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    """The CDN answers one image URL with an HTML page. The page is not written; its row is
    ``download_failed`` (paid) with the reason, decided once (asking again gives the same page): the
    batch finishes, and a rerun of the same task instance sends and downloads nothing again."""
    prompts = write_table(
        table_dir / "p.parquet", [GOOD, {"prompt_id": "html", "prompt": "a lamp [[html]]", "size": "1:1"}]
    )
    downloads = []
    for _try in range(2):  # the first try, then a second run of the same task instance
        result = operator(prompts, tmp_path).execute(fake_context())
        assert result["counts"] == {"completed": 1, "download_failed": 1, "total": 2}
        downloads.append(emulator.ledger()["downloads"] + emulator.ledger()["downloads_rejected"])
    manifest = local_manifest(tmp_path / "out")
    html = manifest[manifest["prompt_id"] == "html"].iloc[0]
    assert html["status"] == "download_failed" and "text/html" in html["error_message"]
    assert pd.isna(html["image_uri"]) and html["credits"] == CREDITS_PER_IMAGE
    assert manifest.loc[manifest["prompt_id"] == GOOD["prompt_id"], "status"].item() == "completed"
    assert len(list((tmp_path / "out" / "images").iterdir())) == 1  # the good image, not the page
    ledger = emulator.ledger()
    assert ledger["posts"] == ledger["tasks_created"] == 2  # the rerun re-attached: nothing paid twice
    assert downloads[0] >= 2 and downloads[1] == downloads[0]  # the refused page is not asked for again
    assert int(manifest["credits"].sum()) == ledger["net_credits"]


def test_a_download_failed_row_says_why() -> None:
    from airflow_provider_imagen.batch.journal import JournalEntry
    from airflow_provider_imagen.batch.manifest import RunIdentity, manifest_row
    from airflow_provider_imagen.batch.table import expand_specs

    (spec,) = expand_specs([{"prompt_id": "html", "prompt": "a lamp [[html]]"}])
    entry = JournalEntry(spec.key, task_ids=["task_1"], status="completed")
    entry.apply(
        {"e": "mirror_failed", "k": spec.key, "task_id": "task_1", "reason": "DownloadError: text/html"}
    )
    row = manifest_row(spec, entry, identity=RunIdentity("d", "r", "t"))
    assert row["status"] == "download_failed"
    assert "text/html" in (row["error_message"] or ""), row["error_message"]
