"""Command line for the benchmark suite: ``python -m benchmarks.run`` (from the repository root).

Why a separate entry point: the harness runs one scenario; this runs a list of them (interleaved when
repeated, so slow drift of a shared machine hits every scenario alike), prints the table as it goes and
a median summary with ratios at the end, and writes everything to ``benchmarks/results/``.

    python -m benchmarks.run --quick                 # smoke suite, a few minutes
    python -m benchmarks.run                         # full suite, once
    python -m benchmarks.run --repeat 3              # full suite, medians of 3
    python -m benchmarks.run --only hand_loop_400    # some scenarios by name (see --list)
    python -m benchmarks.run --dag-id imagen_batch --n 400 --max-in-flight 400   # an ad hoc scenario
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py`` works too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    RESULTS_DIR,
    Options,
    Scenario,
    figures_line,
    run_scenario,
    table_header,
    table_row,
)
from benchmarks.scenarios import QUICK, SCALE, SCALING, SUITE, by_name


def _res(result: dict[str, Any], group: str, key: str) -> Any:
    return ((result.get("resources") or {}).get(group) or {}).get(key)


SUMMARY_KEYS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("wall_s", lambda r: r.get("wall_s")),
    ("trigger_to_end_s", lambda r: r.get("trigger_to_end_s")),
    ("task_instances", lambda r: r.get("task_instances")),
    ("running_slot_seconds", lambda r: (r.get("resources") or {}).get("running_slot_seconds")),
    ("ti_sum_duration_s", lambda r: r.get("ti_sum_duration_s")),
    ("polls_per_image", lambda r: r.get("polls_per_image")),
    ("notice_mean_s", lambda r: (r.get("notice_latency_s") or {}).get("mean")),
    ("notice_p95_s", lambda r: (r.get("notice_latency_s") or {}).get("p95")),
    ("images_on_disk", lambda r: r.get("images_on_disk")),
    ("triggerer_rss_growth_mb", lambda r: _res(r, "triggerer", "rss_growth_mb")),
    ("triggerer_cpu_mean_percent", lambda r: _res(r, "triggerer", "cpu_mean_percent")),
    ("airflow_pss_peak_mb", lambda r: _res(r, "airflow", "pss_peak_mb")),
    ("airflow_pss_growth_mb", lambda r: _res(r, "airflow", "pss_growth_mb")),
    ("airflow_rss_peak_mb", lambda r: _res(r, "airflow", "rss_peak_mb")),
    ("airflow_cpu_mean_percent", lambda r: _res(r, "airflow", "cpu_mean_percent")),
    ("airflow_cpu_s_per_ti", lambda r: _per_ti(r)),
    ("other_cpu_mean_percent", lambda r: (r.get("resources") or {}).get("other_cpu_mean_percent")),
    ("harness_cpu_percent", lambda r: r.get("harness_cpu_percent")),
)


def _per_ti(result: dict[str, Any]) -> float | None:
    """Airflow CPU-seconds (all components, trigger → end) per task instance of the run."""
    seconds, tis = _res(result, "airflow", "cpu_seconds"), result.get("task_instances")
    return round(seconds / tis, 2) if seconds is not None and tis else None


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run the smoke-sized suite (N = 40)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these scenarios (by name) only")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--repeat", type=int, default=1, help="run the list this many times, interleaved")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL metadata DB instead of SQLite")
    parser.add_argument("--keep-home", action="store_true", help="keep /tmp/bench-* (AIRFLOW_HOME, images)")
    parser.add_argument("--parallelism", type=int, help="override [core] parallelism for every scenario")
    parser.add_argument("--latency-mean", type=float, help="override the emulator's mean render seconds")
    parser.add_argument("--latency-jitter", type=float, help="override the emulator's jitter seconds")
    parser.add_argument("--image-scale", type=float, default=1.0, help="emulator image scale (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="emulator seed (default 1)")
    parser.add_argument("--tag", default="", help="suffix for result file names")
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="RUN_JSON",
        help="print the table and medians of earlier per-run result files, and run nothing",
    )
    adhoc = parser.add_argument_group("ad hoc scenario (instead of the lists)")
    adhoc.add_argument("--dag-id", help="run this DAG id as a one-off scenario")
    adhoc.add_argument("--n", type=int, default=40, help="prompts for --dag-id (default 40)")
    adhoc.add_argument("--max-in-flight", type=int, help="max_in_flight for --dag-id")
    adhoc.add_argument("--timeout", type=float, default=900, help="DAG-run timeout for --dag-id, seconds")
    adhoc.add_argument("--expect", default="success", help="expected DAG-run state for --dag-id")
    adhoc.add_argument("--conf", default="{}", help="extra run conf for --dag-id, as JSON")
    return parser


def pick_scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios the arguments ask for, with the overrides applied."""
    if args.dag_id:
        name = f"{args.dag_id}_{args.n}"
        scenarios = [
            Scenario(name, dag_id=args.dag_id, n=args.n, max_in_flight=args.max_in_flight,
                     timeout_s=args.timeout, expect=args.expect, conf=json.loads(args.conf))
        ]  # fmt: skip
    elif args.only:
        scenarios = by_name(args.only)
    else:
        scenarios = list(QUICK if args.quick else [*SUITE, *SCALING])
    overrides: dict[str, Any] = {}
    if args.parallelism:
        overrides["parallelism"] = args.parallelism
    if args.latency_mean is not None:
        overrides["latency_mean"] = args.latency_mean
    if args.latency_jitter is not None:
        overrides["latency_jitter"] = args.latency_jitter
    return [dataclasses.replace(s, **overrides) for s in scenarios]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per scenario (over runs that ended as expected) and wall-time ratios at equal N."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_name.setdefault(result["name"], []).append(result)
    summary: dict[str, Any] = {}
    for name, runs in by_name.items():
        good = [r for r in runs if r.get("as_expected")]
        entry: dict[str, Any] = {
            "dag_id": runs[0]["scenario"]["dag_id"],
            "n": runs[0]["scenario"]["n"],
            "runs": len(runs),
            "as_expected": len(good),
            "states": [r.get("state") for r in runs],
        }
        for key, get in SUMMARY_KEYS:
            values = [v for v in (get(r) for r in good) if v is not None]
            entry[key] = round(statistics.median(values), 2) if values else None
            if len(values) > 1:
                entry[f"{key}_range"] = [min(values), max(values)]
        summary[name] = entry
    ratios = []
    names = list(summary)
    for a in names:
        for b in names:
            sa, sb = summary[a], summary[b]
            if sa["n"] == sb["n"] and sa["wall_s"] and sb["wall_s"] and sa["wall_s"] > sb["wall_s"]:
                ratios.append({"slower": a, "faster": b, "wall_ratio": round(sa["wall_s"] / sb["wall_s"], 2)})
    return {"scenarios": summary, "ratios": ratios}


