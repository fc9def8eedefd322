"""The provider on a distributed Airflow: CeleryExecutor over Redis, PostgreSQL, two Celery workers, two
triggerers (``stack.py``); prompt tables, images, journals and manifests on S3 only.

Every scenario is checked against the emulator's ledger and the manifests
(:func:`tests.system.checks.reconcile`): no prompt charged twice unless a row says ``unknown_submit``,
the manifests' credits equal the ledger's net charge (or the difference is explained), and every paid,
completed image is on S3 with its sha256. Figures are printed (``-s``) for ``docs/how-to/scaling-out.md``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pandas as pd
import psutil
import pytest

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from tests.distributed.conftest import s3_uri
from tests.distributed.helpers import StateSampler, images_on_s3, put_table, read_parquets, report
from tests.distributed.stack import TRIGGERERS, WORKERS, DistributedStack
from tests.system.checks import reconcile
from tests.system.stack import wait_until

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1200)]

BACKFILL_DAG = "imagen_prompt_backfill"
DATES = [f"2026-02-0{d}" for d in range(1, 7)]
#: Prompts per partition of the backfill (6 partitions).
BACKFILL_ROWS = 300


def rows_for(tag: str, n: int, slow_tail: int = 0) -> list[dict[str, Any]]:
    """``n`` rows with distinct prompts; the last ``slow_tail`` render ``slow_factor`` times slower."""
    return [
        {
            "prompt_id": f"{tag}-{i:04d}",
            "prompt": f"{tag} item {i}: a ceramic lamp on an oak desk"
            + (" [[slow]]" if i >= n - slow_tail else ""),
        }
        for i in range(n)
    ]


def start_run(stack: DistributedStack, s3: Any, dag: str, name: str, rows: list[dict[str, Any]]) -> str:
    put_table(s3, f"{name}/prompts.parquet", rows)
    return stack.trigger(
        f"imagen_dist_{dag}",
        prompts=s3_uri(f"{name}/prompts.parquet"),
        output_path=s3_uri(f"{name}/out"),
        journal_path="",
    )


def check_run(stack: DistributedStack, s3: Any, name: str, tag: str) -> dict[str, Any]:
    """Reconcile the manifests under ``<name>/out`` with the ledger; every completed image on S3."""
    manifests = read_parquets(s3, f"{name}/out/manifests/")
    assert manifests, f"no manifest under {name}/out"
    manifest = pd.concat(list(manifests.values()), ignore_index=True)
    figures = reconcile(manifest, stack.emulator.ledger(), stack.emulator.tasks(), tag)
    figures["images_on_s3"] = images_on_s3(s3, manifest)
    figures["counts"] = manifest["status"].value_counts().to_dict()
    return figures


def ledger_figures(ledger: dict[str, Any]) -> dict[str, Any]:
    return {k: ledger[k] for k in ("posts", "tasks_created", "net_credits", "polls", "downloads")}


def backfill(stack: DistributedStack, conf: dict[str, Any], *extra: str) -> int:
    """``airflow backfill create`` over :data:`DATES` with 3 runs at a time; return the backfill's id."""
    before = {r["id"] for r in stack.sql("SELECT id FROM backfill")}
    done = stack.airflow(
        "backfill", "create", "--dag-id", BACKFILL_DAG, "--from-date", DATES[0], "--to-date", DATES[-1],
        "--max-active-runs", "3", "--dag-run-conf", json.dumps(conf), *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (new,) = [r["id"] for r in stack.sql("SELECT id FROM backfill") if r["id"] not in before]
    return int(new)


def wait_backfill(stack: DistributedStack, backfill_id: int, timeout: float) -> list[dict[str, Any]]:
    """Wait until the backfill completed; return its runs (run_id, logical date, state)."""

    def ended() -> list[dict[str, Any]] | None:
        stack.wait_run_components_alive()
        runs = stack.sql(
            "SELECT r.run_id, r.logical_date, r.state FROM backfill_dag_run b "
            "JOIN dag_run r ON r.id = b.dag_run_id WHERE b.backfill_id = ? ORDER BY r.logical_date",
            backfill_id,
        )
        done = stack.sql("SELECT completed_at FROM backfill WHERE id = ?", backfill_id)
        ended = all(r["state"] in ("success", "failed") for r in runs)
        # The scheduler marks the backfill completed a moment after its last run: until then another
        # backfill of the DAG is refused ("Another backfill is running").
        if len(runs) == len(DATES) and ended and done and done[0]["completed_at"] is not None:
            return runs
        return None

    return wait_until(ended, timeout, f"backfill {backfill_id} to end", interval=2.0)


# -- 1. a backfill of the example DAG, passes hopping between the workers ------------------------------


def test_backfill_of_the_example_dag_runs_on_both_workers_and_reruns_for_free(
    stack: DistributedStack, s3_server: Any
) -> None:
    """``airflow backfill create`` of ``imagen_prompt_backfill`` over 6 dates × 300 prompts, 3 runs at a
    time: every run succeeds, a batch task's passes ran on both workers, the bill matches the ledger and
    every image is on S3; a second backfill of the same dates (reprocessing them) sends no POST."""
    s3 = s3_server.client()
    # Renders of ~1.5 s, and a slow tail of 10 renders of ~30 s: the batch task refills on the worker while
    # rows wait, then defers for the tail and comes back (to whichever worker Celery hands it) to mirror.
    stack.emulator.reset(latency_mean=1.5, latency_jitter=0.5, slow_factor=20.0)
    for ds in DATES:
        put_table(s3, f"bf/dataset/ds={ds}/part-0.parquet", rows_for(f"bf{ds}", BACKFILL_ROWS, slow_tail=10))
    conf = {"dataset": s3_uri("bf/dataset"), "output_root": s3_uri("bf/out")}
    started = time.monotonic()
    with StateSampler(stack.postgres.dsn, [BACKFILL_DAG]) as sampler:
        first = backfill(stack, conf)
        runs = wait_backfill(stack, first, timeout=1500)
    wall = time.monotonic() - started
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()

    passes = {r["run_id"]: stack.passes(BACKFILL_DAG, r["run_id"]) for r in runs}
    hosts = {run: sorted({p["host"] for p in found}) for run, found in passes.items()}
    history = stack.sql(
        "SELECT run_id, try_number, hostname, state FROM task_instance_history "
        "WHERE dag_id = ? AND task_id = 'generate'",
        BACKFILL_DAG,
    )
    generate = stack.sql(
        "SELECT run_id, try_number, hostname, state FROM task_instance "
        "WHERE dag_id = ? AND task_id = 'generate' AND run_id = ANY(?)",
        BACKFILL_DAG,
        [r["run_id"] for r in runs],
    )
    run_manifests = read_parquets(s3, "bf/out/partitions/", suffix="/generate.parquet")
    manifest = pd.concat(list(run_manifests.values()), ignore_index=True)
    figures = reconcile(manifest, ledger, tasks, "bf")
    figures["images_on_s3"] = images_on_s3(s3, manifest)
    published = read_parquets(s3, "bf/out/manifests/")
    report(
        "backfill",
        wall_s=round(wall, 1),
        runs={r["run_id"]: r["state"] for r in runs},
        max_running_runs=sampler.max_running_runs,
        passes={run: [(p["host"], p["try"]) for p in found] for run, found in passes.items()},
        generate=generate,
        history=history,
        ledger=ledger_figures(ledger),
        counts=manifest["status"].value_counts().to_dict(),
        published_manifests=len(published),
        **figures,
    )

    failed = [r["run_id"] for r in runs if r["state"] != "success"]
    assert not failed, stack.task_logs(BACKFILL_DAG, failed[0])[-3000:]
    assert sampler.max_running_runs <= 3
    assert len(run_manifests) == len(DATES) and len(manifest) == len(DATES) * BACKFILL_ROWS
    assert (manifest["status"] == "completed").all()
    assert ledger["tasks_created"] == len(DATES) * BACKFILL_ROWS
    assert len(published) == len(DATES)
    # Every task instance record names the worker it ran on; one batch task ran passes on both.
    assert {g["hostname"] for g in generate} <= set(WORKERS)
    assert all(len(found) >= 2 for found in passes.values()), passes  # execute, then resumed
    assert any(h == sorted(WORKERS) for h in hosts.values()), hosts

    # The same dates again, reprocessing the completed runs: every partition is planned as done.
    posts = ledger["posts"]
    second = backfill(stack, conf, "--reprocess-behavior", "completed")
    again = wait_backfill(stack, second, timeout=600)
    report(
        "backfill_again",
        runs={r["run_id"]: r["state"] for r in again},
        ledger=ledger_figures(stack.emulator.ledger()),
    )
    assert [r["state"] for r in again] == ["success"] * len(DATES)
    assert stack.emulator.ledger()["posts"] == posts


# -- 2. a Celery worker killed mid-pass --------------------------------------------------------------


def test_celery_worker_killed_mid_pass_is_retried_on_the_other_worker(
    stack: DistributedStack, s3_server: Any
) -> None:
    """SIGKILL the whole Celery worker (its pool, the supervisor, the task process) while a batch pass
    submits on it: after ``task_instance_heartbeat_timeout`` (20 s here) the try fails, the retry runs on
    the other worker, re-attaches to every journalled task and sends only the rest."""
    s3 = s3_server.client()
    stack.emulator.reset(latency_mean=1.0, latency_jitter=0.3)
    n = 60
    dag = "imagen_dist_paced"
    with StateSampler(stack.postgres.dsn, [dag]) as sampler:
        run_id = start_run(stack, s3, "paced", "kill-worker", rows_for("killw", n))
        ti = stack.wait_ti(dag, run_id, {"running"}, timeout=180)
        wait_until(lambda: stack.emulator.ledger()["posts"] >= 10, 120, "10 submits")
        victim = stack.ti(dag, run_id)["hostname"]
        assert victim in WORKERS, ti
        stack.expected_dead.add(victim)
        killed = stack.components[victim].kill()
        killed_at = time.time()
        posts_at_kill = stack.emulator.ledger()["posts"]
        state = stack.wait_run(dag, run_id, timeout=300)
    failed_at = sampler.first("up_for_retry", after=killed_at) or sampler.first("failed", after=killed_at)
    final = stack.ti(dag, run_id)
    history = stack.sql(
        "SELECT try_number, hostname, state FROM task_instance_history WHERE dag_id = ? AND run_id = ?",
        dag,
        run_id,
    )
    figures = check_run(stack, s3, "kill-worker", "killw ")
    ledger = stack.emulator.ledger()
    report(
        "worker_killed",
        victim=victim,
        killed_pids=len(killed),
        posts_at_kill=posts_at_kill,
        retry_after_s=round(failed_at - killed_at, 1) if failed_at else None,
        final=final,
        history=history,
        ledger=ledger_figures(ledger),
        state=state,
        **figures,
    )
    stack.restart(victim)

    assert state == "success", stack.task_logs(dag, run_id)[-3000:]
    assert 0 < posts_at_kill < n
    assert final["try_number"] >= 2 and final["hostname"] != victim
    assert {h["hostname"] for h in history if h["try_number"] == 1} == {victim}
    counts = figures["counts"]
    assert counts.get("completed", 0) + counts.get("unknown_submit", 0) == n
    # At most the chunks in flight at the kill are unknown (4 submitters × 10 per S3 journal write).
    assert counts.get("unknown_submit", 0) <= 40
    assert ledger["tasks_created"] <= n


# -- 3. a triggerer killed while batch tasks are deferred ----------------------------------------------


def test_triggerer_killed_while_deferred_the_other_takes_over(
    stack: DistributedStack, s3_server: Any
) -> None:
    """Three batch tasks deferred (renders of ~25 s); SIGKILL a triggerer that runs at least one of their
    triggers. Once its heartbeat is ``triggerer_health_check_threshold`` old (15 s here) the other
    triggerer takes them over from their kwargs; no POST after the kill, every run completes."""
    s3 = s3_server.client()
    stack.emulator.reset(latency_mean=25.0, latency_jitter=1.0)
    n = 40
    dag = "imagen_dist_defer"
    names = [f"kill-trig-{i}" for i in range(3)]
    run_ids = [start_run(stack, s3, "defer", name, rows_for(f"killt{i}", n)) for i, name in enumerate(names)]
    for run_id in run_ids:
        stack.wait_ti(dag, run_id, {"deferred"}, timeout=180)
    wait_until(lambda: stack.emulator.ledger()["polls"] >= 3 * n, 60, "the triggers' first polls")

    def holders() -> dict[int, str | None]:
        rows = stack.sql(
            "SELECT t.id, j.hostname FROM task_instance ti JOIN trigger t ON t.id = ti.trigger_id "
            "LEFT JOIN job j ON j.id = t.triggerer_id WHERE ti.dag_id = ? AND ti.run_id = ANY(?)",
            dag,
            run_ids,
        )
        return {r["id"]: r["hostname"] for r in rows}

    before = wait_until(
        lambda: (h := holders()) and len(h) == 3 and all(h.values()) and h, 60, "the triggers to be held"
    )
    victim = max(TRIGGERERS, key=lambda name: sum(1 for h in before.values() if h == name))
    survivor = next(name for name in TRIGGERERS if name != victim)
    moved = [t for t, h in before.items() if h == victim]
    posts = stack.emulator.ledger()["posts"]
    stack.expected_dead.add(victim)
    stack.components[victim].kill()
    killed_at = time.monotonic()
    wait_until(lambda: all(holders().get(t) == survivor for t in moved), 120, "the takeover", interval=0.2)
    takeover_s = time.monotonic() - killed_at
    polls_at_takeover = stack.emulator.ledger()["polls"]
    states = [stack.wait_run(dag, run_id, timeout=300) for run_id in run_ids]
    ledger = stack.emulator.ledger()
    figures = [check_run(stack, s3, name, f"killt{i} ") for i, name in enumerate(names)]
    report(
        "triggerer_killed",
        victim=victim,
        triggers_moved=len(moved),
        takeover_s=round(takeover_s, 1),
        polls_at_takeover=polls_at_takeover,
        states=states,
        ledger=ledger_figures(ledger),
        runs=figures,
    )
    stack.restart(victim)

    assert states == ["success"] * 3
    assert moved and ledger["posts"] == posts == 3 * n  # nothing sent after the kill
    assert ledger["polls"] > polls_at_takeover  # the survivor polled them on
    assert ledger["net_credits"] == 3 * n * CREDITS_PER_IMAGE
    assert all(f["counts"] == {"completed": n} and f["images_on_s3"] == n for f in figures)
    assert 5 < takeover_s < 60  # the threshold, not a hop between healthy triggerers


# -- 4. one trigger in both triggerers at once ---------------------------------------------------------


def test_one_trigger_in_both_triggerers_at_once_pays_nothing_and_resumes_once(
    stack: DistributedStack, s3_server: Any
) -> None:
    """SIGSTOP the triggerer running a batch task's trigger past the health threshold: the other takes the
    trigger over; then SIGCONT the frozen one, whose copy of the trigger runs on until it notices. Both
    poll the same tasks (free), nothing is paid, and the task comes back to a worker exactly once."""
    s3 = s3_server.client()
    stack.emulator.reset(latency_mean=30.0, latency_jitter=0.5)
    n = 30
    dag = "imagen_dist_defer"
    run_id = start_run(stack, s3, "defer", "twice", rows_for("twice", n))
    stack.wait_ti(dag, run_id, {"deferred"}, timeout=180)
    wait_until(lambda: stack.emulator.ledger()["polls"] >= n, 60, "the trigger's first polls")
    (trigger,) = stack.sql(
        "SELECT t.id, j.hostname FROM task_instance ti JOIN trigger t ON t.id = ti.trigger_id "
        "JOIN job j ON j.id = t.triggerer_id WHERE ti.dag_id = ? AND ti.run_id = ?",
        dag,
        run_id,
    )
    frozen, other = trigger["hostname"], next(t for t in TRIGGERERS if t != trigger["hostname"])
    group = stack.components[frozen].pid
    os.killpg(group, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_until(lambda: stack.triggerer_of(trigger["id"]) == other, 120, "the takeover", interval=0.2)
        takeover_s = time.monotonic() - stopped_at
        polls_at_takeover = stack.emulator.ledger()["polls"]
        time.sleep(3.0)
    finally:
        os.killpg(group, signal.SIGCONT)
    resumed_at = time.time()
    state = stack.wait_run(dag, run_id, timeout=300)
    ledger = stack.emulator.ledger()
    passes = stack.passes(dag, run_id)
    frozen_log = stack.task_logs(dag, run_id)
    figures = check_run(stack, s3, "twice", "twice ")
    ti = stack.ti(dag, run_id)
    frozen_part = frozen_log.split(f"===== {frozen}:", 1)[-1].split("\n===== ", 1)[0]
    lines_after = [
        line[:160] for line in frozen_part.splitlines()
        if line.startswith("{") and (json.loads(line).get("timestamp") or "") > time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(resumed_at))
    ] if f"===== {frozen}:" in frozen_log else []  # fmt: skip
    report(
        "trigger_twice",
        frozen=frozen,
        takeover_s=round(takeover_s, 1),
        polls_at_takeover=polls_at_takeover,
        state=state,
        try_number=ti["try_number"],
        passes=[(p["host"], p["try"]) for p in passes],
        frozen_trigger_log_after_sigcont=lines_after[:6],
        ledger=ledger_figures(ledger),
        **figures,
    )

    assert psutil.Process(group).status() != psutil.STATUS_STOPPED
    assert takeover_s > 5  # the threshold, not a hop between healthy triggerers
    assert state == "success" and ti["try_number"] == 1
    assert ledger["posts"] == ledger["tasks_created"] == n
    # execute, then exactly one resume: the second copy of the trigger did not bring the task back twice.
    assert len(passes) == 2, passes
    assert figures["counts"] == {"completed": n} and figures["images_on_s3"] == n


# -- 5. Redis restarted mid-run -------------------------------------------------------------------------


def test_redis_restarted_mid_run_the_runs_finish(stack: DistributedStack, s3_server: Any) -> None:
    """Two batch tasks with small windows hop through the triggerer every few seconds; when one of their
    passes is queued, Redis is killed and started again empty (no persistence: the queued message is
    lost). Celery's workers reconnect; a pass whose message was lost is queued again by the scheduler
    after ``task_queued_timeout`` (60 s here). Both runs finish; nothing is paid twice."""
    s3 = s3_server.client()
    stack.emulator.reset(latency_mean=3.0, latency_jitter=0.5)
    n = 60
    dag = "imagen_dist_hops"
    names = ["redis-0", "redis-1"]
    with StateSampler(stack.postgres.dsn, [dag], interval=0.05) as sampler:
        run_ids = [
            start_run(stack, s3, "hops", name, rows_for(f"redis{i}", n)) for i, name in enumerate(names)
        ]
        for run_id in run_ids:
            stack.wait_ti(dag, run_id, {"deferred"}, timeout=180)
        queued = wait_until(
            lambda: [r for r in run_ids if stack.ti(dag, r).get("state") == "queued"],
            120,
            "a pass to be queued",
            interval=0.05,
        )
        stack.redis.kill()
        down_at = time.time()
        time.sleep(2.0)
        stack.redis.start()
        up_at = time.time()
        states = [stack.wait_run(dag, run_id, timeout=420) for run_id in run_ids]
    ends = {r: max(at for at, *_ in sampler.states(r)) for r in run_ids}
    scheduler_log = stack.components["scheduler"].log.read_text(errors="replace").splitlines()
    requeued = sum("stuck in queued" in line for line in scheduler_log)
    broker_errors = [line[:200] for line in scheduler_log if "Celery" in line and "rror" in line][:5]
    history = stack.sql(
        "SELECT run_id, try_number, state, hostname FROM task_instance_history WHERE dag_id = ?", dag
    )
    ledger = stack.emulator.ledger()
    figures = [check_run(stack, s3, name, f"redis{i} ") for i, name in enumerate(names)]
    alive = {name: comp.alive() for name, comp in stack.components.items()}
    report(
        "redis_restarted",
        queued_at_kill=queued,
        outage_s=round(up_at - down_at, 1),
        states=states,
        finished_after_restart_s={r: round(ends[r] - up_at, 1) for r in run_ids},
        scheduler_stuck_in_queued_lines=requeued,
        scheduler_celery_errors=broker_errors,
        failed_tries=history,
        tries={r: stack.ti(dag, r)["try_number"] for r in run_ids},
        components_alive=alive,
        ledger=ledger_figures(ledger),
        runs=figures,
    )

    assert states == ["success", "success"], stack.task_logs(dag, run_ids[0])[-3000:]
    assert all(alive.values()), alive
    assert ledger["tasks_created"] <= 2 * n
    for f in figures:
        assert f["counts"].get("completed", 0) + f["counts"].get("unknown_submit", 0) == n
