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
    "every row invalid": (
        lambda p: write_table(p, [{"prompt_id": "e", "prompt": ""}, {"prompt_id": "../x", "prompt": "up"}]),
        {},
        "none of the 2 requested image(s) is valid; nothing was submitted and nothing was charged",
    ),
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


def operator(prompts: Any, tmp_path: Path, **settings: Any) -> ImagenBatchGenerateOperator:
    return build(tmp_path, prompts=prompts, **settings)


def build(tmp_path: Path, **settings: Any) -> ImagenBatchGenerateOperator:
    """The batch operator of the matrix; ``settings`` override its defaults (prompts included)."""
    defaults: dict[str, Any] = {
        "task_id": "generate",
        "prompts": str(tmp_path / "in" / "prompts.parquet"),
        "output_path": str(tmp_path / "out"),
        "journal_path": str(tmp_path / "journal"),
        "deferrable": False,
        "expected_render": 0.2,
        "poll_interval": 0.1,
    }
    return ImagenBatchGenerateOperator(**{**defaults, **settings})


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative name → size): what a case wrote is the difference."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


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
    """The default policy: the bad row is ``invalid`` (0 credits) in the manifest, the good row is made.

    The NaN cases are tables of the bad row alone (a float column cannot hold a good prompt), so they
    need ``fail_when_all_invalid=False``: a table with no valid row fails by default (see below)."""
    write, fragment = ROW_CASES[case]
    prompts = write(table_dir / "prompts.parquet")
    result = operator(prompts, tmp_path, fail_when_all_invalid=False).execute(fake_context())
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


PARSE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "zero budget": ({"max_credits": 0}, "max_credits=0: must be a positive number of credits"),
    "negative budget": ({"max_credits": -46}, "max_credits=-46: must be a positive number of credits"),
    "budget True": ({"max_credits": True}, "max_credits=True: must be a whole number of credits or None"),
    "budget below one image": ({"max_credits": 45}, "max_credits=45: is less than one image (46 credits)"),
    "budget not digits": ({"max_credits": "lots"}, "max_credits='lots': must be a whole number of credits"),
    "budget float": ({"max_credits": 460.5}, "max_credits=460.5: must be a whole number of credits or None"),
    "zero variations": ({"variations": 0}, "variations=0: must be at least 1"),
    "a million variations": ({"variations": 10**6}, "variations=1000000: must be at most 100"),
    "variations as text": ({"variations": "3"}, "variations='3': must be an integer, not str"),
    "unknown policy": ({"on_invalid": "ignore"}, "on_invalid='ignore'"),
    "table-wide size 2:1": ({"sizes": ["2:1"]}, "sizes='2:1': must be one of 1:1, 4:3, 3:4, 16:9, 9:16"),
    "empty sizes": ({"sizes": []}, "sizes=[]: must list at least one of"),
    "default_size 2:1": ({"default_size": "2:1"}, "default_size='2:1': must be one of"),
    "max_in_flight as text": ({"max_in_flight": "4"}, "max_in_flight='4': must be an integer, not str"),
    "check_balance as text": ({"check_balance": "false"}, "check_balance='false': must be True or False"),
    "error rate as percent": ({"fail_on_error_rate": 5}, "fail_on_error_rate=5: must be at most 1"),
    "zero timeout": ({"timeout": 0}, "timeout=0: must be positive"),
    "relative output_path": ({"output_path": "rel_out"}, "output_path='rel_out': must be absolute"),
    "file URI with a host": (
        {"output_path": "file://rel_out/x"},
        "output_path='file://rel_out/x': a file:// URI needs an absolute path after it",
    ),
    "home-relative output_path": ({"output_path": "~/out"}, "output_path='~/out': '~' is not expanded"),
    "empty output_path": ({"output_path": ""}, "output_path='': must not be empty"),
    "relative journal_path": ({"journal_path": "journal"}, "journal_path='journal': must be absolute"),
    "empty prompts": ({"prompts": ""}, "prompts='': must not be empty"),
    "relative prompts": ({"prompts": "in/p.parquet"}, "prompts='in/p.parquet': must be absolute"),
    "empty list of records": ({"prompts": []}, "prompts=[]: the list of records is empty"),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_bad_operator_settings_fail_at_dag_parse(case: str, emulator: Any, tmp_path: Path) -> None:
    """Constructing the operator is what parsing the DAG file does: the import error names the
    argument, the value and the rule, and nothing is sent or written."""
    settings, fragment = PARSE_CASES[case]
    before = tree(tmp_path)
    with pytest.raises(ValueError) as caught:  # ImagenInputError is a ValueError
        build(tmp_path, **settings)
    assert fragment in str(caught.value), str(caught.value)
    assert emulator.ledger()["requests"] == 0
    assert tree(tmp_path) == before


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


