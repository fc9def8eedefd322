"""The prompt table: reading it from every kind of source, and validating rows before anything is paid."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import ImagenInputError
from airflow_provider_imagen.api.models import DEFAULT_SIZE, MAX_PROMPT_CHARS, SIZES, ImageRequest
from airflow_provider_imagen.batch.specs import ImageSpec, expand_specs, raise_if_invalid, summarize_invalid
from airflow_provider_imagen.batch.table import (
    MAX_PROMPT_ID_CHARS,
    InvalidRowsError,
    PromptTableError,
    load_prompt_table,
    read_prompt_table,
)

SIZE_RULE = "must be one of 1:1, 4:3, 3:4, 16:9, 9:16"


def write_parquet(path: Path, data: dict[str, list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), path)
    return path


def only(specs: list[ImageSpec]) -> ImageSpec:
    assert len(specs) == 1, specs
    return specs[0]


def reason_of(record: dict[str, object], **kwargs: object) -> str | None:
    """Expand a one-row table (plus a valid row before it, so the bad one is row 1)."""
    good = {"prompt_id": "good", "prompt": "a lighthouse"}
    specs = expand_specs([good, record], **kwargs)  # type: ignore[arg-type]
    assert specs[0].valid
    bad = [s for s in specs if s.row == 1]
    assert len(bad) == 1
    return bad[0].invalid_reason


# -- reading -----------------------------------------------------------------------------------------


class TestReadPromptTable:
    def test_a_parquet_file(self, tmp_path: Path) -> None:
        path = write_parquet(tmp_path / "p.parquet", {"prompt_id": ["a", "b"], "prompt": ["x", "y"]})
        for source in (path, str(path), f"file://{path}", ObjectStoragePath(f"file://{path}")):
            table = read_prompt_table(source)
            assert table["prompt_id"].tolist() == ["a", "b"]
            assert table.index.tolist() == [0, 1]

    def test_a_folder_of_hive_partitions_in_sorted_order(self, tmp_path: Path) -> None:
        root = tmp_path / "prompts"
        write_parquet(root / "ds=2026-01-02" / "part-0.parquet", {"prompt_id": ["c"], "prompt": ["z"]})
        write_parquet(root / "ds=2026-01-01" / "part-1.parquet", {"prompt_id": ["b"], "prompt": ["y"]})
        write_parquet(root / "ds=2026-01-01" / "part-0.parquet", {"prompt_id": ["a"], "prompt": ["x"]})
        (root / "_SUCCESS").write_text("")
        (root / "ds=2026-01-01" / ".part-0.parquet.crc").write_bytes(b"not parquet")
        table = read_prompt_table(ObjectStoragePath(f"file://{root}"))
        assert table["prompt_id"].tolist() == ["a", "b", "c"]
        assert table["ds"].tolist() == ["2026-01-01", "2026-01-01", "2026-01-02"]
        assert table.index.tolist() == [0, 1, 2]

    def test_a_list_of_records_keeps_exact_values(self) -> None:
        table = read_prompt_table(
            [{"prompt_id": 1, "prompt": "x"}, {"prompt_id": None, "prompt": "y", "n": 3}]
        )
        assert table["prompt_id"].tolist() == [1, None]  # not [1.0, nan]
        assert list(table.columns) == ["prompt_id", "prompt", "n"]

    def test_a_dataframe_gets_a_fresh_row_numbering(self) -> None:
        frame = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x", "y"]}, index=[10, 20])
        assert read_prompt_table(frame).index.tolist() == [0, 1]

    def test_integer_ids_with_nulls_stay_integers(self, tmp_path: Path) -> None:
        path = tmp_path / "p.parquet"
        pq.write_table(pa.table({"prompt_id": pa.array([1, None], pa.int64()), "prompt": ["x", "y"]}), path)
        specs = expand_specs(read_prompt_table(path))
        assert specs[0].valid and specs[0].prompt_id == "1"
        assert specs[1].invalid_reason == "row 1: prompt_id=<NA>: is missing (null)"

    def test_files_written_by_pandas_keep_their_index_as_a_column_or_drop_it(self, tmp_path: Path) -> None:
        frame = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x", "y"]}, index=[10, 20])
        frame.to_parquet(tmp_path / "unnamed.parquet")
        frame.set_index("prompt_id").to_parquet(tmp_path / "named.parquet")
        assert list(read_prompt_table(tmp_path / "unnamed.parquet").columns) == ["prompt_id", "prompt"]
        named = read_prompt_table(tmp_path / "named.parquet")
        assert named["prompt_id"].tolist() == ["a", "b"] and named.index.tolist() == [0, 1]

    def test_a_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(PromptTableError, match=r"does not exist"):
            read_prompt_table(tmp_path / "nope.parquet")

    @pytest.mark.parametrize("empty", ["", "   "])
    def test_an_empty_path_never_reads_the_working_directory(
        self, empty: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``ObjectStoragePath("")`` is ``"."``: a stray Parquet file in the working directory (here, a
        perfectly valid prompt table) must not be read, let alone paid for."""
        pd.DataFrame({"prompt_id": ["stray"], "prompt": ["x"]}).to_parquet(tmp_path / "stray.parquet")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(PromptTableError, match=r"the path of the prompt table is empty"):
            load_prompt_table(empty)

    def test_a_file_that_is_not_parquet(self, tmp_path: Path) -> None:
        path = tmp_path / "prompts.csv"
        path.write_text("prompt_id,prompt\na,x\n")
        with pytest.raises(PromptTableError, match=r"prompts\.csv is not a readable Parquet file"):
            read_prompt_table(path)

    def test_a_folder_without_parquet_files(self, tmp_path: Path) -> None:
        (tmp_path / "README.md").write_text("hi")
        with pytest.raises(PromptTableError, match=r"no Parquet files .* found only \['README.md'\]"):
            read_prompt_table(tmp_path)

    def test_an_empty_table(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.parquet"
        pq.write_table(
            pa.table({"prompt_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), path
        )
        with pytest.raises(PromptTableError, match=r"has no rows"):
            read_prompt_table(path)
        with pytest.raises(PromptTableError, match=r"has no rows"):
            read_prompt_table([])

    def test_a_missing_column_is_named_with_its_mapping_parameter(self, tmp_path: Path) -> None:
        path = write_parquet(tmp_path / "p.parquet", {"sku": ["a"], "text": ["x"]})
        with pytest.raises(PromptTableError) as caught:
            read_prompt_table(path)
        message = str(caught.value)
        assert "'prompt_id' (set with id_column=…)" in message
        assert "'prompt' (set with prompt_column=…)" in message
        assert "columns found: ['sku', 'text']" in message
        assert isinstance(caught.value, ImagenInputError)

    def test_custom_column_names(self, tmp_path: Path) -> None:
        path = write_parquet(tmp_path / "p.parquet", {"sku": ["a"], "text": ["x"], "ratio": ["1:1"]})
        names = {"id_column": "sku", "prompt_column": "text", "size_column": "ratio"}
        spec = only(expand_specs(read_prompt_table(path, **names), **names))
        assert (spec.key, spec.prompt, spec.size) == ("a|1:1|v0", "x", "1:1")

    def test_an_explicit_size_column_must_exist(self) -> None:
        with pytest.raises(PromptTableError, match=r"'ratio' \(set with size_column=…\)"):
            expand_specs([{"prompt_id": "a", "prompt": "x"}], size_column="ratio")

    def test_unreadable_sources(self) -> None:
        with pytest.raises(PromptTableError, match=r"cannot read a prompt table from a int"):
            read_prompt_table(3)  # type: ignore[arg-type]
        with pytest.raises(PromptTableError, match=r"record 1 of the prompt list is a str"):
            read_prompt_table([{"prompt_id": "a", "prompt": "x"}, "oops"])  # type: ignore[list-item]


# -- sizes and variations ----------------------------------------------------------------------------


class TestFanOut:
    def test_a_size_list_times_variations(self, tmp_path: Path) -> None:
        path = tmp_path / "p.parquet"
        pq.write_table(
            pa.table({"prompt_id": ["sku-1"], "prompt": ["a red bicycle"], "size": [list(SIZES)]}), path
        )
        specs = expand_specs(read_prompt_table(path), variations=2)
        assert len(specs) == 10
        assert len({s.key for s in specs}) == 10
        assert [(s.size, s.variation) for s in specs] == [(size, v) for size in SIZES for v in (0, 1)]
        assert all(s.valid and s.request == ImageRequest("a red bicycle", s.size) for s in specs)
        assert specs[0].key == "sku-1|1:1|v0"

    def test_table_wide_sizes_apply_to_rows_without_their_own(self) -> None:
        specs = expand_specs(
            [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y", "size": "9:16"}],
            sizes=["1:1", "4:3"],
        )
        assert [s.key for s in specs] == ["a|1:1|v0", "a|4:3|v0", "b|9:16|v0"]

    def test_the_default_size(self) -> None:
        assert only(expand_specs([{"prompt_id": "a", "prompt": "x"}])).size == DEFAULT_SIZE
        assert only(expand_specs([{"prompt_id": "a", "prompt": "x"}], default_size="3:4")).size == "3:4"

    def test_null_and_blank_size_cells_mean_not_given(self) -> None:
        specs = expand_specs(
            [{"prompt_id": "a", "prompt": "x", "size": None}, {"prompt_id": "b", "prompt": "x", "size": ""}],
            sizes=["1:1"],
        )
        assert [s.key for s in specs] == ["a|1:1|v0", "b|1:1|v0"]

    def test_a_ratio_listed_twice_is_requested_once(self) -> None:
        specs = expand_specs([{"prompt_id": "a", "prompt": "x", "size": ["1:1", "1:1", "4:3"]}])
        assert [s.key for s in specs] == ["a|1:1|v0", "a|4:3|v0"]

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"variations": 0}, "variations=0: must be an integer of at least 1"),
            ({"variations": True}, "variations=True"),
            ({"sizes": []}, r"sizes=\[\]: list at least one ratio"),
            ({"sizes": ["2:1"]}, f"sizes: size='2:1': {SIZE_RULE}"),
            ({"default_size": "1x1"}, f"default_size: size='1x1': {SIZE_RULE}"),
        ],
    )
    def test_bad_settings_fail_the_whole_call(self, kwargs: dict[str, object], message: str) -> None:
        with pytest.raises(ImagenInputError, match=message):
            expand_specs([{"prompt_id": "a", "prompt": "x"}], **kwargs)  # type: ignore[arg-type]

    def test_keys_are_stable_across_runs_and_row_order(self) -> None:
        records = [{"prompt_id": f"id-{i}", "prompt": f"p {i}", "size": ["1:1", "16:9"]} for i in range(50)]
        first = {s.key for s in expand_specs(records, variations=3)}
        again = {s.key for s in expand_specs(list(reversed(records)), variations=3)}
        assert first == again
        assert len(first) == 50 * 2 * 3

    def test_ids_with_pipes_keep_keys_unique(self) -> None:
        specs = expand_specs(
            [{"prompt_id": "a|1:1|v0", "prompt": "x"}, {"prompt_id": "a", "prompt": "y"}], sizes=["1:1"]
        )
        assert len({s.key for s in specs}) == 2
        assert [s.key.rsplit("|", 2)[0] for s in specs] == ["a|1:1|v0", "a"]


