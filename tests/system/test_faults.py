"""Faults on a real Airflow (separate scheduler, triggerer, dag-processor, api-server; LocalExecutor;
SQLite): nothing paid twice, nothing lost, every row of the manifest terminal and priced like the ledger.

Each test drives one DAG run of ``tests/system/dags/imagen_system.py`` through the REST API, breaks
something while it runs (the API, a process, the storage, the clock), and then checks the manifest
against the emulator's ledger with :func:`tests.system.checks.reconcile`. Counts are printed (``-s``)
for ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, SIZES
from tests.system.checks import local_manifest, reconcile, s3_manifest, s3_objects, write_table
from tests.system.conftest import S3_BUCKET, S3_CONN_ID
from tests.system.stack import Stack, wait_until

pytestmark = pytest.mark.system


def rows_for(tag: str, n: int, *, sizes: bool = False) -> list[dict[str, Any]]:
    """``n`` rows with distinct prompts (the ledger counts submissions per prompt)."""
    return [
        {
            "prompt_id": f"{tag}-{i:03d}",
            "prompt": f"{tag} catalog item {i}: a ceramic lamp on an oak desk",
            **({"size": SIZES[i % len(SIZES)]} if sizes else {}),
        }
        for i in range(n)
    ]


def start_run(stack: Stack, dag: str, workdir: Path, rows: list[dict[str, Any]], **conf: str) -> str:
    prompts = write_table(workdir / "prompts.parquet", rows)
    settings = {"prompts": prompts, "output_path": str(workdir / "out"), "journal_path": str(workdir / "j")}
    return stack.trigger(f"imagen_sys_{dag}", **{**settings, **conf})


def report(name: str, *parts: dict[str, Any], **figures: Any) -> None:
    merged: dict[str, Any] = {}
    for part in (*parts, figures):
        merged.update(part)
    print(f"\n[reliability] {name}: {json.dumps(merged, sort_keys=True, default=str)}")


def ledger_figures(ledger: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "posts",
        "tasks_created",
        "net_credits",
        "polls",
        "downloads",
        "downloads_rejected",
        "rate_limited",
        "server_errors",
        "ambiguous_submits",
    )
    return {k: ledger[k] for k in keys}


# -- the API misbehaving -----------------------------------------------------------------------------


def test_300_prompts_through_429_storms_5xx_slow_answers_and_ambiguous_submits(
    stack: Stack, workdir: Path
) -> None:
    """A 300-prompt batch while the API rate-limits (steady 20 rps, storms of 2 rps every few seconds),
    answers 5 % of all calls with a 500, adds 0.1 s to every answer and creates-then-502s 1 % of submits
    (plus two prompts that always do): every row ends terminal, nothing is paid twice, and the manifest
    prices every row like the ledger (an unknown submit whose POST created nothing is the only gap)."""
    emulator = stack.emulator
    emulator.reset(
        error_rate_5xx=0.05,
        ambiguous_submit_rate=0.01,
        response_delay=0.1,
        rate_limit_rps=20,
        rate_limit_burst=20,
        seed=7,
    )
    rows = rows_for("storm", 300, sizes=True)
    rows[10]["prompt"] += " [[ambiguous]]"
    rows[200]["prompt"] += " [[ambiguous]]"
    run_id = start_run(stack, "storm", workdir, rows)

    storms = 0
    done = threading.Event()

    def storm() -> None:  # 2 s of 2 requests/s, every 6 s, until the run ends
        nonlocal storms
        while not done.wait(4.0):
            emulator.configure(rate_limit_rps=2, rate_limit_burst=2)
            storms += 1
            done.wait(2.0)
            emulator.configure(rate_limit_rps=20, rate_limit_burst=20)

    stormer = threading.Thread(target=storm, daemon=True)
    stormer.start()
    try:
        state = stack.wait_run("imagen_sys_storm", run_id, timeout=240)
    finally:
        done.set()
        stormer.join()
    ledger, tasks = emulator.ledger(), emulator.tasks()
    ti = stack.ti("imagen_sys_storm", run_id)
    manifest = local_manifest(workdir / "out")
    counts = manifest["status"].value_counts().to_dict()
    figures = reconcile(manifest, ledger, tasks, "storm ")
    report(
        "storm",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=ti["try_number"],
        storms=storms,
        counts=counts,
    )

    assert state == "success", stack.task_logs("imagen_sys_storm", run_id)[-3000:]
    assert len(manifest) == 300
    # Every row terminal, no paid image left unmirrored (a mirror that a storm defeated fails the try,
    # and the retry mirrors it).
    assert set(counts) <= {"completed", "unknown_submit"}, counts
    assert ledger["rate_limited"] > 0 and ledger["server_errors"] > 0 and storms > 0
    assert ledger["ambiguous_submits"] >= 2
    unknown = manifest[manifest["status"] == "unknown_submit"]
    assert {"storm-010", "storm-200"} <= set(unknown["prompt_id"])
    # A retried POST is one that provably created nothing (429); no prompt has two tasks (reconcile).
    assert ledger["tasks_created"] <= 300


def test_a_transient_api_error_while_mirroring_does_not_end_the_run_with_unmirrored_images(
    emulator: Any, tmp_path: Path
) -> None:
    """Three paid, completed tasks; every API answer is a 500 while the pass mirrors them (a burst longer
    than the client's 3 attempts). The URLs live 24 h: the pass must come back for them (a ``Wait``),
    fail the try, or finish saying how many paid images are unmirrored (the operator then fails the
    try after writing the manifest, and Airflow's retry mirrors them)."""
    from airflow_provider_imagen.api.client import ClientSettings, ImagenClient
    from airflow_provider_imagen.api.errors import ImagenError
    from airflow_provider_imagen.api.retry import RetryPolicy
    from airflow_provider_imagen.batch.engine import BatchPass, BatchSettings, Finish, RunClock
    from airflow_provider_imagen.batch.journal import Journal, new_record
    from airflow_provider_imagen.batch.specs import expand_specs

    specs = expand_specs([{"prompt_id": f"t{i}", "prompt": f"transient {i}"} for i in range(3)])
    policy = RetryPolicy(max_attempts=3, base_delay=0.05)
    client = ImagenClient(ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url, retry=policy))
    journal = Journal(str(tmp_path / "journal"), dag_id="d", task_id="t", run_id="r")
    records = []
    for spec in specs:
        assert spec.request is not None
        task = client.submit(spec.request)
        records += [
            new_record("intent", spec.key),
            new_record("submitted", spec.key, task_id=task.id),
        ]
    wait_until(lambda: emulator.ledger()["status_counts"]["completed"] == 3, 30, "renders")
    records += [
        new_record("terminal", spec.key, task_id=rec["task_id"], status="completed")
        for spec, rec in zip(specs, records[1::2], strict=True)
    ]
    journal.append(records)
    emulator.configure(error_rate_5xx=1.0)
    now = time.time()
    try:
        step = BatchPass(
            client=client,
            journal=journal,
            specs=specs,
            images_root=str(tmp_path / "images"),
            settings=BatchSettings(),
            clock=RunClock(started_at=now, deadline=now + 600),
        ).run(None)
    except ImagenError:
        step = None  # failing the try (Airflow retries it while the URLs live) is an acceptable answer
    unmirrored = [k for k, e in journal.load().items() if e.status == "completed" and not e.mirrored]
    assert unmirrored  # the burst did stop the downloads
    # A Finish must say so, so the operator fails the try (after the manifest) and a retry mirrors them.
    assert not isinstance(step, Finish) or step.unmirrored == len(unmirrored) == 3, step
    assert emulator.ledger()["tasks_created"] == 3


# -- processes killed ---------------------------------------------------------------------------------


def test_triggerer_killed_while_deferred_then_started_again(stack: Stack, workdir: Path) -> None:
    """SIGKILL the triggerer (and its trigger-runner child) while its trigger is polling the batch's
    tasks; start a new one. The new triggerer takes the orphaned trigger over once the dead one's
    heartbeat is older than ``triggerer_health_check_threshold`` (10 s here), rebuilds it from its
    kwargs (absolute deadline, task ids, submit times) and the run ends: no POST after the kill, every
    image completed and mirrored, the bill equal to the ledger."""
    stack.emulator.reset(latency_mean=12.0, latency_jitter=1.0)
    n = 20
    dag = "imagen_sys_defer"
    run_id = start_run(stack, "defer", workdir, rows_for("trig", n))
    stack.wait_ti(dag, run_id, {"deferred"}, timeout=120)
    # Kill only once the first triggerer really runs the trigger: its first polls reached the API.
    wait_until(lambda: stack.emulator.ledger()["polls"] >= n, 60, "the trigger's first polls")
    (trigger,) = stack.sql(
        "SELECT t.id, t.triggerer_id FROM trigger t JOIN task_instance ti ON ti.trigger_id = t.id "
        "WHERE ti.dag_id = ? AND ti.run_id = ?",
        dag,
        run_id,
    )
    before = stack.emulator.ledger()
    killed = stack.components["triggerer"].kill()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in killed)
    killed_at = time.monotonic()
    time.sleep(1.0)
    stack.components["triggerer"].start()
    state = stack.wait_run(dag, run_id, timeout=150)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = reconcile(manifest, ledger, tasks, "trig ")
    log_dir = stack.home / "logs" / f"dag_id={dag}" / f"run_id={run_id}" / "task_id=generate"
    trigger_logs = sorted(p.name for p in log_dir.glob("*.trigger.*"))
    report(
        "triggerer_killed",
        figures,
        ledger_figures(ledger),
        state=state,
        killed_pids=len(killed),
        posts_at_kill=before["posts"],
        polls_at_kill=before["polls"],
        recovered_s=round(time.monotonic() - killed_at, 1),
        trigger_logs=trigger_logs,
    )

    assert state == "success"
    assert ledger["posts"] == before["posts"] == n  # no new POST after the kill
    assert (manifest["status"] == "completed").all()
    assert int(manifest["credits"].sum()) == ledger["net_credits"] == n * CREDITS_PER_IMAGE
    # The same trigger ran again, in another triggerer, and polled on from its kwargs.
    assert any(not name.endswith(f".trigger.{trigger['triggerer_id']}.log") for name in trigger_logs)
    assert ledger["polls"] > before["polls"]