def print_summary(summary: dict[str, Any]) -> None:
    """Print the medians and ratios."""
    print("\nMedians (runs that ended as expected):")
    columns = (
        ("wall_s", "wall_s"),
        ("trigger_to_end_s", "trig→end"),
        ("task_instances", "TIs"),
        ("running_slot_seconds", "slot_s"),
        ("polls_per_image", "polls/img"),
        ("notice_mean_s", "notice_mean"),
        ("notice_p95_s", "notice_p95"),
        ("images_on_disk", "images"),
        ("airflow_pss_peak_mb", "afPSS_MB"),
        ("airflow_cpu_mean_percent", "afCPU%"),
        ("airflow_cpu_s_per_ti", "afCPU_s/TI"),
        ("other_cpu_mean_percent", "otherCPU%"),
    )
    print("  " + format("scenario", "<18") + "".join(format(label, ">12") for _, label in columns))
    for name, entry in summary["scenarios"].items():
        cells = "".join(format("" if entry.get(k) is None else f"{entry[k]:g}", ">12") for k, _ in columns)
        print(f"  {name:<18}{cells}   ({entry['as_expected']}/{entry['runs']} as expected)")
    for ratio in summary["ratios"]:
        print(f"  wall time {ratio['slower']} / {ratio['faster']} = {ratio['wall_ratio']}×")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def compile_bytecode() -> float:
    """Compile the environment's and the project's bytecode once; return the seconds it took.

    A deployed Airflow has bytecode (pip and Docker images compile it); a venv built by uv without
    ``--compile-bytecode`` on a machine with ``PYTHONDONTWRITEBYTECODE`` set has none, and then every task
    process compiles Airflow from source (~2 s), which would be measured as our overhead.
    """
    started = time.monotonic()
    root = Path(__file__).resolve().parents[1]
    targets = [*sysconfig.get_paths()["purelib"].split(os.pathsep)]
    targets += [str(root / d) for d in ("airflow_provider_imagen", "benchmarks")]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "2", *targets],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios; exit 0 when every run ended as expected."""
    args = build_parser().parse_args(argv)
    # Started in the background, we inherit SIGINT = ignored; and SIGTERM would skip the clean-up. Both
    # become KeyboardInterrupt, so run_scenario's ``finally`` stops Airflow and the emulator by pid.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.summarize:
        results = [json.loads(Path(name).read_text()) for name in args.summarize]
        results = [r for r in results if "scenario" in r]  # skip suite files
        print(table_header())
        for result in results:
            print(table_row(result))
        print_summary(summarize(results))
        return 0
    scenarios = pick_scenarios(args)
    if args.list:
        for scenario in [*SUITE, *SCALING, *QUICK, *SCALE]:
            head = f"{scenario.name:<20} dag={scenario.dag_id:<14} n={scenario.n:<6}"
            print(f"{head} expect={scenario.expect:<8} {scenario.note}")
        return 0
    options = Options(
        postgres=args.postgres,
        keep_home=args.keep_home,
        image_scale=args.image_scale,
        seed=args.seed,
        tag=args.tag,
    )
    command = " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {command}", flush=True)
    print(f"bytecode compiled in {compile_bytecode():.1f} s", flush=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    print(table_header(), flush=True)
    for repeat in range(max(1, args.repeat)):
        for scenario in scenarios:
            result = run_scenario(
                scenario, options, repeat=repeat, log=lambda line: print(f"  {line}", flush=True)
            )
            results.append(result)
            print(table_row(result), flush=True)
            if result.get("errors"):
                print(f"  errors: {result['errors']}", flush=True)
            if figures_line(result):
                print(f"  {figures_line(result)}", flush=True)
    summary = summarize(results)
    print_summary(summary)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suite_file = RESULTS_DIR / f"{stamp}-suite{'-' + args.tag if args.tag else ''}.json"
    suite_file.write_text(
        json.dumps(
            {"elapsed_s": round(time.monotonic() - started), "summary": summary,
             "command": command, "result_files": [r.get("result_file") for r in results],
             "table": [table_header(), *(table_row(r) for r in results)]},
            indent=1, default=str,
        )
    )  # fmt: skip
    print(f"\nresults: {suite_file} (+ one JSON per run)  elapsed {time.monotonic() - started:.0f} s")
    run_files = [str(r["result_file"]) for r in results if r.get("result_file")]
    if importlib.util.find_spec("matplotlib") is None:  # in the ``bench`` extra only
        print("plots: pip install '.[bench]' (matplotlib), then python -m benchmarks.plot RUN.json…")
    else:
        from benchmarks.plot import main as plot

        plot([*run_files, "--out", str(RESULTS_DIR / f"{stamp}-plots")])
    return 0 if all(r.get("as_expected") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
