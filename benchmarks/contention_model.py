"""A discrete-time model of several batches sharing one capped account, driven by the real window rule.

Why: ``backfill_contention`` takes six minutes of a real scheduler per run and varies by a point or two
between runs, so a change to :meth:`RunClock.adapt_window` is hard to judge from one run. This replays
the same situation in under a second per seed with the rule as it is in the package: each batch polls
its own tasks (first poll at the render time, then every ``interval`` growing ×1.5), refills its window
as it sees ends, stops a round at the first 429 and waits out ``Retry-After`` (1 s), exactly as
``BatchPass`` does; the account refuses a submit while ``cap`` tasks render. It models no HTTP, CPU or
scheduler, so its throughput runs a few points above the real one; compare rules with it, not machines.

    python -m benchmarks.contention_model [--seeds 16] [--batches 8] [--rows 2000] [--cap 300] ...

Prints, by the median over seeds: throughput against the cap's bound (rows × batches / cap × render),
429s as a share of POSTs, and the seconds from the first batch's finish to the last's.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass

from airflow_provider_imagen.batch.base import RunClock


@dataclass
class Outcome:
    share_of_bound: float
    share_429: float
    finish_spread: float


def simulate(
    seed: int,
    *,
    batches: int = 8,
    rows: int = 2000,
    ceiling: int = 100,
    cap: int = 300,
    render: float = 5.0,
    jitter: float = 1.0,
    interval: float = 1.0,
    round_gap: float = 0.25,
    stagger: float = 10.0,
    retry_after: float = 1.0,
    step: float = 0.05,
) -> Outcome:
    """Run ``batches`` batches of ``rows`` rows to the end; batches start within ``stagger`` seconds."""
    rnd = random.Random(seed)
    starts = sorted(rnd.uniform(0, stagger) for _ in range(batches))
    clocks = [RunClock(started_at=0.0, deadline=1e12) for _ in range(batches)]
    left = [rows] * batches
    #: Per batch, its tasks in flight: [ready at, next poll at, the interval after that poll].
    flight: list[list[list[float]]] = [[] for _ in range(batches)]
    next_round = list(starts)
    blocked_until = [0.0] * batches
    rendering: list[float] = []  # the account's tasks still rendering (their ready times)
    done_at: list[float | None] = [None] * batches
    posts = refused = 0
    now = 0.0
    while any(d is None for d in done_at):
        rendering = [r for r in rendering if r > now]
        order = list(range(batches))
        rnd.shuffle(order)  # who asks first after a place frees is a matter of luck
        for b in order:
            if done_at[b] is not None or now < next_round[b]:
                continue
            next_round[b] = now + round_gap
            still = []
            for task in flight[b]:
                if task[1] <= now:
                    if task[0] <= now:
                        continue  # seen ended: the place is free for this batch
                    task[1], task[2] = now + task[2], task[2] * 1.5
                still.append(task)
            flight[b] = still
            if not left[b] and not flight[b]:
                done_at[b] = now
                continue
            if now < blocked_until[b] or not left[b]:
                continue
            room = min(clocks[b].current_window(ceiling) - len(flight[b]), left[b])
            accepted, limited = 0, None
            for _ in range(max(room, 0)):
                posts += 1
                if len(rendering) >= cap:
                    refused += 1
                    limited = retry_after
                    break  # the round stops at the first 429
                ready = now + rnd.uniform(render - jitter, render + jitter)
                rendering.append(ready)
                flight[b].append([ready, now + render, interval])
                accepted += 1
                left[b] -= 1
            if room > 0:
                clocks[b].adapt_window(
                    ceiling,
                    now=now,
                    in_flight=len(flight[b]),
                    accepted=accepted,
                    held_back=left[b] > 0,
                    retry_after=limited,
                )
                if limited:
                    blocked_until[b] = now + limited
        now += step
    ends = [d for d in done_at if d is not None]
    bound = batches * rows / cap * render
    return Outcome(bound / (max(ends) - starts[0]), refused / max(posts, 1), max(ends) - min(ends))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16)
    for name, default in (("batches", 8), ("rows", 2000), ("ceiling", 100), ("cap", 300)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("render", 5.0), ("jitter", 1.0), ("interval", 1.0), ("stagger", 10.0)):
        parser.add_argument(f"--{name}", type=float, default=default)
    args = vars(parser.parse_args())
    seeds = args.pop("seeds")
    outcomes = [simulate(seed, **args) for seed in range(seeds)]
    print(
        f"{seeds} seeds, {args}: throughput "
        f"{100 * statistics.median(o.share_of_bound for o in outcomes):.1f} % of the cap's bound, "
        f"429s {100 * statistics.median(o.share_429 for o in outcomes):.1f} % of POSTs, "
        f"first to last finish {statistics.median(o.finish_spread for o in outcomes):.0f} s (medians)"
    )


if __name__ == "__main__":
    main()
