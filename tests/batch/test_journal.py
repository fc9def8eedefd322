"""The journal on a real local folder: segments, the fold, compaction, and the write counter."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_imagen.batch.journal import Journal, record


def journal(tmp_path: Path, compact_over: int = 200) -> Journal:
    return Journal(str(tmp_path), dag_id="d", task_id="t", run_id="manual__x", compact_over=compact_over)


def segments(j: Journal) -> list[str]:
    return sorted(p.name for p in Path(j.path.path).iterdir())


def test_a_read_over_compact_over_segments_folds_them_into_one_snapshot(tmp_path: Path) -> None:
    j = journal(tmp_path, compact_over=20)
    for i in range(25):
        j.append([record("intent", f"k{i}|1:1|v0", attempt=0)])
        j.append([record("submitted", f"k{i}|1:1|v0", task_id=f"t{i}")])
    assert j.appended == 50 and len(segments(j)) == 50
    first = j.load()
    assert j.appended == 0  # the batch operator reads again after compact_over writes of its own
    assert len(segments(j)) == 1
    assert {k: e.task_id for k, e in first.items()} == {f"k{i}|1:1|v0": f"t{i}" for i in range(25)}
    j.append([record("terminal", "k3|1:1|v0", task_id="t3", status="completed")])
    again = journal(tmp_path, compact_over=20).load()  # another worker sees the same fold
    assert again["k3|1:1|v0"].status == "completed"
    assert {k: e.task_id for k, e in again.items()} == {k: e.task_id for k, e in first.items()}


def test_reads_below_the_threshold_leave_the_segments_alone(tmp_path: Path) -> None:
    j = journal(tmp_path, compact_over=20)
    for i in range(5):
        j.append([record("intent", f"k{i}|1:1|v0", attempt=0)])
    j.load()
    assert len(segments(j)) == 5 and j.appended == 0
