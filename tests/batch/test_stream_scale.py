"""A batch streaming on one worker does per round what its window asks, whatever the table's size.

Counted, not timed: the rows laid into the folded journal, the rows the window index classifies and
the entries built from snapshots, over the same rounds of a run whose table has 1,000 or 20,000 rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_imagen.batch import window as window_module
from airflow_provider_imagen.batch.engine import entries_for_next_pass
from airflow_provider_imagen.batch.journal import Journal, JournalEntries, JournalEntry, new_record
from airflow_provider_imagen.batch.specs import expand_specs
from airflow_provider_imagen.batch.window import WindowIndex

WINDOW = 20
ROUNDS = 30
ENDS_PER_ROUND = 5


class Counter:
    """Rows read or classified, wherever a pass could read them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        add_level = JournalEntries.add_level
        replace_levels = JournalEntries.replace_levels
        from_state = JournalEntry.from_state.__func__  # type: ignore[attr-defined]
        index_init = WindowIndex.__init__

        def counted_add(entries: JournalEntries, table: Any) -> None:
            self.rows += table.num_rows
            add_level(entries, table)

        def counted_replace(entries: JournalEntries, merged: int, table: Any) -> None:
            self.rows += table.num_rows
            replace_levels(entries, merged, table)

        def counted_state(cls: type[JournalEntry], key: str, state: str) -> JournalEntry:
            self.rows += 1
            return from_state(cls, key, state)  # type: ignore[no-any-return]

        def counted_init(index: WindowIndex, specs: Any, *args: Any, **kwargs: Any) -> None:
            self.rows += len(specs)
            index_init(index, specs, *args, **kwargs)

        monkeypatch.setattr(JournalEntries, "add_level", counted_add)
        monkeypatch.setattr(JournalEntries, "replace_levels", counted_replace)
        monkeypatch.setattr(JournalEntry, "from_state", classmethod(counted_state))
        monkeypatch.setattr(window_module.WindowIndex, "__init__", counted_init)


def fold(journal: Journal, entries: Any, index: WindowIndex, records: list[dict[str, Any]]) -> None:
    """Write ``records`` as a pass does: one segment, folded into the entries, the index touched."""
    journal.append(records)
    for rec in records:
        entry = entries.get(rec["k"])
        if entry is None:
            entry = entries[rec["k"]] = JournalEntry(rec["k"])
        entry.apply(rec)
    index.touch([rec["k"] for rec in records], entries)


def finished_run(tmp_path: Path, rows: int) -> tuple[Journal, list[Any]]:
    """A journal whose rows all ended but the last few hundred, compacted into one snapshot."""
    specs = expand_specs([{"prompt_id": f"p{i:06d}", "prompt": f"item {i}"} for i in range(rows)])
    journal = Journal(str(tmp_path), dag_id="d", task_id="t", run_id=f"r{rows}", compact_over=20)
    done = []
    for spec in specs[: rows - 300]:
        task = f"t-{spec.key}"
        done += [
            new_record("intent", spec.key, a="a", d=spec.digest),
            new_record("submitted", spec.key, a="a", task_id=task),
            new_record("terminal", spec.key, task_id=task, status="completed"),
            new_record("mirrored", spec.key, task_id=task, image={"uri": f"file:///i/{spec.key}.png"}),
        ]
    journal.append(done)
    Journal(str(tmp_path), dag_id="d", task_id="t", run_id=f"r{rows}", compact_over=0).load()
    return journal, specs


def rows_per_round(tmp_path: Path, rows: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    journal, specs = finished_run(tmp_path, rows)
    entries: Any = journal.load()
    index = WindowIndex(specs, entries, retry_mirror_after=0.0, retry_rejected_before=0.0)
    index.paid_since(0.0)
    counter = Counter(monkeypatch)
    counts = []
    for _ in range(ROUNDS):
        before = counter.rows
        plan = index.plan(max_in_flight=WINDOW)
        for spec in plan.to_submit:
            fold(journal, entries, index, [new_record("intent", spec.key, a="b", d=spec.digest)])
            fold(journal, entries, index, [new_record("submitted", spec.key, a="b", task_id=f"t-{spec.key}")])
        ended = list(plan.in_flight.items())[:ENDS_PER_ROUND]
        ends = [new_record("terminal", k, task_id=t, status="completed") for k, t in ended]
        fold(journal, entries, index, ends)
        image = {"uri": "file:///i/x.png"}
        fold(journal, entries, index, [new_record("mirrored", k, task_id=t, image=image) for k, t in ended])
        index.paid_since(0.0)  # a progress line
        kept = entries_for_next_pass(journal, entries)
        if kept is None:  # what a pass does after a full read
            entries = journal.load()
            index = WindowIndex(specs, entries, retry_mirror_after=0.0, retry_rejected_before=0.0)
        counts.append(counter.rows - before)
    monkeypatch.undo()
    return counts


def test_a_streaming_run_reads_per_round_what_its_window_changed_not_its_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = rows_per_round(tmp_path / "small", 1_000, monkeypatch)
    large = rows_per_round(tmp_path / "large", 20_000, monkeypatch)
    assert sum(small) > 0  # the rounds did compact
    assert large == small
    assert max(large) < 200


def test_compacting_from_memory_writes_what_a_full_read_would(tmp_path: Path) -> None:
    journal, specs = finished_run(tmp_path, 400)
    entries = journal.load()
    index = WindowIndex(specs, entries)
    for spec in specs[100:160]:
        fold(journal, entries, index, [new_record("intent", spec.key, a="c", d=spec.digest)])
        fold(journal, entries, index, [new_record("submitted", spec.key, a="c", task_id=f"u-{spec.key}")])
    assert journal.compact_appended(entries)
    assert journal.appended == 0 and journal.holds_only(entries)
    names = [p.name for p in journal._segments()]
    assert all(name.endswith(".arrow") for name in names)  # every segment folded, none left
    again = Journal(str(tmp_path), dag_id="d", task_id="t", run_id="r400").load()
    assert set(again) == set(entries)
    assert all(again[key].to_state() == entries[key].to_state() for key in entries)
    assert len(index._task_key) == len(index.in_flight)  # ended tasks leave the lookup map


def test_another_writers_segment_makes_the_stream_read_the_journal_again(tmp_path: Path) -> None:
    journal, specs = finished_run(tmp_path, 100)
    entries = journal.load()
    index = WindowIndex(specs, entries)
    spec = specs[-1]
    fold(journal, entries, index, [new_record("intent", spec.key, a="d", d=spec.digest)])
    other = Journal(str(tmp_path), dag_id="d", task_id="t", run_id="r100")
    other._next_seq = 10**6
    other.append([new_record("rejected", spec.key, a="d", refusal="not_sent", reason="not sent")])
    assert not journal.compact_appended(entries)
    assert not journal.holds_only(entries)  # the run's end reads the journal again
    journal.compact_over = 0
    assert entries_for_next_pass(journal, entries) is None
    assert journal.load()[spec.key].rejected_kind == "not_sent"
