"""Draw the figures of ``docs/benchmarks.md`` from result files: ``python -m benchmarks.plot RUN.json…``.

Why separate from the runner: a plot should be redrawn from the numbers already measured (several suite
invocations pooled, say), never by measuring again. Medians over repeats of a scenario, as in the tables.

    python -m benchmarks.plot benchmarks/results/*-r*.json --out docs/img

Draws ``scaling.png`` (our wall time and polls per image against N, with the ideal bound) when runs of
``imagen_batch_<N>`` at one window exist, and ``side_by_side.png`` (wall time, task instances and polls
per image of the stock DAG, the hand loop and ours at N = 400) when those runs exist; ``scale.png`` (the
``scale_<N>`` runs: wall time against the bound, CPU per image by part) and ``contention.png``
(``backfill_contention`` beside ``backfill_contention_fixed``; ``--label TAG[+TAG…]=LABEL`` draws the
runs of those tags as a bar of their own, to set window rules side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(files: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Return the runs that ended as expected, by scenario name (suite files are skipped)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in files:
        result = json.loads(Path(name).read_text())
        if "scenario" in result and result.get("as_expected"):
            runs.setdefault(result["scenario"]["name"], []).append(result)
    return runs


def median(runs: list[dict[str, Any]], pick: Any) -> float | None:
    values = [v for v in (pick(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def scaling_points(runs: dict[str, list[dict[str, Any]]], window: int) -> list[dict[str, Any]]:
    """Return (N, median wall, ideal, polls/image) for our runs at ``window``, by N."""
    points = []
    for scenario_runs in runs.values():
        sc = scenario_runs[0]["scenario"]
        if not sc["dag_id"].startswith("imagen_batch") or sc.get("max_in_flight") != window:
            continue
        if sc.get("airflow_config"):  # a variant (e.g. linger forced off), not the default operator
            continue
        points.append(
            {
                "n": sc["n"],
                "wall": median(scenario_runs, lambda r: r.get("wall_s")),
                "ideal": sc["n"] / window * sc.get("latency_mean", 10.0),
                "polls": median(scenario_runs, lambda r: r.get("polls_per_image")),
                "runs": len(scenario_runs),
            }
        )
    return sorted(points, key=lambda p: p["n"])


def plot_scaling(points: list[dict[str, Any]], window: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [p["n"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ns, [p["wall"] for p in points], "o-", label="ours: DAG-run wall time (median)")
    left.plot(ns, [p["ideal"] for p in points], "--", color="grey", label=f"ideal bound N / {window} × 10 s")
    left.plot(ns, [1.25 * p["ideal"] for p in points], ":", color="grey", label="1.25 × bound (target)")
    left.set_xlabel("prompts (N)")
    left.set_ylabel("seconds")
    left.set_title(f"Wall time, max_in_flight = {window}")
    left.legend(fontsize=8)
    right.plot(ns, [p["polls"] for p in points], "o-", color="tab:green", label="ours")
    right.axhline(3, linestyle=":", color="grey", label="target ≤ 3")
    right.set_ylim(0, 6)
    right.set_xlabel("prompts (N)")
    right.set_ylabel("polls per completed image")
    right.set_title("API politeness")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_points(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Return the ``scale_<N>`` runs (one batch task, 1 s renders) as medians by N."""
    points = []
    for name, scenario_runs in runs.items():
        if not name.startswith("scale_") or "_w" in name or not scenario_runs[0].get("derived"):
            continue  # variants at another window (``scale_10k_w1000``) are not on the curve

        def cpu(part: str, rs: list[dict[str, Any]] = scenario_runs) -> float | None:
            return median(rs, lambda r: (r["derived"].get("cpu_s_per_1000") or {}).get(part))

        points.append(
            {
                "n": scenario_runs[0]["scenario"]["n"],
                "window": scenario_runs[0]["scenario"]["max_in_flight"],
                "wall": median(scenario_runs, lambda r: r.get("wall_s")),
                "ideal": scenario_runs[0]["derived"].get("ideal_s"),
                "worker": cpu("worker"),
                "triggerer": cpu("triggerer"),
                "emulator": cpu("emulator"),
            }
        )
    return sorted(points, key=lambda p: p["n"])


