"""What Airflow itself does to a running try, on a real Airflow: ``execution_timeout``, a clear, a zombie
beside its retry, a prompt edited between tries, a budget with ``resubmit_unknown``, reruns into one
output folder, and answers the API gets wrong. Nothing may be paid twice unless a row says its submit is
unknown, and no paid image may be lost or filed under the wrong prompt or over another run's file.

Each test checks the manifests against the emulator's ledger with :func:`tests.system.checks.audit` and
prints its figures (``-s``) for ``docs/reliability.md``. Run them alone with ``-m interrupts``.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.emulator.images import render_png
from tests.system.checks import all_local_manifests, audit, local_manifest, sha256_of, write_table
from tests.system.stack import BASE_EMULATOR, BIN, Stack, wait_until
from tests.system.test_faults import ledger_figures, report

pytestmark = [pytest.mark.system, pytest.mark.interrupts]

#: The emulator holds a ``[[late]]`` submit's answer this long: past the DAGs' 10 s execution_timeout,
#: short of the client's 30 s read timeout (so only Airflow's interrupt can cut the wait).
LATE_ANSWER_S = 20.0


def rows_for(tag: str, n: int, marks: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """``n`` rows with distinct prompts; ``marks`` appends an emulator marker to some of them."""
    marks = marks or {}
    return [
        {"prompt_id": f"{tag}-{i:03d}", "prompt": f"{tag} item {i}: a pewter jug on linen {marks.get(i, '')}"}
        for i in range(n)
    ]


def conf_for(workdir: Path, rows: list[dict[str, Any]], name: str = "prompts") -> dict[str, str]:
    return {
        "prompts": write_table(workdir / f"{name}.parquet", rows),
        "output_path": str(workdir / "out"),
        "journal_path": str(workdir / "j"),
    }


def ours(tasks: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    return [t for t in tasks if t["prompt"].startswith(tag)]


def tries(stack: Stack, dag_id: str, run_id: str) -> int:
    return int(stack.ti(dag_id, run_id)["try_number"])


def clear(stack: Stack, dag_id: str, run_id: str) -> None:
    """Clear the run's ``generate`` task as a user does in the UI (the REST API behind it)."""
    reply = httpx.post(
        f"{stack.api_url}/api/v2/dags/{dag_id}/clearTaskInstances",
        json={
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": ["generate"],
            "only_failed": False,
            "reset_dag_runs": True,
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


def stop_tree(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        proc.send_signal(sig)


# -- 1. execution_timeout while a POST waits for its answer -------------------------------------------


def test_execution_timeout_while_a_post_waits_then_the_retry(stack: Stack, workdir: Path) -> None:
    """The emulator creates and charges the task of a ``[[late]]`` prompt, then holds the answer 20 s;
    ``execution_timeout`` (10 s) interrupts the try while its POST waits. Single-image operator and
    batch operator, at once. The retry must treat that POST as unknown (maybe paid), not as unsent."""
    stack.emulator.reset(late_submit_delay=LATE_ANSWER_S)
    single_prompt = "tmo1 a brass compass on a sea chart [[late]]"
    single = {
        "prompt": single_prompt,
        "output_path": str(workdir / "out" / "single"),
        "journal_path": str(workdir / "j" / "single"),
    }
    single_run = stack.trigger("imagen_sys_int_timeout_single", **single)
    rows = rows_for("tmob", 4, {2: "[[late]]"})
    batch_run = stack.trigger("imagen_sys_int_timeout_batch", **conf_for(workdir, rows))
    single_state = stack.wait_run("imagen_sys_int_timeout_single", single_run, timeout=150)
    batch_state = stack.wait_run("imagen_sys_int_timeout_batch", batch_run, timeout=150)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()

    # Single image: no manifest; the journal is its record.
    from airflow_provider_imagen.batch.journal import Journal

    journal = Journal(
        single["journal_path"], dag_id="imagen_sys_int_timeout_single", task_id="generate", run_id=single_run
    ).load()
    entry = journal["image"]
    single_tasks = ours(tasks, "tmo1 ")
    single_logs = stack.task_logs("imagen_sys_int_timeout_single", single_run)
    report(
        "timeout_single",
        state=single_state,
        try_number=tries(stack, "imagen_sys_int_timeout_single", single_run),
        tasks_created=len(single_tasks),
        unknown_submit=entry.unknown_submit,
        journal_charged_submits=entry.charged_submits,
    )
    batch_manifest = local_manifest(workdir / "out")
    figures = audit([batch_manifest], ledger, tasks, "tmob ")
    counts = batch_manifest["status"].value_counts().to_dict()
    report(
        "timeout_batch",
        figures,
        ledger_figures(ledger),
        state=batch_state,
        try_number=tries(stack, "imagen_sys_int_timeout_batch", batch_run),
        counts=counts,
    )

    assert "AirflowTaskTimeout" in single_logs or "Timeout" in single_logs, single_logs[-2000:]
    assert len(single_tasks) == 1, single_tasks  # the retry did not pay again
    assert entry.unknown_submit and entry.charged_submits >= 1
    # It may have been paid and its id is unknown: the retry refuses to pay blind, and says why.
    assert single_state == "failed" and "resubmit_unknown" in single_logs
    assert batch_state == "success", stack.task_logs("imagen_sys_int_timeout_batch", batch_run)[-3000:]
    assert tries(stack, "imagen_sys_int_timeout_batch", batch_run) >= 2
    # The late POST ran in a submitter thread: the interrupted try either journalled its answer before
    # it exited (then the retry re-attached) or left it unknown; never "not sent", so never paid twice.
    assert counts.get("completed", 0) >= 3 and set(counts) <= {"completed", "unknown_submit"}, counts
    late = batch_manifest[batch_manifest["prompt_id"] == "tmob-002"].iloc[0]
    assert late["status"] in ("completed", "unknown_submit")
    assert len(ours(tasks, "tmob ")) == 4 and figures["manifest_credits"] == 4 * CREDITS_PER_IMAGE


# -- 2. a running batch cleared while it submits ------------------------------------------------------


def test_running_batch_cleared_through_the_rest_api_while_submitting(stack: Stack, workdir: Path) -> None:
    """Every submit answers 2 s after creating its task, so a clear (the REST API's clearTaskInstances;
    Airflow then SIGTERMs the try) lands while POSTs wait for their answers. The new try pays for none
    of them again."""
    stack.emulator.reset(submit_answer_delay=2.0)
    n = 24
    dag = "imagen_sys_int_paced"
    run_id = stack.trigger(dag, **conf_for(workdir, rows_for("clear", n)))
    ti = stack.wait_ti(dag, run_id, {"running"}, timeout=120)
    wait_until(lambda: stack.emulator.ledger()["tasks_created"] >= 6, 60, "6 tasks created")
    proc = stack.task_process(ti["id"])
    assert proc is not None
    clear(stack, dag, run_id)
    at_clear = stack.emulator.ledger()
    cleared_at = time.monotonic()
    # Airflow learns of the clear at the try's next heartbeat, then SIGTERMs it (SIGKILL 10 s later).
    wait_until(
        lambda: "Terminating process" in stack.task_logs(dag, run_id), 60, "Airflow to SIGTERM the try"
    )
    at_sigterm = stack.emulator.ledger()
    sigterm_s = round(time.monotonic() - cleared_at, 1)
    psutil.wait_procs([proc], timeout=60)
    stopped_s = round(time.monotonic() - cleared_at, 1)
    at_stop = stack.emulator.ledger()
    stack.emulator.configure(submit_answer_delay=0.0)
    state = stack.wait_run(dag, run_id, timeout=180)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = audit([manifest], ledger, tasks, "clear ")
    counts = manifest["status"].value_counts().to_dict()
    report(
        "cleared_while_submitting",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=tries(stack, dag, run_id),
        posts_at_clear=at_clear["posts"],
        posts_at_sigterm=at_sigterm["posts"],
        posts_when_the_try_ended=at_stop["posts"],
        sigterm_after_s=sigterm_s,
        try_ended_after_s=stopped_s,
        counts=counts,
    )

    assert state == "success", stack.task_logs(dag, run_id)[-3000:]
    assert 0 < at_clear["posts"] < n and tries(stack, dag, run_id) >= 2
    assert counts.get("completed", 0) + counts.get("unknown_submit", 0) == n, counts
    assert len(ours(tasks, "clear ")) <= n
    # SIGTERM stops the submit loop: at most the POSTs already on the wire (one per submitter) follow it.
    assert at_stop["posts"] - at_sigterm["posts"] <= 4, (at_sigterm["posts"], at_stop["posts"])


# -- 3. a zombie try beside its retry -----------------------------------------------------------------


def test_zombie_try_resumed_beside_its_retry_pays_for_nothing_twice(stack: Stack, workdir: Path) -> None:
    """SIGSTOP a submitting try and its supervisor: no heartbeat, so after the heartbeat timeout (20 s
    here) the scheduler fails it and starts a retry. While the retry submits, SIGCONT the old try (its
    supervisor 3 s later): both are alive, both planned the same keys. Only one may pay for each."""
    stack.emulator.reset()
    n = 30
    dag = "imagen_sys_int_paced"
    run_id = stack.trigger(dag, **conf_for(workdir, rows_for("zombie", n)))
    ti = stack.wait_ti(dag, run_id, {"running"}, timeout=120)
    wait_until(lambda: stack.emulator.ledger()["posts"] >= 6, 60, "6 submits")
    task_proc = stack.task_process(ti["id"])
    assert task_proc is not None
    supervisor = task_proc.parent()
    assert supervisor is not None
    stop_tree([task_proc, supervisor], signal.SIGSTOP)
    stopped_at = time.monotonic()
    posts_at_stop = stack.emulator.ledger()["posts"]
    try:
        wait_until(
            lambda: (
                (now := stack.ti(dag, run_id))["try_number"] > ti["try_number"] and now["state"] == "running"
            ),
            120,
            "the scheduler to start a retry beside the stopped try",
        )
        retry_after_s = round(time.monotonic() - stopped_at, 1)
        wait_until(lambda: stack.emulator.ledger()["posts"] >= posts_at_stop + 3, 60, "the retry to submit")
        posts_at_resume = stack.emulator.ledger()["posts"]
    finally:
        task_proc.send_signal(signal.SIGCONT)
        time.sleep(3.0)
        supervisor.send_signal(signal.SIGCONT)
    posts_3s_after_resume = stack.emulator.ledger()["posts"]
    psutil.wait_procs([task_proc], timeout=60)
    state = stack.wait_run(dag, run_id, timeout=180)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    zombie_logs = stack.task_logs(dag, run_id)
    figures = audit([manifest], ledger, tasks, "zombie ")
    counts = manifest["status"].value_counts().to_dict()
    report(
        "zombie_beside_retry",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=tries(stack, dag, run_id),
        posts_at_stop=posts_at_stop,
        retry_started_after_s=retry_after_s,
        posts_at_resume=posts_at_resume,
        posts_3s_after_resume=posts_3s_after_resume,
        stale_try_fenced="FencedError" in zombie_logs,
        counts=counts,
    )

    assert state == "success", zombie_logs[-3000:]
    assert counts.get("completed", 0) + counts.get("unknown_submit", 0) == n, counts
    # The stale try found out before its next POST: at most the one it had on the wire, and it is flagged.
    assert figures["unnamed_tasks"] <= 1 and len(ours(tasks, "zombie ")) <= n + 1
    assert "FencedError" in zombie_logs


# -- 4. the prompt edited between a failed try and its retry -------------------------------------------


def test_prompt_edited_between_a_failed_try_and_the_next(stack: Stack, workdir: Path) -> None:
    """Row 2 is moderated, which fails the task (``fail_on_moderation_rate=0``) after rows 0 and 1 were
    paid for and mirrored. The table is edited (rows 0 and 2 get new prompts) and the task cleared, as a
    user fixing a run does. The new try must generate the new prompts (new, paid requests), never file
    the old images under them, keep row 1 as it was (nothing paid again), and still bill the image that
    row 0's old prompt cost."""
    stack.emulator.reset()
    dag = "imagen_sys_int_edited"
    rows = rows_for("edit", 3, {2: "[[moderate]]"})
    conf = conf_for(workdir, rows)
    run_id = stack.trigger(dag, **conf)
    first_state = stack.wait_run(dag, run_id, timeout=120)
    first = local_manifest(workdir / "out")
    old = {r.prompt_id: r for r in first.itertuples()}
    rows[0]["prompt"] = "edit item 0: a glass jug on slate, edited"
    rows[2]["prompt"] = "edit item 2: a tin cup on felt, edited"
    write_table(Path(conf["prompts"]), rows)
    clear(stack, dag, run_id)
    state = stack.wait_run(dag, run_id, timeout=150)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = audit([manifest], ledger, tasks, "edit ")
    by_id = {r.prompt_id: r for r in manifest.itertuples()}
    by_prompt = {t["prompt"]: t for t in ours(tasks, "edit ")}
    report(
        "prompt_edited_between_tries",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=tries(stack, dag, run_id),
        first_try=first["status"].value_counts().to_dict(),
        row0=[by_id["edit-000"].status, by_id["edit-000"].credits, by_id["edit-000"].error_message],
    )

    assert first_state == "failed"
    assert [old[f"edit-00{i}"].status for i in range(3)] == ["completed", "completed", "moderated"]
    assert state == "success", stack.task_logs(dag, run_id)[-3000:]
    assert len(ours(tasks, "edit ")) == 5  # 3 in the first try, the 2 edited rows once more
    for i in (0, 2):
        row, new_task = by_id[f"edit-00{i}"], by_prompt[rows[i]["prompt"]]
        assert row.prompt == rows[i]["prompt"] and row.status == "completed", row
        assert row.task_id == new_task["id"] != old[f"edit-00{i}"].task_id
        # The file is the new prompt's render, byte for byte (the emulator's PNGs are deterministic).
        scale = BASE_EMULATOR["image_scale"]
        expected = render_png(new_task["prompt"], new_task["size"], scale, new_task["id"])
        assert sha256_of(row.image_uri) == row.sha256 == hashlib.sha256(expected).hexdigest()
    assert by_id["edit-001"].task_id == old["edit-001"].task_id  # unchanged: re-attached, not re-bought
    # The old image stays where it was, and the row names it.
    assert old["edit-000"].task_id in by_id["edit-000"].error_message
    assert sha256_of(old["edit-000"].image_uri) == old["edit-000"].sha256
    # The old prompt's image of row 0 was paid for: the bill still says so.
    assert figures["manifest_credits"] == ledger["net_credits"] == 4 * CREDITS_PER_IMAGE


# -- 5. resubmit_unknown after a crash, within a budget -------------------------------------------------


def test_resubmit_unknown_after_a_crash_never_spends_past_max_credits(stack: Stack, workdir: Path) -> None:
    """``resubmit_unknown=True`` and ``max_credits`` = one image per row. Every submit answers 3 s after
    charging, and the try is SIGKILLed while POSTs wait: their tasks are paid, their ids unknown. The
    retry may pay for those rows again only within what is left of the budget, counting every POST that
    may have been paid."""
    from tests.system.dags.imagen_interrupts import BUDGET_ROWS

    stack.emulator.reset(submit_answer_delay=3.0)
    dag = "imagen_sys_int_resubmit"
    budget = BUDGET_ROWS * CREDITS_PER_IMAGE
    run_id = stack.trigger(dag, **conf_for(workdir, rows_for("budget", BUDGET_ROWS)))
    ti = stack.wait_ti(dag, run_id, {"running"}, timeout=120)
    wait_until(lambda: stack.emulator.ledger()["tasks_created"] >= 6, 60, "6 tasks created")
    proc = stack.task_process(ti["id"])
    assert proc is not None
    proc.kill()
    at_kill = stack.emulator.ledger()
    stack.emulator.configure(submit_answer_delay=0.0)
    state = stack.wait_run(dag, run_id, timeout=150)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = audit([manifest], ledger, tasks, "budget ")
    counts = manifest["status"].value_counts().to_dict()
    report(
        "resubmit_unknown_with_budget",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=tries(stack, dag, run_id),
        max_credits=budget,
        credits_charged=ledger["credits_charged"],
        tasks_at_kill=at_kill["tasks_created"],
        counts=counts,
    )

    assert ledger["credits_charged"] <= budget, (ledger["credits_charged"], budget)
    assert figures["manifest_credits"] <= budget
    assert tries(stack, dag, run_id) >= 2 and state in ("success", "failed")
    assert len(manifest) == BUDGET_ROWS


# -- 6. reruns into one output folder -----------------------------------------------------------------


def _dags_test(stack: Stack, dag: str, date: str, conf: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "airflow"), "dags", "test", dag, date, "--conf", json.dumps(conf)],
        env=stack.env,
        cwd=stack.home,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_reruns_into_one_output_path_never_overwrite_a_paid_image(stack: Stack, workdir: Path) -> None:
    """Two scheduled runs of one DAG into one ``output_path``, then the same date ``airflow dags test``ed
    twice into it (every run its own run id, so its own journal, and it pays again). Every file named in
    any of the manifests must still exist with the sha256 that manifest states."""
    stack.emulator.reset()
    dag = "imagen_sys_int_rerun"
    conf = conf_for(workdir, rows_for("rerun", 3))
    states = []
    for _ in range(2):
        run_id = stack.trigger(dag, **conf)
        states.append(stack.wait_run(dag, run_id, timeout=120))
    # Paused, so the scheduler leaves the runs of `dags test` to it (it runs them in-process).
    httpx.patch(f"{stack.api_url}/api/v2/dags/{dag}", json={"is_paused": True}, timeout=30).raise_for_status()
    started = time.monotonic()
    try:
        tested = [_dags_test(stack, dag, "2026-02-01", conf) for _ in range(2)]
    finally:
        httpx.patch(f"{stack.api_url}/api/v2/dags/{dag}", json={"is_paused": False}, timeout=30)
    dags_test_s = round(time.monotonic() - started, 1)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifests = all_local_manifests(workdir / "out")
    figures = audit(manifests, ledger, tasks, "rerun ")
    files = sorted(p.name for p in (workdir / "out" / "images").glob("*.png"))
    report(
        "reruns_into_one_output_path",
        figures,
        ledger_figures(ledger),
        states=states,
        dags_test_exit=[t.returncode for t in tested],
        dags_test_s=dags_test_s,
        manifests=len(manifests),
        image_files=len(files),
    )

    assert states == ["success", "success"]
    assert [t.returncode for t in tested] == [0, 0], tested[-1].stdout[-2000:] + tested[-1].stderr[-2000:]
    assert len(manifests) == 4, "each run writes its own manifest"
    assert all((m["status"] == "completed").all() for m in manifests)
    # Four runs paid for four images of each prompt, and kept all four.
    assert len(ours(tasks, "rerun ")) == 12 and len(files) == 12 and figures["mirrored"] == 12


# -- 7. Airflow's stale-success race ------------------------------------------------------------------


def test_a_trigger_that_fires_at_once_does_not_cost_the_try(stack: Stack, workdir: Path) -> None:
    """A batch defers with every render already ended, its deferring process slow to exit (7 s), its
    resumed pass long (12 s), and no retry.

    Without the hold (``min_deferral=0``) the trigger fires at once and the resumed try is running when
    the deferring process's "success" reaches the scheduler, which fails it: the race is real here. With
    a hold longer than that exit (15 s) the event waits until the deferral has settled, and the run
    succeeds in its first try, paying each image once."""
    stack.emulator.reset()
    dags = {"unheld": "imagen_sys_int_race_unheld", "held": "imagen_sys_int_race"}
    # Sibling folders, one per run (each run's own out/ and j/), and both runs at once: they do not share
    # a row, and the race needs no quiet machine (the resumed pass is 12 s long).
    folders = {tag: workdir.parent / f"{workdir.name}-{tag}" for tag in dags}
    runs = {}
    for tag, dag in dags.items():
        folders[tag].mkdir()
        runs[tag] = stack.trigger(dag, **conf_for(folders[tag], rows_for(tag, 3)))
    states, figures = {}, {}
    for tag, dag in dags.items():
        states[tag] = stack.wait_run(dag, runs[tag], timeout=150)
        ti = stack.ti(dag, runs[tag])
        figures[tag] = {"state": ti["state"], "try_number": ti["try_number"]}
        if states[tag] == "success":
            figures[tag]["audit"] = audit(
                [local_manifest(folders[tag] / "out")], stack.emulator.ledger(), stack.emulator.tasks(), tag
            )
    mismatch = stack.sql(
        "SELECT count(*) AS n FROM log WHERE event = 'state mismatch' AND dag_id = ?", "imagen_sys_int_race"
    )
    report("stale_success_race", figures, states=states)

    assert states["unheld"] == "failed", "the race did not happen: the test proves nothing"
    assert states["held"] == "success" and figures["held"]["try_number"] == 1
    assert mismatch[0]["n"] == 0
    assert figures["held"]["audit"]["mirrored"] == 3


# -- 8. answers the API gets wrong --------------------------------------------------------------------


def test_wrong_pixel_size_is_not_completed_and_moderated_rows_keep_the_api_message(
    stack: Stack, workdir: Path
) -> None:
    """One row's image comes back in the other orientation (``[[wrong_size]]``), one is moderated, one
    fails. The wrong image is never filed as ``completed``; its row names both sizes; the moderated and
    failed rows carry the API's code and message."""
    stack.emulator.reset()
    dag = "imagen_sys_int_rerun"
    rows = rows_for("answers", 4, {1: "[[wrong_size]]", 2: "[[moderate]]", 3: "[[fail]]"})
    run_id = stack.trigger(dag, **conf_for(workdir, rows))
    state = stack.wait_run(dag, run_id, timeout=120)
    ledger, tasks = stack.emulator.ledger(), stack.emulator.tasks()
    manifest = local_manifest(workdir / "out")
    figures = audit([manifest], ledger, tasks, "answers ")
    by_id = {r.prompt_id: r for r in manifest.itertuples()}
    wrong, moderated, failed = by_id["answers-001"], by_id["answers-002"], by_id["answers-003"]
    report(
        "wrong_size_and_api_messages",
        figures,
        ledger_figures(ledger),
        state=state,
        try_number=tries(stack, dag, run_id),
        counts=manifest["status"].value_counts().to_dict(),
        wrong_size_message=wrong.error_message,
        moderated_message=moderated.error_message,
    )

    assert by_id["answers-000"].status == "completed"
    assert wrong.status == "wrong_size", wrong
    # 16:9 asked, 9:16 served.
    assert "1408" in wrong.error_message and "768" in wrong.error_message, wrong.error_message
    assert (moderated.status, moderated.error_code) == ("moderated", 80006)
    assert moderated.error_message == "Request violates content policy"
    assert (failed.status, failed.error_code, failed.error_message) == ("failed", 60001, "Generation failed")
    assert ledger["tasks_created"] == 4 and ledger["net_credits"] == 2 * CREDITS_PER_IMAGE
