"""CPU per image and peak memory of one batch that refills its window on the worker, without Airflow.

The scale scenarios (``benchmarks.scenarios.scale``) run one task of 10^4 to 10^5 rows against 1 s
renders; their task process is CPU-bound, so any cost that grows with the table shows up as wall time.
This runs the same operator code in-process (``execute`` with a stand-in context: no scheduler, no
triggerer, no database) against the emulator as a subprocess on loopback, one fresh process per size, and
prints the CPU of that process per image, its peak RSS and its wall time:

    python -m benchmarks.stream_cost [--sizes 10000,100000] [--repeats 1] [--window 200]

Each size runs in its own process (peak RSS is per process); the emulator's CPU is not counted. The
settings are the scale scenarios': renders 1 ± 0.2 s of stock images, window 200, first poll at 1 s then
every 0.1 s, ``linger`` 5 s, refill on the worker (``check_pixel_size`` off). ``--one N --base-url URL
--profile FILE`` runs one batch here against a running emulator and writes a cProfile of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
API_KEY = "rk_emulator_key"


def start_emulator(
    workdir: Path, *, latency: float, jitter: float, balance: int
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the emulator (stock images: one drawn per ratio) and return it with its base URL."""
    log_path = workdir / "emulator.log"
    args = [
        sys.executable, "-m", "airflow_provider_imagen.emulator", "--host", "127.0.0.1", "--port", "0",
        "--latency-mean", str(latency), "--latency-jitter", str(jitter), "--image-mode", "stock",
        "--starting-balance", str(balance),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited early: {log_path.read_text(errors='replace')[-2000:]}")
        found = re.search(r"running at (http://\S+?) ", log_path.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("the emulator did not start within 60 s")


def run_one(
    rows: int,
    base_url: str,
    window: int,
    workdir: Path,
    profile: str | None = None,
    poll_interval: float = 0.1,
) -> dict[str, Any]:
    """Run one batch of ``rows`` in this process; return its figures (called in a fresh process)."""
    os.environ.setdefault("AIRFLOW_HOME", str(workdir / "airflow_home"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_provider_imagen.api.client import ImagenClient
    from airflow_provider_imagen.api.settings import ClientSettings
    from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

    table = workdir / f"prompts_{rows}.parquet"
    pq.write_table(
        pa.table(
            {"prompt_id": [f"p{i:07d}" for i in range(rows)], "prompt": [f"item {i}" for i in range(rows)]}
        ),
        table,
    )
    out = workdir / f"out_{rows}_{time.time_ns()}"
    op = ImagenBatchGenerateOperator(
        task_id="generate",
        prompts=str(table),
        output_path=str(out),
        max_in_flight=window,
        expected_render=1.0,
        poll_interval=poll_interval,
        linger=5.0,
        refill_on_worker=True,
        progress_interval=10.0,
        check_pixel_size=False,
        deferrable=True,
        outlets=[],
    )
    client = ImagenClient(ClientSettings(api_key=API_KEY, base_url=base_url))
    op._client = lambda: client  # type: ignore[method-assign]
    ti = type(
        "TI", (), {"dag_id": "stream_cost", "task_id": "generate", "run_id": f"r{rows}", "map_index": -1}
    )()
    ti.try_number = 1  # type: ignore[attr-defined]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu, wall = time.process_time(), time.time()
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(op.execute, {"ti": ti})
        profiler.dump_stats(profile)
    else:
        result = op.execute({"ti": ti})  # type: ignore[arg-type]
    cpu, wall = time.process_time() - cpu, time.time() - wall
    done = result["counts"].get("completed", 0)
    return {
        "rows": rows,
        "completed": done,
        "cpu_s": cpu,
        "cpu_ms_per_image": 1000 * cpu / max(done, 1),
        "wall_s": wall,
        "bound_s": rows / window * 1.0,
        "rss_start_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--latency", type=float, default=1.0, help="the emulator's mean render, seconds")
    parser.add_argument("--profile", help="with --one: write a cProfile of the run to this file")
    parser.add_argument("--one", type=int, help="run one batch of this many rows here (--base-url)")
    parser.add_argument("--base-url", help="with --one: a running emulator's base URL")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="with --one: where files go")
    parser.add_argument(
        "--poll-interval", type=float, default=0.1, help="with --one: the batch's poll interval"
    )
    args = parser.parse_args()
    if args.one:
        figures = run_one(
            args.one, args.base_url, args.window, Path(args.workdir), args.profile, args.poll_interval
        )
        print("RESULT " + json.dumps(figures), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"command: python -m benchmarks.stream_cost --sizes {args.sizes} --repeats {args.repeats} "
        f"--window {args.window} --latency {args.latency}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="imagen-stream-cost-") as tmp:
        workdir = Path(tmp)
        emulator, base_url = start_emulator(
            workdir, latency=args.latency, jitter=args.latency / 5, balance=50 * sum(sizes) * args.repeats
        )
        try:
            print(
                "{:>8} {:>10} {:>16} {:>14} {:>10} {:>9}".format(
                    "rows", "runs", "CPU ms/image", "peak RSS MB", "wall s", "bound s"
                ),
                flush=True,
            )
            for size in sizes:
                runs = []
                for _ in range(args.repeats):
                    child = subprocess.run(
                        [sys.executable, "-m", "benchmarks.stream_cost", "--one", str(size), "--base-url",
                         base_url, "--window", str(args.window), "--workdir", str(workdir)],
                        cwd=REPO, capture_output=True, text=True, check=False,
                    )  # fmt: skip
                    line = next((ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    if child.returncode or line is None:
                        raise RuntimeError(f"run of {size} rows failed:\n{child.stderr[-4000:]}")
                    runs.append(json.loads(line.removeprefix("RESULT ")))
                cpu = statistics.median(r["cpu_ms_per_image"] for r in runs)
                rss = statistics.median(r["peak_rss_mb"] for r in runs)
                wall = statistics.median(r["wall_s"] for r in runs)
                each = ", ".join(f"{r['cpu_ms_per_image']:.2f}" for r in runs)
                print(
                    f"{size:>8,} {len(runs):>10} {cpu:>16.2f} {rss:>14.0f} {wall:>10.1f} "
                    f"{runs[0]['bound_s']:>9.0f}   (CPU ms/image per run: {each})",
                    flush=True,
                )
        finally:
            os.killpg(emulator.pid, signal.SIGTERM)
            emulator.wait(timeout=30)


if __name__ == "__main__":
    main()
