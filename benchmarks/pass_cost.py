"""CPU of one batch pass's planning at growing table sizes: every row scanned, or only what changed.

A batch that refills its window on the worker runs one pass per task that ends: thousands of passes in
one process for a large table. This measures the planning part of such a pass (absorb 5 ends, submit
5, plan again) both ways, at each size, in one run:

    python -m benchmarks.pass_cost [--sizes 1000,10000,100000] [--passes 200]

It prints milliseconds of CPU per pass (medians over the passes) for ``plan_window`` over the whole
table and for the ``WindowIndex`` the engine keeps, and the rows each touched.
"""

from __future__ import annotations

import argparse
import statistics
import time

from airflow_provider_imagen.batch.journal import JournalEntry, new_record
from airflow_provider_imagen.batch.specs import expand_specs
from airflow_provider_imagen.batch.window import WindowIndex, plan_window


def measure(rows: int, passes: int, window: int = 100) -> dict[str, float]:
    specs = expand_specs([{"prompt_id": f"p{i}", "prompt": f"catalog item {i}"} for i in range(rows)])
    entries: dict[str, JournalEntry] = {}
    index = WindowIndex(specs, entries)
    built = index.touched
    full_ms: list[float] = []
    index_ms: list[float] = []
    in_flight: list[str] = []
    for _ in range(passes):
        started = time.process_time()
        plan_window(specs, entries, max_in_flight=window)
        full_ms.append((time.process_time() - started) * 1000)
        started = time.process_time()
        plan = index.plan(max_in_flight=window)
        index_ms.append((time.process_time() - started) * 1000)
        changed = []
        for key in in_flight[:5]:  # five ends
            entries[key].apply(new_record("terminal", key, task_id=f"t{key}", status="completed"))
            entries[key].apply(new_record("mirrored", key, task_id=f"t{key}", image={"uri": "x"}))
            changed.append(key)
        in_flight = in_flight[5:]
        for spec in plan.to_submit[:10]:  # and their places refilled
            entry = entries.setdefault(spec.key, JournalEntry(spec.key))
            entry.apply(new_record("intent", spec.key, a="a", d=spec.digest))
            entry.apply(new_record("submitted", spec.key, a="a", task_id=f"t{spec.key}"))
            changed.append(spec.key)
            in_flight.append(spec.key)
        started = time.process_time()
        index.touch(changed, entries)
        index_ms[-1] += (time.process_time() - started) * 1000
    return {
        "rows": rows,
        "plan_window_ms": statistics.median(full_ms),
        "index_ms": statistics.median(index_ms),
        "index_rows_touched_per_pass": (index.touched - built) / passes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--passes", type=int, default=200)
    args = parser.parse_args()
    print(f"command: python -m benchmarks.pass_cost --sizes {args.sizes} --passes {args.passes}")
    header = ("rows", "plan_window ms/pass", "index ms/pass", "ratio", "rows touched/pass")
    print("{:>8} {:>20} {:>14} {:>8} {:>18}".format(*header))
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, args.passes)
        ratio = r["plan_window_ms"] / max(r["index_ms"], 1e-6)
        print(
            f"{size:>8,} {r['plan_window_ms']:>20.2f} {r['index_ms']:>14.3f} {ratio:>8.0f} "
            f"{r['index_rows_touched_per_pass']:>18.1f}"
        )


if __name__ == "__main__":
    main()