# -- validation --------------------------------------------------------------------------------------


class TestRowValidation:
    @pytest.mark.parametrize(
        ("prompt_id", "expected"),
        [
            (None, "row 1: prompt_id=None: is missing (null)"),
            (float("nan"), "row 1: prompt_id=nan: is missing (null)"),
            ("", "row 1: prompt_id='': must not be empty or only whitespace"),
            ("   ", "row 1: prompt_id='   ': must not be empty or only whitespace"),
            (3.0, "row 1: prompt_id=3.0: must be a string or an integer, not float"),
            (True, "row 1: prompt_id=True: must be a string or an integer, not bool"),
            (b"sku", "row 1: prompt_id=b'sku': must be a string or an integer, not bytes"),
            ("a/b", "row 1: prompt_id='a/b': must not contain '/', '\\' or '..'"),
            ("a\\b", "row 1: prompt_id='a\\\\b': must not contain '/', '\\' or '..'"),
            ("../etc", "row 1: prompt_id='../etc': must not contain '/', '\\' or '..'"),
            ("a..b", "row 1: prompt_id='a..b': must not contain '/', '\\' or '..'"),
            (
                "a\nb",
                "row 1: prompt_id='a\\nb': must not contain control characters (found '\\n' at position 1)",
            ),
            ("a\x00", "row 1: prompt_id='a\\x00': must not contain control characters"),
            ("a\ud800", "row 1: prompt_id='a\\ud800': is not valid UTF-8 text (character at position 1)"),
        ],
    )
    def test_bad_prompt_ids(self, prompt_id: object, expected: str) -> None:
        reason = reason_of({"prompt_id": prompt_id, "prompt": "a lighthouse"})
        assert reason is not None and reason.startswith(expected), reason

    def test_prompt_id_length(self) -> None:
        assert reason_of({"prompt_id": "x" * MAX_PROMPT_ID_CHARS, "prompt": "p"}) is None
        reason = reason_of({"prompt_id": "x" * (MAX_PROMPT_ID_CHARS + 1), "prompt": "p"})
        assert reason is not None and reason.endswith("is 201 characters; at most 200 are allowed")

    def test_integer_ids_become_text(self) -> None:
        spec = only(expand_specs([{"prompt_id": 42, "prompt": "x"}]))
        assert spec.valid and spec.prompt_id == "42" and spec.key == "42|16:9|v0"

    def test_duplicates_name_the_first_row(self) -> None:
        specs = expand_specs(
            [
                {"prompt_id": "sku-1", "prompt": "x"},
                {"prompt_id": "sku-2", "prompt": "y"},
                {"prompt_id": "sku-1", "prompt": "z"},
                {"prompt_id": "sku-1", "prompt": "w"},
                {"prompt_id": 7, "prompt": "w"},
                {"prompt_id": "7", "prompt": "w"},
            ]
        )
        assert [s.valid for s in specs] == [True, True, False, False, True, False]
        assert specs[2].invalid_reason == (
            "row 2 (prompt_id 'sku-1'): prompt_id='sku-1': duplicates row 0; every prompt_id must be unique"
        )
        assert specs[3].invalid_reason is not None and "duplicates row 0" in specs[3].invalid_reason
        assert specs[5].invalid_reason is not None and "duplicates row 4" in specs[5].invalid_reason

    @pytest.mark.parametrize(
        ("prompt", "expected"),
        [
            (None, "row 1 (prompt_id 'sku-1'): prompt=None: is missing (null)"),
            (float("nan"), "row 1 (prompt_id 'sku-1'): prompt=nan: is missing (null)"),
            ("", "row 1 (prompt_id 'sku-1'): prompt='': must not be empty or only whitespace"),
            (" \t\n", "row 1 (prompt_id 'sku-1'): prompt=' \\t\\n': must not be empty or only whitespace"),
            (12, "row 1 (prompt_id 'sku-1'): prompt=12: must be a string, not int"),
            (b"a cat", "row 1 (prompt_id 'sku-1'): prompt=b'a cat': must be a string, not bytes"),
            ("a cat \udcff", "row 1 (prompt_id 'sku-1'): prompt='a cat \\udcff': is not valid UTF-8 text"),
        ],
    )
    def test_bad_prompts(self, prompt: object, expected: str) -> None:
        reason = reason_of({"prompt_id": "sku-1", "prompt": prompt})
        assert reason is not None and reason.startswith(expected), reason

    def test_prompt_length_is_counted_in_characters(self) -> None:
        assert reason_of({"prompt_id": "sku-1", "prompt": "猫" * MAX_PROMPT_CHARS}) is None
        reason = reason_of({"prompt_id": "sku-1", "prompt": "a" * (MAX_PROMPT_CHARS + 1)})
        assert reason is not None
        assert reason.startswith("row 1 (prompt_id 'sku-1'): prompt=")
        assert reason.endswith("is 4001 characters; at most 4000 are allowed")
        assert len(reason) < 300  # the prompt itself is shortened in the message

    def test_chinese_prompts_are_valid(self) -> None:
        spec = only(expand_specs([{"prompt_id": "茶-1", "prompt": "一只在竹林里喝茶的熊猫，水墨画风格"}]))
        assert spec.valid and spec.request is not None
        assert spec.request.prompt == "一只在竹林里喝茶的熊猫，水墨画风格"

    @pytest.mark.parametrize(
        ("size", "expected_sizes", "expected"),
        [
            ("2:1", ["2:1"], f"row 1 (prompt_id 'sku-1'): size='2:1': {SIZE_RULE}"),
            (" 1:1", [" 1:1"], f"row 1 (prompt_id 'sku-1'): size=' 1:1': {SIZE_RULE}"),
            (1.5, ["1.5"], f"row 1 (prompt_id 'sku-1'): size=1.5: {SIZE_RULE}"),
            ([], [""], "row 1 (prompt_id 'sku-1'): size=[]: must list at least one ratio"),
        ],
    )
    def test_bad_sizes(self, size: object, expected_sizes: list[str], expected: str) -> None:
        specs = expand_specs(
            [{"prompt_id": "sku-0", "prompt": "x"}, {"prompt_id": "sku-1", "prompt": "x", "size": size}]
        )
        bad = [s for s in specs if s.row == 1]
        assert [s.size for s in bad] == expected_sizes
        assert [s.invalid_reason for s in bad] == [expected]
        assert [s.key for s in bad] == [f"invalid/row1|{expected_sizes[0]}|v0"]

    def test_one_bad_ratio_in_a_list_spoils_only_that_ratio(self) -> None:
        specs = expand_specs(
            [{"prompt_id": "sku-1", "prompt": "x", "size": ["1:1", "2:1", None]}], variations=2
        )
        assert [(s.size, s.variation, s.valid) for s in specs] == [
            ("1:1", 0, True),
            ("1:1", 1, True),
            ("2:1", 0, False),
            ("2:1", 1, False),
            ("None", 0, False),
            ("None", 1, False),
        ]
        assert specs[2].invalid_reason == f"row 0 (prompt_id 'sku-1'): size[1]='2:1': {SIZE_RULE}"
        assert specs[4].invalid_reason == f"row 0 (prompt_id 'sku-1'): size[2]=None: {SIZE_RULE}"

    def test_invalid_rows_still_produce_every_spec_they_can(self) -> None:
        specs = expand_specs([{"prompt_id": "sku-1", "prompt": "", "size": ["1:1", "4:3"]}], variations=2)
        assert len(specs) == 4 and not any(s.valid for s in specs)
        assert all(s.request is None for s in specs)
        assert len({s.key for s in specs}) == 4
        assert {s.key.split("|")[0] for s in specs} == {"invalid/row0"}

    def test_several_broken_rules_are_all_named(self) -> None:
        reason = reason_of({"prompt_id": None, "prompt": b"x", "size": "7:1"})
        assert reason == (
            "row 1: prompt_id=None: is missing (null); prompt=b'x': must be a string, not bytes; "
            f"size='7:1': {SIZE_RULE}"
        )

    def test_invalid_text_is_escaped_so_the_manifest_can_store_it(self) -> None:
        spec = only(expand_specs([{"prompt_id": "a\ud800", "prompt": "b\udcff"}]))
        assert spec.prompt_id == "a\\ud800" and spec.prompt == "b\\udcff"
        spec.prompt_id.encode("utf-8")  # does not raise