def test_an_empty_prompts_template_fails_once_without_post_on_the_stack(stack: Stack, workdir: Path) -> None:
    """The DAG's ``prompts="{{ params.prompts }}"`` with no table in the conf renders to ``""``: the task
    fails when its templates are rendered, without the retry the DAG allows, before any read or POST."""
    run_id = stack.trigger(
        "imagen_sys_strict", prompts="", output_path=str(workdir / "out"), journal_path=str(workdir / "j")
    )
    state = stack.wait_run("imagen_sys_strict", run_id, timeout=120)
    ti = stack.ti("imagen_sys_strict", run_id)
    logs = stack.task_logs("imagen_sys_strict", run_id)
    assert state == "failed" and ti["try_number"] == 1
    assert "prompts='': must not be empty" in logs and "(rendered from '{{ params.prompts }}')" in logs
    assert stack.emulator.ledger()["requests"] == 0
    assert sorted(p.name for p in workdir.iterdir()) == []  # nothing written, not even a probe's folder


def test_prompt_records_that_look_like_jinja_are_paid_verbatim_on_the_stack(
    stack: Stack, workdir: Path
) -> None:
    """Records are data: the real task runner renders ``output_path`` and ``max_credits`` but sends the
    prompts exactly as written (``{{ name }}`` would fail on Airflow's strict undefined if rendered)."""
    from tests.system.dags.imagen_bad_input import VERBATIM_PROMPTS
    from tests.system.stack import wait_until

    dag_id = "imagen_sys_verbatim"
    wait_until(
        lambda: stack.sql("SELECT dag_id FROM serialized_dag WHERE dag_id = ?", dag_id),
        90,
        f"{dag_id} to be parsed",
        interval=1.0,
    )
    run_id = stack.trigger(dag_id, output_path=str(workdir / "out"), journal_path=str(workdir / "j"))
    state = stack.wait_run(dag_id, run_id, timeout=120)
    ledger = stack.emulator.ledger()
    assert state == "success", stack.task_logs(dag_id, run_id)[-3000:]
    assert ledger["submissions_by_prompt"] == {r["prompt"]: 1 for r in VERBATIM_PROMPTS}
    manifest = local_manifest(workdir / "out")
    assert sorted(manifest["prompt"]) == sorted(r["prompt"] for r in VERBATIM_PROMPTS)
    assert int(manifest["credits"].sum()) == ledger["net_credits"] == 2 * CREDITS_PER_IMAGE


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
    from airflow_provider_imagen.batch.specs import expand_specs

    (spec,) = expand_specs([{"prompt_id": "html", "prompt": "a lamp [[html]]"}])
    entry = JournalEntry(spec.key, task_ids=["task_1"], status="completed")
    entry.apply(
        {"e": "mirror_failed", "k": spec.key, "task_id": "task_1", "reason": "DownloadError: text/html"}
    )
    row = manifest_row(spec, entry, identity=RunIdentity("d", "r", "t"))
    assert row["status"] == "download_failed"
    assert "text/html" in (row["error_message"] or ""), row["error_message"]


# -- templates: rendered where they are paths, never inside prompt records ----------------------------


def render(op: Any, **context_values: Any) -> dict[str, Any]:
    """Render the operator's templates the way the task runner does, before ``execute``."""
    context: dict[str, Any] = {
        **fake_context(),
        "ds": "2026-12-07",
        "params": {},
        "dag_run": types.SimpleNamespace(conf={}),
        **context_values,
    }
    op.render_template_fields(context)
    return context