def test_task_process_killed_mid_submit_is_retried_and_reattaches(stack: Stack, workdir: Path) -> None:
    """SIGKILL the task's own process (``airflow worker -- <ti id>``) after part of its paced submits;
    Airflow retries it; the retry re-attaches to every journalled task and submits only the rest."""
    stack.emulator.reset()
    n = 30
    run_id = start_run(stack, "paced", workdir, rows_for("worker", n))
    ti = stack.wait_ti("imagen_sys_paced", run_id, {"running"}, timeout=120)
    wait_until(lambda: stack.emulator.ledger()["posts"] >= 8, 60, "8 submits")
    proc = stack.task_process(ti["id"])
    assert proc is not None, "the task's process was not found"
    proc.kill()
    posts_at_kill = stack.emulator.ledger()["posts"]
    assert 0 < posts_at_kill < n
    state = stack.wait_run("imagen_sys_paced", run_id, timeout=150)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = reconcile(manifest, ledger, tasks, "worker ")
    counts = manifest["status"].value_counts().to_dict()
    try_number = stack.ti("imagen_sys_paced", run_id)["try_number"]
    report(
        "worker_killed",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=try_number,
        posts_at_kill=posts_at_kill,
        counts=counts,
    )

    assert state == "success" and try_number >= 2  # a third try: apache/airflow#72716, see the DAG file
    assert counts.get("completed", 0) + counts.get("unknown_submit", 0) == n
    # At most the POSTs in flight at the kill (4 submitters, one journal segment each) are unknown.
    assert counts.get("unknown_submit", 0) <= 4