class TestInvalidPolicy:
    def test_summary_counts_rows_images_and_distinct_reasons(self) -> None:
        records = [{"prompt_id": f"id-{i}", "prompt": "" if i % 2 else "ok"} for i in range(30)]
        specs = expand_specs(records, sizes=list(SIZES), variations=2)
        summary = summarize_invalid(specs, limit=3)
        assert summary.startswith("15 invalid row(s) (150 requested image(s)) will not be sent")
        assert "first 3 of 15 reason(s)" in summary
        assert "row 1 (prompt_id 'id-1'): prompt='': must not be empty or only whitespace" in summary
        assert summary.endswith("… and 12 more")

    def test_raise_if_invalid(self) -> None:
        good = expand_specs([{"prompt_id": "a", "prompt": "x"}])
        raise_if_invalid(good)
        assert summarize_invalid(good) == "no invalid rows"
        specs = expand_specs(
            [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "x", "size": "2:1"}]
        )
        with pytest.raises(InvalidRowsError, match=r"nothing was submitted") as caught:
            raise_if_invalid(specs)
        assert "row 1 (prompt_id 'b'): size='2:1'" in str(caught.value)
        assert [s.row for s in caught.value.invalid] == [1]
        assert isinstance(caught.value, ImagenInputError)


def test_100k_rows_expand_correctly(tmp_path: Path) -> None:
    n = 100_000
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.table(
            {
                "prompt_id": [f"sku-{i}" for i in range(n)],
                "prompt": ["" if i % 1000 == 999 else f"a product photo of item {i}" for i in range(n)],
            }
        ),
        path,
    )
    started = time.perf_counter()
    specs = expand_specs(read_prompt_table(path))
    elapsed = time.perf_counter() - started
    print(f"\nread + expand + validate {n} rows: {elapsed:.2f} s")
    assert len(specs) == n
    assert sum(not s.valid for s in specs) == 100
    assert len({s.key for s in specs}) == n


