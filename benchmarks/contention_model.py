"""A discrete-time model of several batches sharing one capped account, driven by the real window rule.

Why: ``backfill_contention`` takes six minutes of a real scheduler per run and varies by a point or two
between runs, so a change to :meth:`RunClock.adapt_window` is hard to judge from one run. This replays
the same situation (a contention scenario of ``benchmarks/scenarios.py``: its batches, rows, window,
account cap, renders and poll schedule) in under a second per seed with the rule as it is in the
package: each batch polls its own tasks on the package's :class:`PollSchedule` grid, refills its window
as it sees ends, stops a round at the first 429 and waits out ``Retry-After`` (1 s), as ``BatchPass``
does; the account refuses a submit while its cap of tasks render. It models no HTTP, CPU or scheduler,
so its throughput runs a few points above the real one; compare rules with it, not machines.

    python -m benchmarks.contention_model [--scenario backfill_contention_10s] [--seeds 16] [--stagger 10]

Prints, by the median over seeds: throughput against the cap's bound (rows × batches / cap × render),
429s as a share of POSTs, and the seconds from the first batch's finish to the last's.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass

from airflow_provider_imagen.batch.base import RunClock
from airflow_provider_imagen.polling import PollSchedule
from benchmarks.harness import Scenario
from benchmarks.scenarios import by_name


@dataclass
class Outcome:
    share_of_bound: float
    share_429: float
    finish_spread: float


def simulate(
    scenario: Scenario,
    seed: int,
    *,
    stagger: float = 10.0,
    round_gap: float = 0.25,
    retry_after: float = 1.0,
    step: float = 0.05,
) -> Outcome:
    """Run the scenario's batches to the end; they start within ``stagger`` seconds of each other."""
    batches, rows, cap = scenario.runs, scenario.n, scenario.account_cap or 0
    ceiling = scenario.max_in_flight or 0
    render, jitter = scenario.latency_mean, scenario.latency_jitter
    schedule = PollSchedule(
        expected_render=float(scenario.airflow_config["IMAGEN_BENCH_EXPECTED_RENDER"]),
        poll_interval=float(scenario.airflow_config["IMAGEN_BENCH_POLL_INTERVAL"]),
    )
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
                    task[1] = now + task[2]
                    task[2] = min(task[2] * schedule.backoff, schedule.max_poll_interval)
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
                flight[b].append([ready, now + schedule.expected_render, schedule.poll_interval])
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
    bound = scenario.ideal_s or 0.0  # rows × batches / cap × mean render, as the benchmark reports it
    return Outcome(bound / (max(ends) - starts[0]), refused / max(posts, 1), max(ends) - min(ends))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="backfill_contention", help="a contention scenario's name")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--stagger", type=float, default=10.0, help="seconds over which the batches start")
    args = parser.parse_args()
    (scenario,) = by_name([args.scenario])
    if not scenario.account_cap or scenario.runs < 2:
        parser.error(f"{scenario.name} is not a contention scenario (several runs on a capped account)")
    outcomes = [simulate(scenario, seed, stagger=args.stagger) for seed in range(args.seeds)]
    print(
        f"{scenario.name}, {args.seeds} seeds: throughput "
        f"{100 * statistics.median(o.share_of_bound for o in outcomes):.1f} % of the cap's bound, "
        f"429s {100 * statistics.median(o.share_429 for o in outcomes):.1f} % of POSTs, "
        f"first to last finish {statistics.median(o.finish_spread for o in outcomes):.0f} s (medians)"
    )


if __name__ == "__main__":
    main()
