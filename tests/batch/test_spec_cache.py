"""The specs cache: a resume reads what the first pass expanded, exactly, and never a stale table's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_imagen.api.models import request_digest
from airflow_provider_imagen.batch import spec_cache
from airflow_provider_imagen.batch.journal import Journal, new_record
from airflow_provider_imagen.batch.spec_cache import (
    CACHE_FOLDER,
    SpecTable,
    cache_specs,
    fingerprint,
    load_specs,
    read_cache,
)
from airflow_provider_imagen.batch.specs import expand_specs
from airflow_provider_imagen.batch.storage import as_path
from airflow_provider_imagen.batch.table import load_prompt_table
from airflow_provider_imagen.batch.window import WindowIndex, plan_window

ARGS: dict[str, Any] = {"sizes": ["1:1", "16:9"], "variations": 2}


def messy_table() -> pa.Table:
    """Valid rows, invalid rows of every kind, and size cells that are lists, blanks and bad ratios."""
    return pa.table(
        {
            "prompt_id": ["a", "b", "a", "", "c", "d", "e", None, "f"],
            "prompt": ["one", "two", "dup of a", "no id", None, "  ", "sizes", "null id", "bad size"],
            "size": [None, ["1:1", "9:16", "1:1"], None, None, None, None, ["4:3", "3:4"], None, ["2:1"]],
        }
    )


@pytest.fixture
def folder(tmp_path: Path) -> Any:
    return as_path(str(tmp_path / "journal" / CACHE_FOLDER))


@pytest.fixture
def expansions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the expansions the cache module runs (each parses every row of the table)."""
    calls: list[int] = []
    real = spec_cache.expand_specs

    def counting(table: Any, **kwargs: Any) -> Any:
        calls.append(len(table))
        return real(table, **kwargs)

    monkeypatch.setattr(spec_cache, "expand_specs", counting)
    return calls


def test_cached_specs_equal_fresh_ones_invalid_rows_size_lists_and_variations(folder: Any) -> None:
    table = messy_table()
    fresh = expand_specs(table, **ARGS)
    assert any(not s.valid for s in fresh) and any(s.valid for s in fresh)
    assert cache_specs(table, folder, fresh, **ARGS)
    cached = load_specs(table, folder, reuse=True, **ARGS)
    assert isinstance(cached, SpecTable)
    assert len(cached) == len(fresh)
    assert [cached[i] for i in range(len(cached))] == fresh  # one at a time
    assert list(SpecTable(cached._table)) == fresh  # whole columns at once
    assert cached.keys == [s.key for s in fresh]
    assert cached.valid == [s.valid for s in fresh]
    assert cached.digests == [s.digest for s in fresh]
    for spec, digest in zip(fresh, cached.digests, strict=True):
        expected = request_digest(spec.prompt, spec.size, spec.variation) if spec.valid else None  # type: ignore[arg-type]
        assert digest == expected
    assert [s.invalid_reason for s in cached.invalid()] == [s.invalid_reason for s in fresh if not s.valid]
    assert cached.invalid_count == sum(1 for s in fresh if not s.valid)
    assert cached[-1] == fresh[-1] and cached[2:5] == fresh[2:5]


def test_a_resume_over_an_unchanged_table_expands_nothing_and_builds_only_its_window(
    tmp_path: Path, folder: Any, expansions: list[int]
) -> None:
    rows = 500
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(rows)], "prompt": ["x"] * rows}), path)
    first = load_specs(load_prompt_table(str(path)), folder, reuse=False)  # the first pass writes it
    assert expansions == [rows]
    resumed = load_specs(load_prompt_table(str(path)), folder, reuse=True)
    assert expansions == [rows]  # read, not expanded
    assert isinstance(resumed, SpecTable) and resumed.materialized == 0
    # A journal where the first 100 were sent and are rendering: the index reads columns, and a plan
    # builds the specs of its window only.
    journal = Journal(tmp_path / "journal", dag_id="d", task_id="t", run_id="r")
    journal.append([new_record("intent", s.key, a="a", d=s.digest) for s in first[:100]])
    journal.append([new_record("submitted", s.key, a="a", task_id=f"t{s.row}") for s in first[:100]])
    index = WindowIndex(resumed, journal.load())
    plan = index.plan(max_in_flight=150)
    assert len(plan.in_flight) == 100 and [s.key for s in plan.to_submit] == [s.key for s in first[100:150]]
    assert resumed.materialized == 50
    expected = plan_window(first, journal.load(), max_in_flight=150)
    assert plan.in_flight == expected.in_flight and plan.to_submit == expected.to_submit


def test_an_edited_table_or_argument_is_expanded_again_never_served_stale(
    folder: Any, expansions: list[int]
) -> None:
    table = messy_table()
    load_specs(table, folder, reuse=False, **ARGS)
    edited = table.set_column(1, "prompt", pa.array(["one, edited", *table.column("prompt").to_pylist()[1:]]))
    specs = load_specs(edited, folder, reuse=True, **ARGS)
    assert len(expansions) == 2 and not isinstance(specs, SpecTable)
    assert specs[0].prompt == "one, edited" and specs[0].digest == request_digest("one, edited", "1:1", 0)
    # The edited table's specs are now the cached ones: the old file was dropped.
    assert [p.name for p in folder.iterdir()] == [f"{fingerprint(edited, **_all(ARGS))}.arrow"]
    assert list(load_specs(edited, folder, reuse=True, **ARGS)) == specs
    assert len(expansions) == 2
    load_specs(edited, folder, reuse=True, sizes=["1:1", "16:9"], variations=3)
    assert len(expansions) == 3  # another argument, another key


def test_the_fingerprint_covers_types_order_and_the_columns_used_only() -> None:
    table = pa.table({"prompt_id": ["1", "2"], "prompt": ["a", "b"], "note": ["x", "y"]})
    base = fingerprint(table, **_all({}))
    assert fingerprint(table.set_column(2, "note", pa.array(["z", "z"])), **_all({})) == base
    as_ints = table.set_column(0, "prompt_id", pa.array([1, 2]))
    assert fingerprint(as_ints, **_all({})) != base
    assert fingerprint(table.take([1, 0]), **_all({})) != base
    assert fingerprint(table, **_all({"default_size": "1:1"})) != base


def test_a_corrupt_or_foreign_cache_is_ignored_and_rebuilt(folder: Any, expansions: list[int]) -> None:
    table = messy_table()
    load_specs(table, folder, reuse=False, **ARGS)
    (file,) = list(folder.iterdir())
    whole = file.read_bytes()
    file.write_bytes(whole[: len(whole) // 2])  # a partial write
    assert read_cache(folder, file.stem) is None
    specs = load_specs(table, folder, reuse=True, **ARGS)
    assert len(expansions) == 2 and not isinstance(specs, SpecTable)
    assert isinstance(read_cache(folder, file.stem), SpecTable)  # rebuilt
    # A whole file under another table's name is not served either.
    other = folder / ("0" * 64 + ".arrow")
    other.write_bytes(file.read_bytes())
    assert read_cache(folder, "0" * 64) is None


def test_records_and_dataframes_are_expanded_not_cached(folder: Any, expansions: list[int]) -> None:
    records = load_prompt_table([{"prompt_id": "a", "prompt": "one"}])
    assert not isinstance(load_specs(records, folder, reuse=True), SpecTable)
    assert not cache_specs(records, folder, expand_specs(records))
    assert not folder.exists()


def _all(overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        "id_column": "prompt_id",
        "prompt_column": "prompt",
        "size_column": "size",
        "sizes": None,
        "default_size": "16:9",
        "variations": 1,
        **overrides,
    }