#: Prompt texts a user may well write: braces are ordinary in prompts. They are paid for as written.
JINJA_PROMPTS = [
    {"prompt_id": "j1", "prompt": "Poster headline: {{ ds }} {# hidden #} end"},
    {"prompt_id": "j2", "prompt": "{{ name }}"},
    {"prompt_id": "j3", "prompt": "a sign that reads {% raw %}"},
]


@pytest.mark.parametrize("form", ["records", "tuple of records", "DataFrame", "Parquet"])
def test_prompt_texts_reach_the_api_verbatim_never_rendered(
    form: str, emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    """Only a path or URI string is a template; prompt records, a DataFrame and the rows of a Parquet
    table are data, sent (and paid for) exactly as written."""
    if form == "Parquet":
        prompts: Any = "{{ params.table }}"  # the path is templated, the rows it holds are not
        write_table(table_dir / "jinja.parquet", JINJA_PROMPTS)
    elif form == "DataFrame":
        prompts = pd.DataFrame(JINJA_PROMPTS)
    elif form == "tuple of records":
        prompts = tuple(dict(r) for r in JINJA_PROMPTS)
    else:
        prompts = [dict(r) for r in JINJA_PROMPTS]
    op = operator(prompts, tmp_path)
    context = render(op, params={"table": str(table_dir / "jinja.parquet")})
    result = op.execute(context)
    ledger = emulator.ledger()
    assert ledger["submissions_by_prompt"] == {r["prompt"]: 1 for r in JINJA_PROMPTS}
    assert ledger["posts"] == ledger["tasks_created"] == 3
    manifest = local_manifest(tmp_path / "out")
    assert sorted(manifest["prompt"]) == sorted(r["prompt"] for r in JINJA_PROMPTS)
    assert result["counts"]["completed"] == 3


#: name → (operator settings, context values for rendering, the fragment the error must contain).
RENDER_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "prompts template renders to ''": (
        {"prompts": "{{ dag_run.conf.get('table', '') }}"},
        {},
        "prompts='': must not be empty: an empty path means the worker's working directory. Check the "
        "template or the param/conf key it reads (rendered from \"{{ dag_run.conf.get('table', '') }}\")",
    ),
    "output_path template renders to ''": (
        {"output_path": "{{ params.out }}"},
        {"params": {"out": ""}},
        "output_path='': must not be empty",
    ),
    "output_path template renders to a relative path": (
        {"output_path": "{{ params.out }}"},
        {"params": {"out": "rel_out"}},
        "output_path='rel_out': must be absolute",
    ),
    "prompts template renders to a relative path": (
        {"prompts": "{{ params.table }}"},
        {"params": {"table": "in/prompts.parquet"}},
        "prompts='in/prompts.parquet': must be absolute",
    ),
    "max_credits renders below one image": (
        {"max_credits": "{{ params.budget }}"},
        {"params": {"budget": 45}},
        "is less than one image (46 credits): nothing could be made. Give at least 46, or None for no "
        "budget (rendered from '{{ params.budget }}')",
    ),
    "max_credits renders to None": (
        {"max_credits": "{{ params.budget }}"},
        {"params": {"budget": None}},
        "max_credits='None': must be a whole number of credits (a template must render to digits only)",
    ),
    "max_credits renders to text": (
        {"max_credits": "{{ dag_run.conf.get('budget', 'lots') }}"},
        {},
        "max_credits='lots': must be a whole number of credits",
    ),
}


@pytest.mark.parametrize("case", list(RENDER_CASES))
def test_a_template_that_renders_to_a_bad_value_fails_before_any_post(
    case: str, emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path, monkeypatch: Any
) -> None:
    """Checked once rendered, before ``execute``: no retry (it renders the same again), no POST.

    The working directory holds a valid prompt table and an earlier run's manifest (it has ``prompt_id``
    and ``prompt`` columns): an empty ``prompts`` must not read them."""
    from airflow.sdk.exceptions import AirflowFailException

    rows()(table_dir / "prompts.parquet")
    stray = tmp_path / "cwd"
    write_table(stray / "stray.parquet", [{"prompt_id": "stray", "prompt": "a stray prompt, paid for"}])
    write_table(stray / "manifests" / "manifest.parquet", [{"prompt_id": "old", "prompt": "an old one"}])
    monkeypatch.chdir(stray)
    settings, values, fragment = RENDER_CASES[case]
    op = build(tmp_path, **settings)
    before = tree(tmp_path)
    with pytest.raises(AirflowFailException) as caught:
        render(op, **values)
        op.execute(fake_context())
    assert fragment in str(caught.value), str(caught.value)
    assert "nothing was submitted" in str(caught.value)
    assert emulator.ledger()["requests"] == 0
    assert tree(tmp_path) == before
    assert_nothing_sent_or_written(emulator, tmp_path)