def test_scheduler_and_its_worker_killed_mid_submit_then_restarted(stack: Stack, workdir: Path) -> None:
    """SIGKILL the scheduler with everything under it (LocalExecutor worker, supervisor, task process)
    while the batch is submitting, then start a new scheduler. The orphaned task instance stays
    ``running`` until ``task_instance_heartbeat_timeout`` (20 s here), is failed and retried; the retry
    re-attaches and the run completes."""
    stack.emulator.reset()
    n = 30
    run_id = start_run(stack, "paced", workdir, rows_for("sched", n))
    stack.wait_ti("imagen_sys_paced", run_id, {"running"}, timeout=120)
    wait_until(lambda: stack.emulator.ledger()["posts"] >= 8, 60, "8 submits")
    killed = stack.components["scheduler"].kill()
    posts_at_kill = stack.emulator.ledger()["posts"]
    time.sleep(1.0)
    assert stack.emulator.ledger()["posts"] == posts_at_kill  # the task process died with it
    killed_at = time.monotonic()
    stack.components["scheduler"].start()
    state = stack.wait_run("imagen_sys_paced", run_id, timeout=180)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = reconcile(manifest, ledger, tasks, "sched ")
    counts = manifest["status"].value_counts().to_dict()
    try_number = stack.ti("imagen_sys_paced", run_id)["try_number"]
    report(
        "scheduler_killed",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=try_number,
        killed_pids=len(killed),
        posts_at_kill=posts_at_kill,
        recovered_s=round(time.monotonic() - killed_at, 1),
        counts=counts,
    )

    assert len(killed) >= 3  # scheduler, executor worker, supervisor, task process
    assert state == "success" and try_number >= 2
    assert counts.get("completed", 0) + counts.get("unknown_submit", 0) == n
    assert counts.get("unknown_submit", 0) <= 4


