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


def test_two_readers_compacting_at_once_never_double_a_record(tmp_path: Path) -> None:
    """Both readers fold the same 30 segments and both write a snapshot before either deletes: a third
    reader sees two snapshots and must count each ambiguous POST once."""
    j = journal(tmp_path, compact_over=10)
    for i in range(15):
        key = f"k{i}|1:1|v0"
        j.append([new_record("intent", key, a=f"a{i}")])
        j.append([new_record("ambiguous", key, a=f"a{i}", reason="502 after sending")])
    first, second = journal(tmp_path, compact_over=10), journal(tmp_path, compact_over=10)
    texts = [(p, p.read_text()) for p in sorted(first.path.iterdir(), key=lambda p: p.name)]
    first._compact(list(texts))  # writes its snapshot, deletes the segments
    second._compact(list(texts))  # had read the same segments: a second snapshot of the same records
    assert len(segments(j)) == 2
    entries = journal(tmp_path).load()
    assert all(e.ambiguous_count == 1 and e.charged_submits == 1 for e in entries.values())
    # A snapshot of the snapshots folds the same way.
    again = journal(tmp_path, compact_over=1).load()
    assert len(segments(j)) == 1
    assert all(e.ambiguous_count == 1 for e in again.values()) and len(again) == 15


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