def test_max_credits_rendered_as_digits_is_the_budget(
    emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    """A rendered template is text: ``"100"`` is a budget of 100 credits, so 2 of 3 images (46 each)."""
    prompts = write_table(
        table_dir / "p.parquet", [{"prompt_id": f"b{i}", "prompt": f"lamp {i}"} for i in range(3)]
    )
    op = operator(prompts, tmp_path, max_credits="{{ params.budget }}", max_in_flight=1)
    result = op.execute(render(op, params={"budget": 100}))
    ledger = emulator.ledger()
    assert ledger["posts"] == ledger["tasks_created"] == 2 and result["credits"] == 92
    assert result["counts"] == {"completed": 2, "skipped_budget": 1, "total": 3}


def test_a_table_with_no_valid_row_succeeds_only_when_the_user_opts_out(
    emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    prompts = write_table(table_dir / "p.parquet", [{"prompt_id": "e", "prompt": ""}])
    result = operator(prompts, tmp_path, fail_when_all_invalid=False).execute(fake_context())
    assert result["counts"] == {"invalid": 1, "total": 1} and result["credits"] == 0
    assert emulator.ledger()["requests"] == 0  # not even the balance: nothing would be sent


# -- locations: writable before the first POST, or a clear error ----------------------------------------


def blocked(tmp_path: Path, name: str) -> Path:
    """A folder path that cannot be created: a file stands where its parent should be.

    (File modes do not stop root, which these tests may run as; a file in the way stops everyone.)"""
    (tmp_path / "blocker").write_text("a file, not a folder")
    return tmp_path / "blocker" / name


@pytest.mark.parametrize("which", ["output_path", "journal_path"])
def test_an_unwritable_location_fails_before_any_post(
    which: str, emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    """Unwritable output with a writable journal (and the reverse): the image would be paid for and
    then have nowhere to go. A probe object is written and deleted first, for free."""
    prompts = rows()(table_dir / "prompts.parquet")
    target = blocked(tmp_path, "out")
    before = tree(tmp_path)
    with pytest.raises(ImagenError) as caught:
        operator(prompts, tmp_path, **{which: str(target)}).execute(fake_context())
    message = str(caught.value)
    assert f"{which}='{target}': cannot write there (" in message, message
    assert "nothing was submitted and nothing was charged" in message
    ledger = emulator.ledger()
    assert ledger["posts"] == 0 and ledger["tasks_created"] == 0
    assert tree(tmp_path) == before  # the probe left nothing behind, not even the folders it made


def test_the_probe_leaves_no_trace_when_the_run_stops_later(
    emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    """A run stopped after the probe (here: the account cannot pay) leaves no folder and no file."""
    emulator.set_balance(0)
    prompts = rows()(table_dir / "prompts.parquet")
    before = tree(tmp_path)
    with pytest.raises(ImagenError):
        operator(prompts, tmp_path).execute(fake_context())
    assert tree(tmp_path) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "journal").exists()


# -- the account: free checks first ----------------------------------------------------------------------


@pytest.mark.parametrize("check_balance", [False, True])
def test_a_balance_below_one_image_fails_before_any_post(
    check_balance: bool, emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    from airflow_provider_imagen.api.errors import InsufficientCreditsError

    emulator.set_balance(45)
    prompts = rows()(table_dir / "prompts.parquet")
    with pytest.raises(InsufficientCreditsError) as caught:
        operator(prompts, tmp_path, check_balance=check_balance).execute(fake_context())
    assert (
        "the account's balance is 45 credits, less than one image (46 credits); nothing was submitted"
        in str(caught.value)
    )
    assert emulator.ledger()["posts"] == 0
    assert_nothing_sent_or_written(emulator, tmp_path)


def test_running_out_of_credits_mid_run_shows_the_apis_code(
    emulator: Any, imagen_connection: str, tmp_path: Path, table_dir: Path
) -> None:
    """One image's worth of credits for three rows: one is made, the next POST is refused with 402
    (free), and the task's error quotes the API's answer, code 30001 included."""
    from airflow_provider_imagen.api.errors import InsufficientCreditsError

    emulator.set_balance(46)
    prompts = write_table(
        table_dir / "p.parquet", [{"prompt_id": f"c{i}", "prompt": f"lamp {i}"} for i in range(3)]
    )
    with pytest.raises(InsufficientCreditsError) as caught:
        operator(prompts, tmp_path, max_in_flight=1).execute(fake_context())
    message = str(caught.value)
    assert (
        "the account ran out of credits (the API answered POST /images/generations: HTTP 402, code 30001"
        in (message)
    ), message
    assert "code None" not in message
    ledger = emulator.ledger()
    assert ledger["tasks_created"] == 1 and ledger["net_credits"] == 46


def test_a_base_url_with_a_path_is_named_in_full_before_any_post(
    emulator: Any, tmp_path: Path, table_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_connection(monkeypatch, host=emulator.base_url + "/v2", password=emulator.api_key)
    with pytest.raises(ImagenError) as caught:
        operator(rows()(table_dir / "p.parquet"), tmp_path).execute(fake_context())
    message = str(caught.value)
    assert type(caught.value).__name__ == "ImagenAPIError", message  # not "task not found"
    assert f"GET {emulator.base_url}/v2/api/v1/balance: HTTP 404" in message, message
    assert "check the connection's Base URL" in message
    assert emulator.ledger()["posts"] == 0
    assert_nothing_sent_or_written(emulator, tmp_path)


def test_a_host_without_a_scheme_says_https_was_assumed_before_any_post(
    emulator: Any, tmp_path: Path, table_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = emulator.base_url.removeprefix("http://")
    use_connection(monkeypatch, host=host, password=emulator.api_key, extra={"max_retries": 0})
    with pytest.raises(ImagenError) as caught:
        operator(rows()(table_dir / "p.parquet"), tmp_path).execute(fake_context())
    message = str(caught.value)
    assert f"host '{host}' has no scheme, so https:// was assumed" in message, message
    assert emulator.ledger()["requests"] == 0  # the TLS handshake failed: the API saw nothing
    assert_nothing_sent_or_written(emulator, tmp_path)


# -- the single-image operator -------------------------------------------------------------------------


class GenerateTaskInstance(FakeTaskInstance):
    """The single-image operator also pushes the image's URI to XCom."""

    def __init__(self, dag_id: str = "bad", run_id: str = "r1") -> None:
        super().__init__()
        self.dag_id, self.run_id = dag_id, run_id
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def generate(tmp_path: Path, **settings: Any) -> Any:
    from airflow_provider_imagen.operators.generate import ImagenGenerateOperator

    defaults: dict[str, Any] = {
        "task_id": "generate",
        "prompt": "a brass desk lamp, product photo",
        "size": "1:1",
        "output_path": str(tmp_path / "out"),
        "journal_path": str(tmp_path / "journal"),
        "deferrable": False,
        "expected_render": 0.2,
        "poll_interval": 0.1,
    }
    return ImagenGenerateOperator(**{**defaults, **settings})


def generate_context(**ti: Any) -> dict[str, Any]:
    return {"ti": GenerateTaskInstance(**ti)}


def test_single_image_wrong_key_is_caught_by_the_free_balance_read(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_imagen.api.errors import AuthenticationError

    use_connection(monkeypatch, host=emulator.base_url, password=WRONG_KEY)
    before = tree(tmp_path)
    with pytest.raises(AuthenticationError) as caught:
        generate(tmp_path).execute(generate_context())
    assert "GET /balance: HTTP 401, code 10003" in str(caught.value), str(caught.value)
    ledger = emulator.ledger()
    assert ledger["posts"] == 0 and ledger["balance_reads"] == 1
    assert tree(tmp_path) == before


def test_single_image_balance_below_one_image_fails_before_the_post(
    emulator: Any, imagen_connection: str, tmp_path: Path
) -> None:
    from airflow_provider_imagen.api.errors import InsufficientCreditsError

    emulator.set_balance(0)
    with pytest.raises(InsufficientCreditsError, match="balance is 0 credits, less than one image"):
        generate(tmp_path).execute(generate_context())
    assert emulator.ledger()["posts"] == 0


def test_single_image_unwritable_output_fails_before_the_post(
    emulator: Any, imagen_connection: str, tmp_path: Path
) -> None:
    target = blocked(tmp_path, "hero.png")
    with pytest.raises(ImagenError, match=r"output_path='.*/blocker': cannot write there"):
        generate(tmp_path, output_path=str(target)).execute(generate_context())
    assert emulator.ledger()["posts"] == 0


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (
            {"output_path": "/tmp/imagery/hero.jpg"},
            "output_path='/tmp/imagery/hero.jpg': the API renders PNG",
        ),
        ({"output_path": "rel/hero.png"}, "output_path='rel/hero.png': must be absolute"),
        ({"prompt": ""}, "prompt='': must not be empty"),
        ({"size": "2:1"}, "size='2:1': must be one of"),
        ({"timeout": "600"}, "timeout='600': must be a number, not str"),
        ({"deferrable": "yes"}, "deferrable='yes': must be True or False"),
    ],
    ids=[
        "jpg file",
        "relative file",
        "empty prompt",
        "size 2:1",
        "timeout text",
        "flag text",
    ],
)
def test_single_image_bad_settings_fail_at_dag_parse(
    settings: dict[str, Any], fragment: str, emulator: Any, tmp_path: Path
) -> None:
    with pytest.raises(ValueError) as caught:
        generate(tmp_path, **settings)
    assert fragment in str(caught.value), str(caught.value)
    assert emulator.ledger()["requests"] == 0


def test_single_image_output_template_rendering_to_a_relative_path_fails_before_the_post(
    emulator: Any, imagen_connection: str, tmp_path: Path
) -> None:
    """Checked once rendered (``""`` stays "no output", as ``None``: the operator's output is optional)."""
    from airflow.sdk.exceptions import AirflowFailException

    op = generate(tmp_path, output_path="{{ params.out }}")
    with pytest.raises(AirflowFailException) as caught:
        render(op, params={"out": "rel/hero.png"})
    assert "output_path='rel/hero.png': must be absolute" in str(caught.value)
    assert "(rendered from '{{ params.out }}')" in str(caught.value)
    assert emulator.ledger()["requests"] == 0


def test_an_ambiguous_submit_is_reported_once_on_retry_not_wrapped_twice(
    emulator: Any, imagen_connection: str, tmp_path: Path
) -> None:
    """The POST is answered 502 after the task was created: the first try cannot know its id; the retry
    refuses to pay again, with one clear message (not the first try's message wrapped in a second)."""
    from airflow_provider_imagen.api.errors import AmbiguousSubmitError

    messages = []
    for _try in range(2):
        with pytest.raises(AmbiguousSubmitError) as caught:
            generate(tmp_path, prompt="a lamp [[ambiguous]]").execute(generate_context())
        messages.append(str(caught.value))
    first, retry = messages
    assert first.count("submit outcome unknown") == 1, first
    assert retry.count("submit outcome unknown") == 1 and retry.count("HTTP 502") == 1, retry
    assert "an earlier try sent this request but never learned its task id (HTTP 502" in retry
    ledger = emulator.ledger()
    assert ledger["posts"] == ledger["tasks_created"] == 1  # the retry sent nothing


def test_two_dags_with_one_task_id_and_folder_on_a_scheduled_run_keep_both_images(
    emulator: Any, imagen_connection: str, tmp_path: Path
) -> None:
    run_id = "scheduled__2026-12-07T00:00:00+00:00"
    uris = set()
    for dag_id, prompt in (("catalog_a", "a brass lamp"), ("catalog_b", "a walnut table")):
        op = generate(tmp_path, prompt=prompt, journal_path=str(tmp_path / f"journal_{dag_id}"))
        uris.add(op.execute(generate_context(dag_id=dag_id, run_id=run_id))["image_uri"])
    assert emulator.ledger()["tasks_created"] == 2
    assert len(uris) == 2 and len(list((tmp_path / "out").glob("*.png"))) == 2, uris