def test_url_expiry_while_the_scheduler_is_down_marks_rows_expired_and_pays_nothing_again(
    stack: Stack, workdir: Path
) -> None:
    """Image URLs live 4 s here (24 h at reAPI). The scheduler is stopped while the batch is deferred,
    so the task cannot come back to mirror until the URLs are dead; then it is started again. Every
    row is ``expired`` (paid, 46 credits, lost), and nothing is submitted again to replace them."""
    ttl = 4.0
    stack.emulator.reset(image_ttl=ttl)
    n = 8
    run_id = start_run(stack, "defer", workdir, rows_for("expiry", n))
    stack.wait_ti("imagen_sys_defer", run_id, {"deferred"}, timeout=120)
    stack.components["scheduler"].kill()
    # The triggerer still fires the event (the task instance becomes ``scheduled``), but no scheduler
    # can queue it: wait until every URL is past its life.
    stack.wait_ti("imagen_sys_defer", run_id, {"scheduled"}, timeout=60)
    last_ready = max(t["ready_at"] for t in stack.emulator.tasks())
    wait_until(lambda: time.time() > last_ready + ttl + 1.5, 30, "the image URLs to expire")
    stack.components["scheduler"].start()
    state = stack.wait_run("imagen_sys_defer", run_id, timeout=120)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = reconcile(manifest, ledger, tasks, "expiry ")
    report(
        "url_expiry",
        figures,
        ledger_figures(ledger),
        state=state,
        counts=manifest["status"].value_counts().to_dict(),
    )

    assert state == "success"
    assert (manifest["status"] == "expired").all()
    assert manifest["error_message"].str.contains("expired|gone", regex=True).all()
    assert (manifest["credits"] == CREDITS_PER_IMAGE).all()  # paid and lost, and the bill says so
    assert ledger["posts"] == ledger["tasks_created"] == n  # not silently paid again
    assert ledger["downloads"] == 0 and ledger["downloads_rejected"] >= n
    assert (
        not list((workdir / "out" / "images").glob("*.png"))
        if (workdir / "out" / "images").exists()
        else True
    )


# -- storage ------------------------------------------------------------------------------------------


def test_s3_down_during_mirroring_then_back(stack: Stack, workdir: Path, s3_server: Any) -> None:
    """Output and journal on S3 (a moto server). When the task comes back to mirror, the S3 endpoint is
    stopped for 6 s, then started again with its data: the storage client's retries carry the writes
    over the gap. Every image ends up on S3 and in the manifest; nothing is paid twice."""
    stack.emulator.reset()
    n = 24
    prefix = f"{workdir.name}/"
    output = f"s3://{S3_CONN_ID}@{S3_BUCKET}/{prefix}out"
    run_id = start_run(stack, "defer", workdir, rows_for("s3", n), output_path=output, journal_path="")
    stack.wait_ti("imagen_sys_defer", run_id, {"deferred"}, timeout=120)
    # Slow the API's answers so that mirroring (GET the task, download, PUT) lasts a few seconds.
    stack.emulator.configure(response_delay=0.4)
    wait_until(lambda: stack.emulator.ledger()["downloads"] >= 1, 120, "mirroring to start", interval=0.05)
    s3_server.stop()
    down_at = time.monotonic()
    downloads_at_outage = stack.emulator.ledger()["downloads"]
    time.sleep(6.0)
    s3_server.start()
    state = stack.wait_run("imagen_sys_defer", run_id, timeout=180)
    client = s3_server.client()
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = s3_manifest(client, S3_BUCKET, prefix + "out/")
    figures = reconcile(manifest, ledger, tasks, "s3 ")
    images = s3_objects(client, S3_BUCKET, prefix + "out/images/")
    try_number = stack.ti("imagen_sys_defer", run_id)["try_number"]
    report(
        "s3_outage",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=try_number,
        outage_s=round(time.monotonic() - down_at, 1),
        downloads_at_outage=downloads_at_outage,
        images_on_s3=len(images),
        counts=manifest["status"].value_counts().to_dict(),
    )

    assert state == "success", stack.task_logs("imagen_sys_defer", run_id)[-3000:]
    assert 0 < downloads_at_outage < n  # the outage began mid-mirroring
    assert (manifest["status"] == "completed").all()
    assert len(images) == n and all(size > 0 for size in images.values())
    assert {u.split(f"{S3_BUCKET}/", 1)[1] for u in manifest["image_uri"]} == set(images)
    assert ledger["tasks_created"] == n  # images retried, not re-bought


