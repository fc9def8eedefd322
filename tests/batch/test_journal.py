"""The journal on a real local folder: segments, the fold, compaction, and the write counter."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_imagen.batch.journal import Journal, new_record


def journal(tmp_path: Path, compact_over: int = 200) -> Journal:
    return Journal(str(tmp_path), dag_id="d", task_id="t", run_id="manual__x", compact_over=compact_over)


def segments(j: Journal) -> list[str]:
    return sorted(p.name for p in Path(j.path.path).iterdir())


def test_a_read_over_compact_over_segments_folds_them_into_one_snapshot(tmp_path: Path) -> None:
    j = journal(tmp_path, compact_over=20)
    for i in range(25):
        j.append([new_record("intent", f"k{i}|1:1|v0", attempt=0)])
        j.append([new_record("submitted", f"k{i}|1:1|v0", task_id=f"t{i}")])
    assert j.appended == 50 and len(segments(j)) == 50
    first = j.load()
    assert j.appended == 0  # the batch operator reads again after compact_over writes of its own
    assert len(segments(j)) == 1
    assert {k: e.task_id for k, e in first.items()} == {f"k{i}|1:1|v0": f"t{i}" for i in range(25)}
    j.append([new_record("terminal", "k3|1:1|v0", task_id="t3", status="completed")])
    again = journal(tmp_path, compact_over=20).load()  # another worker sees the same fold
    assert again["k3|1:1|v0"].status == "completed"
    assert {k: e.task_id for k, e in again.items()} == {k: e.task_id for k, e in first.items()}


def test_reads_below_the_threshold_leave_the_segments_alone(tmp_path: Path) -> None:
    j = journal(tmp_path, compact_over=20)
    for i in range(5):
        j.append([new_record("intent", f"k{i}|1:1|v0", attempt=0)])
    j.load()
    assert len(segments(j)) == 5 and j.appended == 0


# -- order, durability, concurrent compaction ----------------------------------------------------------


def test_segments_are_ordered_by_sequence_not_by_the_clock(tmp_path: Path, monkeypatch) -> None:
    """A clock that steps back between the intent and the answer cannot reorder them: names carry a
    sequence one past every segment the writer has seen."""
    import time as time_module

    j = journal(tmp_path)
    j.append([new_record("intent", "k|1:1|v0", a="a1")])
    monkeypatch.setattr(time_module, "time_ns", lambda: 1)  # a clock far in the past
    monkeypatch.setattr(time_module, "time", lambda: 1.0)
    j.append([new_record("submitted", "k|1:1|v0", a="a1", task_id="t1")])
    names = segments(j)
    assert [int(n.split("-")[0]) for n in names] == [1, 2]
    entry = journal(tmp_path).load()["k|1:1|v0"]
    assert entry.task_id == "t1" and not entry.unknown_submit
    # A second writer that never listed continues after what is there.
    other = journal(tmp_path)
    other.append([new_record("terminal", "k|1:1|v0", task_id="t1", status="completed")])
    assert int(segments(j)[-1].split("-")[0]) == 3


def test_two_readers_compacting_at_once_never_double_a_record(tmp_path: Path, monkeypatch) -> None:
    """A second reader compacts the same segments while the first is about to write its snapshot:
    both snapshots hold the same segments, and each ambiguous POST still counts once."""
    from airflow_provider_imagen.batch import journal as module

    j = journal(tmp_path, compact_over=10)
    for i in range(15):
        key = f"k{i}|1:1|v0"
        j.append([new_record("intent", key, a=f"a{i}")])
        j.append([new_record("ambiguous", key, a=f"a{i}", reason="502 after sending")])
    real = module.write_whole_from
    nested: list[int] = []

    def the_other_compacts_first(dest, fill):  # type: ignore[no-untyped-def]
        if dest.name.endswith(".arrow") and not nested:
            nested.append(1)
            journal(tmp_path, compact_over=10).load()  # compacts and deletes the same segments first
        real(dest, fill)

    monkeypatch.setattr(module, "write_whole_from", the_other_compacts_first)
    j.load()
    monkeypatch.setattr(module, "write_whole_from", real)
    assert [n.endswith(".arrow") for n in segments(j)] == [True, True]
    entries = journal(tmp_path).load()
    assert len(entries) == 15
    assert all(e.ambiguous_count == 1 and e.charged_submits == 1 for e in entries.values())
    j.append([new_record("terminal", "k0|1:1|v0", task_id="t0", status="failed")])
    journal(tmp_path, compact_over=1).load()  # a later level over both
    later = journal(tmp_path).load()
    assert all(e.ambiguous_count == 1 for e in later.values()) and len(later) == 15


def test_a_crash_between_the_snapshot_and_the_deletes_leaves_nothing_counted_twice(tmp_path: Path) -> None:
    from pathlib import Path as P

    j = journal(tmp_path, compact_over=10)
    for i in range(12):
        j.append([new_record("intent", f"k{i}|1:1|v0", a=f"a{i}")])
    kept = {name: (P(j.path.path) / name).read_bytes() for name in segments(j)}
    j.load()  # snapshot written, segments deleted: put them back as a crash before the deletes would
    for name, data in kept.items():
        (P(j.path.path) / name).write_bytes(data)
    again = journal(tmp_path, compact_over=100).load()
    assert len(again) == 12 and all(len(e.attempts) == 1 for e in again.values())
    # The next compaction deletes what the snapshot holds and still counts each intent once.
    j.append([new_record("intent", "k0|1:1|v0", a="b0")])
    journal(tmp_path, compact_over=1).load()
    assert all(n.endswith(".arrow") for n in segments(j))
    final = journal(tmp_path).load()
    assert len(final["k0|1:1|v0"].attempts) == 2 and len(final["k1|1:1|v0"].attempts) == 1


def test_a_journal_compacted_by_the_record_format_still_loads_and_migrates(tmp_path: Path) -> None:
    """Journals written before state snapshots: plain segments and record snapshots (a ``_holds``
    header, then the records of the segments they replaced, those segments possibly still there)."""
    import json
    from pathlib import Path as P

    j = journal(tmp_path)
    folder = P(j.path.path)
    folder.mkdir(parents=True)
    lines = []
    for i in range(5):
        key = f"k{i}|1:1|v0"
        lines += [
            {"e": "intent", "k": key, "ts": 1.0, "a": f"a{i}", "d": f"d{i}"},
            {"e": "submitted", "k": key, "ts": 2.0, "a": f"a{i}", "task_id": f"t{i}"},
        ]
    body = "".join(json.dumps(r) + "\n" for r in lines)
    old = f"{2:020d}-w-aaaaaaaa.jsonl"
    (folder / f"{1:020d}-w-bbbbbbbb.jsonl").write_text(json.dumps(lines[0]) + "\n")  # held, left behind
    header = json.dumps({"e": "_holds", "names": [f"{1:020d}-w-bbbbbbbb.jsonl", old]}, separators=(",", ":"))
    (folder / f"{2:020d}-w-aaaaaaaa~cccccccc.jsonl").write_text(header + "\n" + body)
    (folder / f"{3:020d}-w-dddddddd.jsonl").write_text(
        json.dumps({"e": "terminal", "k": "k0|1:1|v0", "ts": 3.0, "task_id": "t0", "status": "completed"})
        + "\n"
    )
    before = journal(tmp_path).load()
    assert {k: (e.task_id, e.status, len(e.attempts)) for k, e in before.items()} == {
        f"k{i}|1:1|v0": (f"t{i}", "completed" if i == 0 else None, 1) for i in range(5)
    }
    journal(tmp_path, compact_over=1).load()  # the first compaction writes the new format
    assert [n.endswith(".arrow") for n in segments(j)] == [True]
    after = journal(tmp_path).load()
    assert {k: e.__dict__ for k, e in after.items()} == {k: e.__dict__ for k, e in before.items()}


def _run(j: Journal, rows: int, window: int = 50, digest: str = "d") -> None:
    """Journal a run as the engine does: a window's intents, submits, ends and mirrors per pass."""
    for start in range(0, rows, window):
        keys = [f"p{i}|1:1|v0" for i in range(start, min(rows, start + window))]
        j.append([new_record("intent", k, a="a", d=digest) for k in keys])
        j.append([new_record("submitted", k, a="a", task_id=f"t{k}") for k in keys])
        j.append([new_record("terminal", k, task_id=f"t{k}", status="completed") for k in keys])
        j.append([new_record("mirrored", k, task_id=f"t{k}", image={"uri": "u"}) for k in keys])
        if j.appended > j.compact_over:
            j.load()


