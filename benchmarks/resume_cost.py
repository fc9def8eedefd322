"""CPU and memory of what a resumed batch pass does before its first request, at growing table sizes.

Each resume after a deferral is a new process: it reads the prompt table, reads the specs the try's
first pass cached beside the journal (expanding the table only if that cache is missing or stale), folds
the journal and builds the window index. This builds, for each size, a prompt table on disk, the specs
cache the first pass writes, and the journal a finished run leaves (an intent, a submit, a terminal and
a mirrored record for every row, appended a window at a time, with the compactions the operator
triggers after ``compact_over`` appends), then measures, each in a fresh subprocess, the two paths the
operator takes: a first pass (``execute``: expand the table, write the cache) and a resume
(``execute_complete``: read the cache):

    python -m benchmarks.resume_cost [--sizes 1000,10000,100000] [--window 100]

It prints the CPU seconds of each step, the journal's and the specs cache's bytes per row on disk, the
bytes written by compactions over the whole build (per row), and the resident memory the pass added
(per row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_DAG = {"dag_id": "bench", "task_id": "generate", "run_id": "resume_cost"}


def _rss() -> int:
    """Return the resident set size of this process, in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _written_by_compaction(journal: Any) -> list[int]:
    """Count the bytes the journal's compactions write (wrapping ``write_whole`` in its module)."""
    from airflow_provider_imagen.batch import journal as module

    written = [0]
    real = module.write_whole

    def counting(dest: Any, data: bytes) -> None:
        if "~" in dest.name:  # snapshot names carry a ``~``; plain segments never do
            written[0] += len(data)
        real(dest, data)

    module.write_whole = counting  # type: ignore[assignment]
    return written


def build(folder: Path, rows: int, window: int) -> dict[str, Any]:
    """Write the table and the journal of a finished run of ``rows`` rows; return build figures."""
    from airflow_provider_imagen.batch.journal import Journal, new_record
    from airflow_provider_imagen.batch.spec_cache import CACHE_FOLDER, cache_specs
    from airflow_provider_imagen.batch.specs import expand_specs

    table = pa.table(
        {
            "prompt_id": [f"p{i:07d}" for i in range(rows)],
            "prompt": [f"catalog item {i}, studio light" for i in range(rows)],
        }
    )
    pq.write_table(table, folder / "prompts.parquet")
    specs = expand_specs(table)
    journal = Journal(folder / "journal", **_DAG)
    cache_specs(table, journal.path / CACHE_FOLDER, specs)  # as the first pass does
    written = _written_by_compaction(journal)
    started = time.perf_counter()
    for start in range(0, rows, window):
        part = specs[start : start + window]
        intents = [new_record("intent", s.key, a=f"a{s.row:08x}", d=s.digest) for s in part]
        journal.append(intents)
        journal.append(
            [new_record("submitted", s.key, a=f"a{s.row:08x}", task_id=f"task_{s.row:032x}") for s in part]
        )
        journal.append(
            [
                new_record(
                    "terminal",
                    s.key,
                    task_id=f"task_{s.row:032x}",
                    status="completed",
                    error_code=None,
                    error_message=None,
                )
                for s in part
            ]
        )
        journal.append(
            [
                new_record(
                    "mirrored",
                    s.key,
                    task_id=f"task_{s.row:032x}",
                    image={
                        "uri": f"file://{folder}/images/{s.prompt_id}__1-1__v0.png",
                        "sha256": f"{s.row:064x}",
                        "width": 1024,
                        "height": 1024,
                        "size_bytes": 1_400_000 + s.row,
                        "content_type": "image/png",
                    },
                    mismatch=None,
                )
                for s in part
            ]
        )
        if journal.appended > journal.compact_over:  # as the operator does between passes
            journal.load()
    cache = journal.path / CACHE_FOLDER
    cache_bytes = sum(p.stat().st_size for p in cache.iterdir())
    on_disk = sum(p.stat().st_size for p in (folder / "journal").rglob("*") if p.is_file()) - cache_bytes
    return {
        "build_s": time.perf_counter() - started,
        "journal_bytes": on_disk,
        "cache_bytes": cache_bytes,
        "compaction_bytes": written[0],
    }


def measure(folder: Path, mode: str) -> dict[str, Any]:
    """What a pass does before its first request, step by step, in this (fresh) process.

    ``mode`` is ``first`` (the try's first pass: expand the table and write the specs cache, as
    ``execute`` does) or ``resume`` (a pass after a deferral: read the cache, as ``execute_complete``
    does). Returns CPU seconds per step and the RSS growth.
    """
    from airflow_provider_imagen.batch.journal import Journal
    from airflow_provider_imagen.batch.spec_cache import CACHE_FOLDER, cache_specs, load_specs
    from airflow_provider_imagen.batch.table import load_prompt_table
    from airflow_provider_imagen.batch.window import WindowIndex

    rss = _rss()
    out: dict[str, Any] = {}
    clock = time.process_time()

    def step(name: str) -> None:
        nonlocal clock
        now = time.process_time()
        out[name] = now - clock
        clock = now

    journal = Journal(folder / "journal", **_DAG)
    table = load_prompt_table(str(folder / "prompts.parquet"))
    step("table_s")
    cache = journal.path / CACHE_FOLDER
    specs = load_specs(table, cache, reuse=mode == "resume", write=mode == "resume")
    if mode == "first":
        cache_specs(table, cache, specs)
    step("specs_s")
    entries = journal.load()
    step("journal_s")
    index = WindowIndex(specs, entries)
    step("index_s")
    out["total_s"] = sum(out[k] for k in ("table_s", "specs_s", "journal_s", "index_s"))
    out["rss_bytes"] = _rss() - rss
    out["done"] = index.plan(max_in_flight=100).done
    out["cached"] = type(specs).__name__ == "SpecTable"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the fresh subprocess's entry point
    parser.add_argument("--mode", default="resume", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.mode)))
        return
    print(f"command: python -m benchmarks.resume_cost --sizes {args.sizes} --window {args.window}")
    header = (
        "rows",
        "pass",
        "table s",
        "specs s",
        "journal s",
        "index s",
        "total s",
        "journal B/row",
        "compacted B/row",
        "specs cache B/row",
        "RSS B/row",
    )
    line = "{:>8} {:>7} {:>8} {:>8} {:>10} {:>8} {:>8} {:>14} {:>16} {:>18} {:>10}"
    print(line.format(*header))
    for size in (int(s) for s in args.sizes.split(",")):
        folder = Path(tempfile.mkdtemp(prefix="resume_cost_"))
        try:
            built = build(folder, size, args.window)
            for mode in ("first", "resume"):
                answer = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.resume_cost",
                        "--measure",
                        str(folder),
                        "--mode",
                        mode,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                r = json.loads(answer.stdout.strip().splitlines()[-1])
                assert r["done"] == size, r
                assert r["cached"] == (mode == "resume"), r
                print(
                    line.format(
                        f"{size:,}",
                        mode,
                        f"{r['table_s']:.3f}",
                        f"{r['specs_s']:.3f}",
                        f"{r['journal_s']:.3f}",
                        f"{r['index_s']:.3f}",
                        f"{r['total_s']:.3f}",
                        f"{built['journal_bytes'] / size:,.0f}",
                        f"{built['compaction_bytes'] / size:,.0f}",
                        f"{built['cache_bytes'] / size:,.0f}",
                        f"{r['rss_bytes'] / size:,.0f}",
                    ),
                    flush=True,
                )
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