def test_a_storage_error_while_mirroring_is_journalled_per_image(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage that refuses every write, failing fast (S3 endpoint down, botocore retries off): the pass
    must record what happened to each image (``mirror_failed``, retried by a later try while the URL
    lives) instead of dying with the storage library's exception."""
    from airflow.sdk import ObjectStoragePath

    from airflow_provider_imagen.api.client import ClientSettings, ImagenClient
    from airflow_provider_imagen.api.errors import ImagenError
    from airflow_provider_imagen.batch.engine import BatchPass, BatchSettings, RunClock
    from airflow_provider_imagen.batch.journal import Journal, new_record
    from airflow_provider_imagen.batch.specs import expand_specs
    from tests.system.stack import free_port

    dead = {
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_DEAD_S3",
        json.dumps({"conn_type": "aws", "login": "k", "password": "s", "extra": dead}),
    )
    specs = expand_specs([{"prompt_id": f"m{i}", "prompt": f"mirror {i}"} for i in range(3)])
    client = ImagenClient(ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url))
    journal = Journal(str(tmp_path / "journal"), dag_id="d", task_id="t", run_id="r")
    records = []
    for spec in specs:
        assert spec.request is not None
        task = client.submit(spec.request)
        records += [new_record("intent", spec.key), new_record("submitted", spec.key, task_id=task.id)]
    wait_until(lambda: emulator.ledger()["status_counts"]["completed"] == 3, 30, "renders")
    for spec, rec in zip(specs, records[1::2], strict=True):
        records.append(new_record("terminal", spec.key, task_id=rec["task_id"], status="completed"))
    journal.append(records)
    now = time.time()
    step = BatchPass(
        client=client,
        journal=journal,
        specs=specs,
        images_root=ObjectStoragePath("s3://dead_s3@imagen-dead/images"),
        settings=BatchSettings(),
        clock=RunClock(started_at=now, deadline=now + 60),
    )
    try:
        step.run(None)
    except Exception as exc:
        escaped: Exception | None = exc
    else:
        escaped = None
    entries = journal.load()
    failed = [k for k, e in entries.items() if e.mirror_error]
    assert escaped is None or isinstance(escaped, ImagenError), f"{type(escaped).__name__}: {escaped}"
    assert sorted(failed) == sorted(s.key for s in specs), failed
    assert emulator.ledger()["tasks_created"] == 3  # nothing re-bought either way


# -- money ---------------------------------------------------------------------------------------------


def test_out_of_credits_mid_batch(stack: Stack, workdir: Path) -> None:
    """The account holds 12 images' worth of credits; the batch asks for 20. The API's 402 stops the
    submits, the 12 paid tasks are waited for and mirrored, the 8 others are ``skipped_budget``, the
    manifest is complete, and the task then fails with the reason (no retries in this DAG)."""
    # Renders of ~5 s: the trigger then fires after the deferring try has been reaped, so this run (no
    # retries) cannot lose its resumed try to apache/airflow#72716.
    stack.emulator.reset(starting_balance=12 * CREDITS_PER_IMAGE, latency_mean=5.0, latency_jitter=0.5)
    n = 20
    run_id = start_run(stack, "credits", workdir, rows_for("credits", n))
    state = stack.wait_run("imagen_sys_credits", run_id, timeout=150)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = reconcile(manifest, ledger, tasks, "credits ")
    counts = manifest["status"].value_counts().to_dict()
    logs = stack.task_logs("imagen_sys_credits", run_id)
    report(
        "out_of_credits",
        figures,
        ledger_figures(ledger),
        state=state,
        counts=counts,
        refused_402=ledger["posts"] - ledger["tasks_created"],
    )

    assert state == "failed" and "ran out of credits" in logs
    assert counts == {"completed": 12, "skipped_budget": 8}
    assert ledger["tasks_created"] == 12 and ledger["balance"] == 0
    assert ledger["posts"] - ledger["tasks_created"] <= 4  # at most one 402 per concurrent submitter
    assert int(manifest["credits"].sum()) == ledger["net_credits"] == 12 * CREDITS_PER_IMAGE
    assert manifest.loc[manifest["status"] == "skipped_budget", "error_message"].str.contains("credits").all()