def test_compaction_writes_rows_in_proportion_to_the_records_not_the_square(tmp_path: Path) -> None:
    """Rows written by every compaction of a run, per key, stay bounded as the run grows."""
    per_key = {}
    for rows in (1_000, 20_000):
        j = journal(tmp_path / str(rows), compact_over=20)
        _run(j, rows)
        per_key[rows] = j.compacted_rows / rows
    # A key is rewritten once per doubling of the levels (log2 of 20,000 / 1,000 is 4.3), not N times.
    assert per_key[20_000] <= per_key[1_000] + 5, per_key


def test_a_resume_builds_only_the_entries_it_uses(tmp_path: Path) -> None:
    """Entries come from the snapshot only when read: a window index over a finished run reads none
    of the settled keys; the records read are the segments after the last compaction."""
    from airflow_provider_imagen.batch.specs import expand_specs
    from airflow_provider_imagen.batch.window import WindowIndex

    counts = {}
    for rows in (1_000, 20_000):
        table = [{"prompt_id": f"p{i}", "prompt": "a lighthouse", "size": "1:1"} for i in range(rows)]
        specs = expand_specs(table)
        j = journal(tmp_path / str(rows), compact_over=20)
        _run(j, rows, digest=specs[0].digest or "")  # one prompt: every row's request has one digest
        journal(tmp_path / str(rows), compact_over=0).load()  # a last compaction, as at a pass's end
        j2 = journal(tmp_path / str(rows))
        j2.append([new_record("timeout", "p0|1:1|v0", task_id="tp0|1:1|v0")])  # one record after it
        entries = j2.load()
        index = WindowIndex(specs, entries)
        counts[rows] = (entries.materialized, index.plan(max_in_flight=10).done)
    assert counts[1_000] == (1, 1_000) and counts[20_000] == (1, 20_000)


