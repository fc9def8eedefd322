"""Batch passes against the emulator over loopback, on a real journal: what a rerun of a task instance
does when its table changed between tries."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_imagen.api.client import ClientSettings, ImagenClient
from airflow_provider_imagen.batch.engine import BatchPass, BatchSettings, Finish, RunClock
from airflow_provider_imagen.batch.journal import Journal, new_record
from airflow_provider_imagen.batch.manifest import RunIdentity, manifest_row
from airflow_provider_imagen.batch.specs import ImageSpec, expand_specs
from airflow_provider_imagen.polling import poll_tasks

IDENTITY = RunIdentity(dag_id="d", run_id="r", airflow_task_id="t")


@pytest.fixture
def client(emulator: Any) -> Iterator[ImagenClient]:
    with ImagenClient(ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url)) as c:
        yield c


def run_try(
    client: ImagenClient,
    journal: Journal,
    specs: list[ImageSpec],
    images: Path,
    *,
    settings: BatchSettings | None = None,
    clock: RunClock | None = None,
    after_pass: Callable[[RunClock], None] | None = None,
) -> Finish:
    """One try of the task, passes and waits on this thread, as the operator runs them undeferred.

    ``after_pass`` sees the try's clock after every pass (its window, say).
    """
    now = time.time()
    clock = clock or RunClock(started_at=now, deadline=now + 60)
    settings = settings or BatchSettings(expected_render=0.2, poll_interval=0.1, linger=0)
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
        if after_pass is not None:
            after_pass(clock)
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
    """An account may render 30 tasks at once; three batches of 150 rows each ask for 40 at a time,
    more than it takes even from one of them. Every 429 reaches the windows (the client does not wait
    them out), which shrink and share the account instead of storming it: every row ends completed and
    mirrored, each prompt was paid once, 429s stay a small share of the POSTs, and every batch's window
    gave way. Nothing here depends on timing: the cap is met whatever the machine's pace."""
    import threading

    rows, ceiling, cap = 150, 40, 30
    emulator.configure(max_concurrent_renders=cap, latency_mean=0.4, latency_jitter=0.1)
    settings = ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url)  # default retries
    smallest: dict[int, int] = {}
    finishes: dict[int, Finish] = {}
    errors: list[BaseException] = []

    def batch(n: int) -> None:
        specs = expand_specs(
            [{"prompt_id": f"b{n}-{i}", "prompt": f"batch {n} lamp {i}"} for i in range(rows)]
        )
        journal = Journal(str(tmp_path / f"j{n}"), dag_id="d", task_id="t", run_id=f"r{n}")
        now = time.time()
        clock = RunClock(started_at=now, deadline=now + 600)  # a deadline no loaded machine reaches
        knobs = BatchSettings(
            max_in_flight=ceiling, expected_render=0.3, poll_interval=0.1, linger=5.0, refill_on_worker=True
        )
        smallest[n] = ceiling

        def note_window(clock: RunClock) -> None:
            smallest[n] = min(smallest[n], clock.current_window(ceiling))

        try:
            with ImagenClient(settings) as client:
                images = tmp_path / f"images{n}"
                finishes[n] = run_try(
                    client, journal, specs, images, settings=knobs, clock=clock, after_pass=note_window
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=batch, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and sorted(finishes) == [0, 1, 2]
    ledger = emulator.ledger()
    for n in range(3):
        assert finishes[n].stopped is None and not finishes[n].overrides  # no row failed or skipped
        entries = Journal(str(tmp_path / f"j{n}"), dag_id="d", task_id="t", run_id=f"r{n}").load()
        assert sum(1 for e in entries.values() if e.status == "completed" and e.mirrored) == rows
        assert sum(e.charged_submits for e in entries.values()) == rows
    assert ledger["tasks_created"] == 3 * rows and max(ledger["submissions_by_prompt"].values()) == 1
    assert ledger["concurrency_limited"] > 0  # the cap was met…
    assert ledger["concurrency_limited"] <= 0.1 * ledger["posts"]  # …heard seldom…
    assert all(smallest[n] < ceiling for n in range(3))  # …and every batch's window gave way to it


def test_the_window_starts_low_doubles_until_a_429_then_shrinks_and_creeps() -> None:
    """Slow start until the first 429; then growth per window's worth of accepted submits, or per
    window² / ceiling of them once per ``Retry-After``, by one at first and doubling while the account
    takes everything; a tenth off per 429; never above the ceiling."""
    from airflow_provider_imagen.batch.base import START_WINDOW

    clock = RunClock(started_at=0.0, deadline=1.0)
    assert clock.current_window(1000) == START_WINDOW and clock.current_window(40) == 40

    def grow(accepted: int, *, held_back: bool = True, now: float = 4.0) -> int:
        return clock.adapt_window(1000, now=now, in_flight=10, accepted=accepted, held_back=held_back)

    assert [grow(100) for _ in range(3)] == [200, 400, 800]
    assert grow(100, held_back=False) == 800  # nothing held back
    assert grow(0) == 800  # nothing accepted
    assert clock.adapt_window(1000, now=2.0, in_flight=800, retry_after=1.0) == 720  # the account's limit
    assert clock.adapt_window(1000, now=3.0, in_flight=720, retry_after=1.0) == 648
    # Growth counts accepted submits, not rounds: a window of 648 under a ceiling of 1,000 may grow per
    # 648² // 1000 = 419 of them, so 418 rounds of one (418 ends refilled) grow nothing yet.
    assert {grow(1) for _ in range(418)} == {648}
    assert grow(1) == 649 and clock.paced_until == 5.0  # such a step comes once per Retry-After…
    assert grow(421, now=4.5) == 649
    assert grow(228, now=4.5) == 650  # …or per window's worth (649), whichever comes first
    assert [grow(422, now=5.0), grow(425, now=6.0)] == [652, 656]  # by one, then 2, 4, …
    assert grow(100, now=6.5) == 656 and clock.credit == 100
    # The state rides the deferral: a resumed try goes on from it.
    kwargs = clock.to_kwargs()
    resumed = RunClock(
        started_at=0.0,
        deadline=1.0,
        **{k: kwargs[k] for k in ("window", "threshold", "credit", "period", "paced_until")},
    )
    assert resumed.adapt_window(1000, now=6.8, in_flight=10, accepted=330, held_back=True) == 656
    assert resumed.adapt_window(1000, now=7.0, in_flight=10, accepted=1, held_back=True) == 664
    capped = RunClock(started_at=0.0, deadline=1.0, window=900)
    assert capped.adapt_window(1000, now=1.0, in_flight=900, accepted=900, held_back=True) == 1000
    capped.threshold = 500
    assert capped.adapt_window(1000, now=1.0, in_flight=900, accepted=5000, held_back=True) == 1000
    one = RunClock(started_at=0.0, deadline=1.0, window=1)
    assert one.adapt_window(10, now=1.0, in_flight=1, retry_after=1.0) == 1


def test_a_window_holding_few_places_grows_back_sooner() -> None:
    """Every batch on a full account loses the same tenth per 429; the one holding fewer places of the
    same ceiling regrows per fewer accepted submits (at most one such step per ``Retry-After``), so
    the batches' shares draw together instead of staying where the first seconds left them."""
    from airflow_provider_imagen.batch.base import MIN_GROWTH_CREDIT, growth_due

    assert growth_due(100, 100) == 100  # at the ceiling: a window's worth, about once per render
    assert growth_due(50, 100) == 25 and growth_due(20, 100) == MIN_GROWTH_CREDIT
    assert growth_due(3, 100) == MIN_GROWTH_CREDIT  # never on every accepted submit

    def regrown(window: int) -> int:
        """Refill the whole window once over a 5 s render, a round a second, after a 429 whose
        ``Retry-After`` was 1 s."""
        clock = RunClock(started_at=0.0, deadline=1.0, window=window, threshold=window, period=1.0)
        for second in range(1, 6):
            clock.adapt_window(100, now=second, in_flight=window, accepted=window // 5, held_back=True)
        return clock.current_window(100)

    assert regrown(80) == 81  # a step per 64 accepted submits
    assert regrown(20) == 28  # 20 → 21 → 22 → 24 → 28: a step per 4 or 5, one a second at most
    # All in one round, the same submits earn the small window one step only: the pace is per period.
    once = RunClock(started_at=0.0, deadline=1.0, window=20, threshold=20, period=1.0)
    assert once.adapt_window(100, now=1.0, in_flight=20, accepted=20, held_back=True) == 21


def test_the_429s_of_one_period_shrink_the_window_once() -> None:
    """Several batches that storm an account at once hear a burst of 429s over a few rounds: one
    congestion signal per ``Retry-After``, so one decrease, however many rounds heard it. A 429 heard
    with nothing in flight only says wait: the window holds nothing that would lighten the account."""
    clock = RunClock(started_at=0.0, deadline=1.0, window=80, threshold=80)
    assert clock.adapt_window(100, now=10.0, in_flight=80, retry_after=2.0) == 72
    assert clock.adapt_window(100, now=10.5, in_flight=60, retry_after=2.0) == 72  # the same burst
    assert clock.adapt_window(100, now=11.9, in_flight=50, retry_after=1.0) == 72  # not a new period yet
    assert clock.calm_until == 12.0
    assert clock.adapt_window(100, now=12.0, in_flight=72, retry_after=2.0) == 64  # still full
    # Never above what the account just showed it holds: a window far above it comes down to it.
    assert clock.adapt_window(100, now=14.0, in_flight=20, retry_after=2.0) == 20
    # A resumed try knows the period: a 429 just after the deferral is part of it.
    kwargs = clock.to_kwargs()
    resumed = RunClock(
        started_at=0.0, deadline=1.0, **{k: kwargs[k] for k in ("window", "threshold", "calm_until")}
    )
    assert resumed.adapt_window(100, now=15.0, in_flight=20, retry_after=2.0) == 20
    assert resumed.adapt_window(100, now=20.0, in_flight=0, retry_after=2.0) == 20
    assert resumed.calm_until == 16.0


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
    """``adaptive_window`` (default on) shrinks the window by a tenth on a 429 and grows it by one per
    window's worth of accepted submits; switched off, the window stays at ``max_in_flight`` and a 429
    only sets the wait."""
    from airflow_provider_imagen.api.errors import RateLimitedError
    from airflow_provider_imagen.batch.submit import SubmitReport

    now = time.time()
    clock = RunClock(started_at=now, deadline=now + 60)
    step = BatchPass(
        client=None,  # type: ignore[arg-type]  # _adapt sends nothing
        journal=Journal(str(tmp_path / "j"), dag_id="d", task_id="t", run_id="r"),
        specs=expand_specs([{"prompt_id": f"p{n}", "prompt": f"a lamp {n}"} for n in range(40)]),
        images_root=str(tmp_path / "images"),
        settings=BatchSettings(max_in_flight=40, adaptive_window=adaptive),
        clock=clock,
    )
    # A full window: 40 tasks in flight when the 429 comes.
    step._fold(
        [
            record
            for n, spec in enumerate(step.specs)
            for record in (
                new_record("intent", spec.key, a=f"a{n}", d=spec.digest),
                new_record("submitted", spec.key, a=f"a{n}", task_id=f"t{n}"),
            )
        ]
    )
    limited = SubmitReport(rejected={"k": RateLimitedError("429", status_code=429, retry_after=3.0)})
    assert step._adapt([limited], more_waiting=True) == 3.0
    assert clock.current_window(40) == (36 if adaptive else 40)
    assert step._adapt([SubmitReport(submitted={"k2": "t2"})], more_waiting=True) == 0.0
    assert clock.current_window(40) == (36 if adaptive else 40)  # one accepted submit earns no growth
    accepted = SubmitReport(submitted={f"k{i}": f"t{i}" for i in range(3, 38)})
    assert step._adapt([accepted], more_waiting=True) == 0.0
    assert clock.current_window(40) == (37 if adaptive else 40)
