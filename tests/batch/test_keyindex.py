"""The compact key index: lookups by hash, confirmed by the key, newest entries first."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from airflow_provider_imagen.batch.journal import JournalEntries, JournalEntry, _state_table
from airflow_provider_imagen.batch.keyindex import KeyIndex, key_hashes


def _index(keys: list[str]) -> KeyIndex:
    return KeyIndex(key_hashes(keys), np.arange(len(keys), dtype=np.int64), keys.__getitem__)


def test_lookups_hit_and_miss() -> None:
    keys = [f"p{i}|1:1|v0" for i in range(1000)]
    index = _index(keys)
    assert all(index.get(key) == i for i, key in enumerate(keys))
    assert index["p7|1:1|v0"] == 7
    assert index.get("absent") is None
    assert "absent" not in index and "p3|1:1|v0" in index
    with pytest.raises(KeyError):
        index["absent"]


def test_colliding_hashes_are_told_apart_by_their_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_imagen.batch import keyindex

    monkeypatch.setattr(keyindex, "hash", lambda key: 42, raising=False)  # every key collides
    keys = ["a", "b", "c", "b"]
    index = _index(keys)
    assert [index.get(k) for k in keys] == [0, 1, 2, 1]
    assert index.get("d") is None
    assert index.first_values().tolist() == [True, True, True, False]


def test_first_given_wins_and_shadows_later_entries() -> None:
    keys = ["k", "x", "k"]
    index = _index(keys)
    assert index.get("k") == 0
    assert index.first_values()[index.values == 2].tolist() == [False]


def test_laid_over_puts_new_entries_first_and_drops_what_keep_excludes() -> None:
    keys = ["a", "b", "c", "a", "d"]  # 3 and 4: a newer "a" and a new "d"
    index = KeyIndex(key_hashes(keys[:3]), np.arange(3, dtype=np.int64), keys.__getitem__)
    keep = index.values != 1  # "b" leaves
    newer = index.laid_over(key_hashes(keys[3:]), np.array([3, 4], dtype=np.int64), keep)
    assert [newer.get(k) for k in ("a", "b", "c", "d")] == [3, None, 2, 4]
    assert sorted(newer.values[newer.first_values()].tolist()) == [2, 3, 4]


def _entry(key: str, status: str | None) -> JournalEntry:
    entry = JournalEntry(key, digest="d", attempts={"a": "submitted"}, task_ids=[f"t-{key}"])
    entry.status = status
    if status == "completed":
        entry.mirrored = {"uri": f"file:///{key}.png"}
    return entry


def test_journal_entries_read_the_newest_level_and_iterate_each_key_once() -> None:
    entries = JournalEntries()
    entries.add_level(_state_table([_entry("a", None), _entry("b", "completed")]))
    entries.add_level(_state_table([_entry("a", "completed"), _entry("c", None)]))
    assert entries["a"].status == "completed"
    assert sorted(entries) == ["a", "b", "c"] and len(entries) == 3
    del entries["b"]
    assert "b" not in entries and len(entries) == 2
    # A later level naming a deleted key brings it back, as its rows say.
    entries.replace_levels(1, _state_table([_entry("a", "completed"), _entry("b", None), _entry("c", None)]))
    assert sorted(entries) == ["a", "b", "c"]
    assert entries.peek("b") is not None and entries.peek("b").status is None  # type: ignore[union-attr]
    assert isinstance(entries._levels[-1], pa.Table) and len(entries._levels) == 2