def test_a_local_segment_is_fsynced_with_its_folder(tmp_path: Path, monkeypatch) -> None:
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    journal(tmp_path).append([new_record("intent", "k|1:1|v0", a="a1")])
    assert len(synced) == 2  # the file's data, then the folder that holds its new name


# -- attempts, budgets and changed requests ------------------------------------------------------------


def test_a_resubmit_after_a_crash_counts_both_posts(tmp_path: Path) -> None:
    """A crash left an intent with no answer; ``resubmit_unknown`` sent it again and got a task. Either
    POST may have been paid, so the budget and the manifest count two."""
    j = journal(tmp_path)
    j.append([new_record("intent", "k|1:1|v0", a="first", d="d1")])
    j.append([new_record("intent", "k|1:1|v0", a="second", d="d1")])
    j.append([new_record("submitted", "k|1:1|v0", a="second", task_id="t2")])
    entry = j.load()["k|1:1|v0"]
    assert entry.task_id == "t2" and not entry.unknown_submit
    assert entry.charged_submits == 2
    j.append([new_record("terminal", "k|1:1|v0", task_id="t2", status="failed", error_code=80006)])
    assert j.load()["k|1:1|v0"].charged_submits == 1  # the task is refunded, the crashed POST is not


def test_an_intent_with_another_digest_starts_a_new_generation(tmp_path: Path) -> None:
    """The prompt changed between two tries: the new request never inherits the old task, while what
    the old one cost stays counted, and a late answer to the old attempt changes nothing."""
    j = journal(tmp_path)
    j.append([new_record("intent", "k|1:1|v0", a="old", d="digest-old")])
    j.append([new_record("submitted", "k|1:1|v0", a="old", task_id="t-old")])
    j.append([new_record("terminal", "k|1:1|v0", task_id="t-old", status="completed")])
    j.append([new_record("mirrored", "k|1:1|v0", task_id="t-old", image={"uri": "/img/old.png"})])
    before = j.load()["k|1:1|v0"]
    assert before.matches("digest-old") and not before.matches("digest-new")
    j.append([new_record("intent", "k|1:1|v0", a="new", d="digest-new")])
    pending = j.load()["k|1:1|v0"]
    assert pending.task_id is None and pending.mirrored is None and pending.unknown_submit
    assert pending.charged_submits == 2 and pending.replaced[0]["image_uri"] == "/img/old.png"
    j.append([new_record("submitted", "k|1:1|v0", a="new", task_id="t-new")])
    j.append([new_record("submitted", "k|1:1|v0", a="old", task_id="t-zombie")])  # names an old attempt
    entry = j.load()["k|1:1|v0"]
    assert entry.task_ids == ["t-new"] and entry.digest == "digest-new"
    assert entry.charged_submits == 2
    assert entry.charged_since(0) == 1  # this generation's POSTs