def plot_scale(points: list[dict[str, Any]], out: Path) -> Path:
    """Wall time against the bound, and CPU milliseconds per image by part, against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [p["n"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ns, [p["wall"] for p in points], "o-", label="DAG-run wall time")
    left.plot(ns, [p["ideal"] for p in points], "--", color="grey", label="bound N / window × 1 s")
    left.plot(ns, [1.2 * p["ideal"] for p in points], ":", color="grey", label="1.2 × bound (target)")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("rows in one task (N)")
    left.set_ylabel("seconds")
    left.set_title(f"Wall time, window {points[0]['window']}, renders 1 ± 0.2 s")
    left.legend(fontsize=8)
    for part, color in (("worker", "tab:blue"), ("triggerer", "tab:orange"), ("emulator", "tab:grey")):
        right.plot(ns, [p[part] for p in points], "o-", color=color, label=part)
    right.axhline(2, linestyle=":", color="tab:red", label="target: worker + triggerer ≤ 2 ms")
    right.set_xscale("log")
    right.set_ylim(bottom=0)
    right.set_xlabel("rows in one task (N)")
    right.set_ylabel("CPU ms per image (= CPU-s per 1,000)")
    right.set_title("CPU per image")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish_spread(run: dict[str, Any]) -> float:
    """Seconds from the first batch's finish to the last's: what the account idles on at the end."""
    ends = [r["end"] for r in run.get("runs") or [] if r.get("end")]
    return max(ends) - min(ends) if ends else 0.0


def plot_contention(rows: list[tuple[str, dict[str, Any]]], out: Path) -> Path:
    """Window rules side by side: throughput against the cap's bound, 429s per POST, windows, and how
    far apart the batches finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [
        ("throughput, % of the cap's bound",
         lambda r: 100 * (r["derived"].get("share_of_bound_throughput") or 0), 85),
        ("429s, % of POSTs", lambda r: 100 * (r["batch"].get("share_429") or 0), 10),
        ("mean window per task", lambda r: statistics.fmean(
            [w["mean"] for w in r["batch"]["windows"] if w.get("mean") is not None] or [0]), None),
        ("first to last finish, s", finish_spread, None),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(figures), figsize=(14, 3.6))
    colors = ["tab:blue", "tab:green", "tab:orange", "tab:red"]
    for ax, (title, pick, target) in zip(axes, figures, strict=True):
        values = [pick(r) for _, r in rows]
        bars = ax.bar([label for label, _ in rows], values, color=colors[-len(rows) :])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        if target is not None:
            ax.axhline(target, linestyle=":", color="grey")
        ax.set_title(title, fontsize=10)
    fig.suptitle("8 batch tasks at once, window 100 each, account cap 300", fontsize=10)
    fig.tight_layout()
    path = out / "contention.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_side_by_side(rows: list[tuple[str, list[dict[str, Any]]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in rows]
    figures = [
        ("DAG-run wall time (s, median)", lambda r: r.get("wall_s")),
        ("task instances", lambda r: r.get("task_instances")),
        ("polls per image", lambda r: r.get("polls_per_image")),
        ("worker slot-seconds", lambda r: (r.get("resources") or {}).get("running_slot_seconds")),
    ]
    fig, axes = plt.subplots(1, len(figures), figsize=(13, 3.6))
    colors = ["tab:red", "tab:orange", "tab:blue"][: len(rows)]
    for ax, (title, pick) in zip(axes, figures, strict=True):
        values = [median(runs, pick) or 0 for _, runs in rows]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        if not title.startswith("polls"):
            ax.set_yscale("log")
    fig.suptitle("N = 400 prompts, same machine, same emulator (render 10 ± 2 s)", fontsize=10)
    fig.tight_layout()
    path = out / "side_by_side.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="per-run result JSON files")
    parser.add_argument("--out", default="docs/img", help="folder for the PNGs")
    parser.add_argument("--window", type=int, default=100, help="the window of the scaling curve")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="TAG[+TAG…]=LABEL",
        help="name the runs of these --tags in the contention plot (one bar each, in this order)",
    )
    args = parser.parse_args(argv)
    runs = load(args.files)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = scaling_points(runs, args.window)
    if len(points) >= 2:
        print(f"wrote {plot_scaling(points, args.window, out)}: " + ", ".join(
            f"N={p['n']} {p['wall']:.1f} s ({p['runs']} run(s))" for p in points))  # fmt: skip
    side = [
        (label, runs[name])
        for label, name in (
            ("stock\n(mapped)", "stock_http_400"),
            ("hand loop", "hand_loop_400"),
            ("ours", "imagen_batch_400"),
        )
        if name in runs
    ]
    if len(side) >= 2:
        drawn = plot_side_by_side(side, out)
        print(f"wrote {drawn}: " + ", ".join(f"{label} ×{len(r)}" for label, r in side))
    scale = scale_points(runs)
    if len(scale) >= 2:
        print(f"wrote {plot_scale(scale, out)}: " + ", ".join(f"N={p['n']} {p['wall']} s" for p in scale))
    labels = dict(item.split("=", 1) for item in args.label)
    for name in sorted(runs):
        if name.startswith("backfill_contention") and not name.endswith("_fixed") and f"{name}_fixed" in runs:
            rows = [*contention_rows(runs[name], labels), ("fixed", runs[f"{name}_fixed"][-1])]
            if all(r.get("derived") and r.get("batch") for _, r in rows):
                print(f"wrote {plot_contention(rows, out)}: " + ", ".join(label for label, _ in rows))
    return 0


def contention_rows(
    adaptive: list[dict[str, Any]], labels: dict[str, str]
) -> list[tuple[str, dict[str, Any]]]:
    """One bar per label (the median run of its tags by throughput), or the last run as "adaptive"."""
    if not labels:
        return [("adaptive", adaptive[-1])]
    rows = []
    for tags, label in labels.items():
        tagged = [r for r in adaptive if (r.get("options") or {}).get("tag") in tags.split("+")]
        if tagged:
            tagged.sort(key=lambda r: r["derived"].get("share_of_bound_throughput") or 0)
            rows.append((label.replace("\\n", "\n"), tagged[(len(tagged) - 1) // 2]))
    return rows


if __name__ == "__main__":
    sys.exit(main())