def test_a_batch_pass_reads_and_writes_without_pandas_or_the_provider_discovery(tmp_path: Path) -> None:
    """Each pass of a batch is a new process: pandas (~0.3 s) and the discovery of every provider's file
    systems and lineage factories (boto3 with the Amazon provider, ~0.7 s) would be paid on every pass.
    Checked in a fresh interpreter, since this test process has imported both long ago."""
    source = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["x", "y"], "size": ["1:1", "16:9"]}), source)
    script = f"""
import sys
from airflow_provider_imagen.batch.journal import Journal, new_record
from airflow_provider_imagen.batch.manifest import write_manifest
from airflow_provider_imagen.batch.storage import as_path, write_whole
from airflow_provider_imagen.batch.table import load_prompt_table
from airflow_provider_imagen.batch.specs import expand_specs
specs = expand_specs(load_prompt_table("file://{source}"))
assert [s.key for s in specs] == ["a|1:1|v0", "b|16:9|v0"], specs
journal = Journal("{tmp_path}/journal", dag_id="d", task_id="t", run_id="r")
journal.append([new_record("intent", specs[0].key, attempt=0)])
assert specs[0].key in journal.load()
write_whole(as_path("{tmp_path}/images/a.png"), b"png")
print(sorted(m for m in ("pandas", "boto3", "pyarrow.dataset") if m in sys.modules), flush=True)
# Skip the interpreter's teardown: pyarrow's Parquet threads can abort it under load ("terminate called
# without an active exception", apache/arrow#34314, seen once in a full CI run) after the work is done.
import os
os._exit(0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "images" / "a.png").read_bytes() == b"png"
