"""Batch passes against the emulator over loopback, on a real journal: what a rerun of a task instance
does when its table changed between tries."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_imagen.api.client import ClientSettings, ImagenClient
from airflow_provider_imagen.batch.engine import BatchPass, BatchSettings, Finish, RunClock
from airflow_provider_imagen.batch.journal import Journal
from airflow_provider_imagen.batch.manifest import RunIdentity, manifest_row
from airflow_provider_imagen.batch.specs import ImageSpec, expand_specs
from airflow_provider_imagen.polling import poll_tasks

IDENTITY = RunIdentity(dag_id="d", run_id="r", airflow_task_id="t")


@pytest.fixture
def client(emulator: Any) -> Iterator[ImagenClient]:
    with ImagenClient(ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url)) as c:
        yield c


def run_try(client: ImagenClient, journal: Journal, specs: list[ImageSpec], images: Path) -> Finish:
    """One try of the task, passes and waits on this thread, as the operator runs them undeferred."""
    now = time.time()
    clock = RunClock(started_at=now, deadline=now + 60)
    settings = BatchSettings(expected_render=0.2, poll_interval=0.1, linger=0)
    outcome = None
    while True:
        step = BatchPass(
            client=client,
            journal=journal,
            specs=specs,
            images_root=str(images),
            settings=settings,
            clock=clock,
        ).run(outcome)
        if isinstance(step, Finish):
            return step
        outcome = poll_tasks(
            client,
            step.task_ids,
            deadline=clock.deadline,
            schedule=settings.schedule,
            fire_when_done=step.fire_when_done,
        )


def test_a_prompt_edited_between_two_tries_is_generated_and_the_old_image_stays(
    emulator: Any, client: ImagenClient, tmp_path: Path
) -> None:
    rows = [{"prompt_id": f"p{i}", "prompt": f"a ceramic lamp, angle {i}"} for i in range(3)]
    journal = Journal(str(tmp_path / "j"), dag_id="d", task_id="t", run_id="r")
    first = expand_specs(rows)
    run_try(client, journal, first, tmp_path / "images")
    before = journal.load()
    old_uri = before[first[1].key].mirrored["uri"]
    old_sha = before[first[1].key].mirrored["sha256"]

    rows[1]["prompt"] = "a ceramic lamp, angle 1, now in blue"
    second = expand_specs(rows)
    run_try(client, journal, second, tmp_path / "images")
    ledger = emulator.ledger()
    assert ledger["posts"] == 4  # the three first ones, and the edited prompt once
    assert ledger["submissions_by_prompt"]["a ceramic lamp, angle 1, now in blue"] == 1
    after = journal.load()
    new = after[second[1].key]
    assert new.mirrored["uri"] != old_uri
    assert hashlib.sha256(Path(old_uri).read_bytes()).hexdigest() == old_sha  # not overwritten
    assert hashlib.sha256(Path(new.mirrored["uri"]).read_bytes()).hexdigest() == new.mirrored["sha256"]
    for spec in (second[0], second[2]):  # unchanged rows: re-attached, not paid again
        assert after[spec.key].task_ids == before[spec.key].task_ids

    row = manifest_row(second[1], new, identity=IDENTITY)
    assert row["status"] == "completed" and row["prompt"] == "a ceramic lamp, angle 1, now in blue"
    assert row["credits"] == 92  # both requests were paid, the old one in the first try
    assert f"its image stays at {old_uri}" in row["error_message"]
    with pytest.raises(ValueError, match="never submitted"):  # the old request is not this entry's
        manifest_row(first[1], new, identity=IDENTITY)
    assert (
        int(sum(manifest_row(s, after[s.key], identity=IDENTITY)["credits"] for s in second))
        == (ledger["net_credits"])
    )


def test_a_429_while_mirroring_is_waited_out_not_a_failed_row(emulator: Any, tmp_path: Path) -> None:
    """The API answers 429 to most calls (1 request a second) and the client gives up at the first one:
    every image is still mirrored in the pass, after the API's ``Retry-After``, and none is recorded as
    a failed mirror (which would fail the try)."""
    from airflow_provider_imagen.api.retry import RetryPolicy
    from airflow_provider_imagen.batch.journal import new_record

    specs = expand_specs([{"prompt_id": f"r{i}", "prompt": f"rate limited lamp {i}"} for i in range(4)])
    journal = Journal(str(tmp_path / "j"), dag_id="d", task_id="t", run_id="r")
    with ImagenClient(ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url)) as setup:
        ids = [setup.submit(s.request).id for s in specs]  # type: ignore[arg-type]
    for spec, tid in zip(specs, ids, strict=True):
        journal.append(
            [
                new_record("intent", spec.key, a="a", d=spec.digest),
                new_record("submitted", spec.key, a="a", task_id=tid),
            ]
        )
    deadline = time.time() + 30
    while emulator.ledger()["status_counts"]["completed"] < 4 and time.time() < deadline:
        time.sleep(0.1)
    for spec, tid in zip(specs, ids, strict=True):
        journal.append([new_record("terminal", spec.key, task_id=tid, status="completed")])
    emulator.configure(rate_limit_rps=1, rate_limit_burst=1)
    impatient = RetryPolicy(max_attempts=1)
    settings = ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url, retry=impatient)
    with ImagenClient(settings) as client:
        now = time.time()
        step = BatchPass(
            client=client,
            journal=journal,
            specs=specs,
            images_root=str(tmp_path / "images"),
            settings=BatchSettings(),
            clock=RunClock(started_at=now, deadline=now + 60),
        ).run(None)
    assert isinstance(step, Finish) and step.unmirrored == 0
    entries = journal.load()
    assert all(entries[s.key].mirrored for s in specs)
    assert not any(entries[s.key].mirror_error for s in specs)
    assert emulator.ledger()["rate_limited"] > 0  # the API did refuse some of those calls


def test_a_balance_read_waits_out_429s_until_the_deadline(emulator: Any) -> None:
    from airflow_provider_imagen.api.errors import RateLimitedError
    from airflow_provider_imagen.api.retry import RetryPolicy
    from airflow_provider_imagen.batch.engine import patiently

    emulator.configure(rate_limit_rps=1, rate_limit_burst=1)
    settings = ClientSettings(
        api_key=emulator.api_key, base_url=emulator.base_url, retry=RetryPolicy(max_attempts=1)
    )
    with ImagenClient(settings) as client:
        balances = [
            patiently(client.get_balance, deadline=time.time() + 30, what="the balance") for _ in range(3)
        ]
        assert len(balances) == 3 and emulator.ledger()["rate_limited"] >= 1
        with pytest.raises(RateLimitedError):  # no time left: the 429 is the answer
            patiently(client.get_balance, deadline=time.time() + 0.01, what="the balance")


def test_three_batches_share_a_capped_account_without_failed_rows(emulator: Any, tmp_path: Path) -> None:
    """An account may render 6 tasks at once; three batches of 12 rows each ask for 6 at a time. Their
    windows shrink on the API's 429s instead of failing rows: every row ends completed, each prompt
    was paid once, and each batch's window went below its ceiling at least once."""
    import threading

    from airflow_provider_imagen.api.retry import RetryPolicy

    emulator.configure(max_concurrent_renders=6, latency_mean=0.6, latency_jitter=0.2)
    settings = ClientSettings(
        api_key=emulator.api_key, base_url=emulator.base_url, retry=RetryPolicy(max_attempts=1)
    )
    smallest: dict[int, int] = {}
    finishes: dict[int, Finish] = {}

    def batch(n: int) -> None:
        specs = expand_specs([{"prompt_id": f"b{n}-{i}", "prompt": f"batch {n} lamp {i}"} for i in range(12)])
        journal = Journal(str(tmp_path / f"j{n}"), dag_id="d", task_id="t", run_id=f"r{n}")
        now = time.time()
        clock = RunClock(started_at=now, deadline=now + 90)
        knobs = BatchSettings(max_in_flight=6, expected_render=0.5, poll_interval=0.2, linger=0)
        smallest[n] = knobs.max_in_flight
        with ImagenClient(settings) as client:
            outcome = None
            while True:
                step = BatchPass(
                    client=client,
                    journal=journal,
                    specs=specs,
                    images_root=str(tmp_path / f"images{n}"),
                    settings=knobs,
                    clock=clock,
                ).run(outcome)
                smallest[n] = min(smallest[n], clock.window or knobs.max_in_flight)
                if isinstance(step, Finish):
                    finishes[n] = step
                    return
                outcome = poll_tasks(
                    client, step.task_ids, deadline=clock.deadline, schedule=knobs.schedule, fire_when_done=1
                )

    threads = [threading.Thread(target=batch, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    ledger = emulator.ledger()
    assert sorted(finishes) == [0, 1, 2]
    for n in range(3):
        entries = Journal(str(tmp_path / f"j{n}"), dag_id="d", task_id="t", run_id=f"r{n}").load()
        assert sum(1 for e in entries.values() if e.status == "completed" and e.mirrored) == 12
    assert ledger["tasks_created"] == 36 and max(ledger["submissions_by_prompt"].values()) == 1
    assert ledger["concurrency_limited"] > 0  # the cap was met…
    assert all(smallest[n] < 6 for n in range(3))  # …and every batch's window gave way to it


def test_the_window_starts_low_doubles_until_a_429_then_halves_and_creeps() -> None:
    """Slow start, then additive increase and multiplicative decrease, never above the ceiling."""
    from airflow_provider_imagen.batch.base import START_WINDOW

    clock = RunClock(started_at=0.0, deadline=1.0)
    assert clock.current_window(1000) == START_WINDOW and clock.current_window(40) == 40
    sizes = [clock.adapt_window(1000, rate_limited=False, accepted=True) for _ in range(3)]
    assert sizes == [200, 400, 800]
    assert clock.adapt_window(1000, rate_limited=False, accepted=False) == 800  # nothing held back
    assert clock.adapt_window(1000, rate_limited=True, accepted=False) == 400  # the account's limit
    assert clock.adapt_window(1000, rate_limited=True, accepted=False) == 200
    assert [clock.adapt_window(1000, rate_limited=False, accepted=True) for _ in range(2)] == [201, 202]
    # The state rides the deferral: a resumed try goes on from it.
    resumed = RunClock(
        started_at=0.0, deadline=1.0, **{k: clock.to_kwargs()[k] for k in ("window", "threshold")}
    )
    assert resumed.adapt_window(1000, rate_limited=False, accepted=True) == 203
    capped = RunClock(started_at=0.0, deadline=1.0, window=900)
    assert capped.adapt_window(1000, rate_limited=False, accepted=True) == 1000
    assert (
        RunClock(started_at=0.0, deadline=1.0, window=1).adapt_window(10, rate_limited=True, accepted=False)
        == 1
    )


def test_a_first_pass_fills_a_grown_window_without_waiting_for_an_end(
    emulator: Any, client: ImagenClient, tmp_path: Path
) -> None:
    """250 rows under the default ceiling: the window starts at 100, the API takes every round, so the
    first pass doubles it and sends all 250 before it waits once."""
    emulator.configure(latency_mean=5.0, latency_jitter=0.0)  # nothing ends during the pass
    specs = expand_specs([{"prompt_id": f"s{i}", "prompt": f"a slow-start lamp {i}"} for i in range(250)])
    now = time.time()
    clock = RunClock(started_at=now, deadline=now + 60)
    step = BatchPass(
        client=client,
        journal=Journal(str(tmp_path / "j"), dag_id="d", task_id="t", run_id="r"),
        specs=specs,
        images_root=str(tmp_path / "images"),
        settings=BatchSettings(expected_render=5.0),
        clock=clock,
    ).run(None)
    assert not isinstance(step, Finish) and len(step.task_ids) == 250
    assert emulator.ledger()["posts"] == 250 and clock.window == 400


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_window_adapts_to_429s_only_when_asked(tmp_path: Path, adaptive: bool) -> None:
    """``adaptive_window`` (default on) halves the window on a 429 and grows it by one per accepted
    round; switched off, the window stays at ``max_in_flight`` and a 429 only sets the wait."""
    from airflow_provider_imagen.api.errors import RateLimitedError
    from airflow_provider_imagen.batch.submit import SubmitReport

    now = time.time()
    clock = RunClock(started_at=now, deadline=now + 60)
    step = BatchPass(
        client=None,  # type: ignore[arg-type]  # _adapt sends nothing
        journal=Journal(str(tmp_path / "j"), dag_id="d", task_id="t", run_id="r"),
        specs=expand_specs([{"prompt_id": "p0", "prompt": "a lamp"}]),
        images_root=str(tmp_path / "images"),
        settings=BatchSettings(max_in_flight=40, adaptive_window=adaptive),
        clock=clock,
    )
    limited = SubmitReport(rejected={"k": RateLimitedError("429", status_code=429, retry_after=3.0)})
    assert step._adapt([limited], more_waiting=True) == 3.0
    assert step.window == (20 if adaptive else 40)
    assert step._adapt([SubmitReport(submitted={"k2": "t2"})], more_waiting=True) == 0.0
    assert step.window == (21 if adaptive else 40)
