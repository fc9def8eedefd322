"""ImagenTaskTrigger on the real emulator over loopback: one event, restarts, twins, failures, no secrets."""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_imagen.api import ClientSettings, ImagenClient, ImageRequest
from airflow_provider_imagen.polling import PollOutcome, PollSchedule
from airflow_provider_imagen.triggers import imagen as trigger_module
from airflow_provider_imagen.triggers.imagen import ImagenTaskTrigger

#: For the emulator's fast mode (renders 0.2 ± 0.1 s; ``[[slow]]`` x10).
FAST = PollSchedule(expected_render=0.15, poll_interval=0.1, backoff=1.5, max_poll_interval=0.5)


@pytest.fixture
def submitter(emulator: Any) -> Iterator[ImagenClient]:
    with ImagenClient(ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url)) as client:
        yield client


def submit(client: ImagenClient, *prompts: str) -> tuple[list[str], list[float]]:
    ids, times = [], []
    for prompt in prompts:
        ids.append(client.submit(ImageRequest(prompt, size="1:1")).id)
        times.append(time.time())
    return ids, times


def make_trigger(
    ids: list[str], *, deadline_in: float = 15.0, schedule: PollSchedule = FAST, **kwargs: Any
) -> ImagenTaskTrigger:
    return ImagenTaskTrigger(
        task_ids=ids, deadline=time.time() + deadline_in, **schedule.to_kwargs(), **kwargs
    )


def import_string(classpath: str) -> Any:
    """Find a class from its dotted path, as the triggerer does with a serialized trigger."""
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)


async def collect(trigger: ImagenTaskTrigger) -> list[dict[str, Any]]:
    """Run the trigger to its end: every event it yields, and proof that the generator then stops."""
    return [event.payload async for event in trigger.run()]


def assert_clean(emulator: Any, *things: Any) -> None:
    text = json.dumps(things, default=str)
    assert emulator.api_key not in text
    assert "http" not in text


class TestPolling:
    async def test_several_ids_complete_with_exactly_one_event(
        self, imagen_connection: str, emulator: Any, submitter: ImagenClient
    ) -> None:
        ids, times = submit(submitter, "a red fox", "a blue whale", "a green tree", "一只猫")
        trigger = make_trigger(ids, submitted_at=times, imagen_conn_id=imagen_connection)
        events = await collect(trigger)
        assert len(events) == 1
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "success" and outcome.completed_ids == ids and outcome.message is None
        assert emulator.ledger()["posts"] == 4
        assert_clean(emulator, trigger.serialize(), events)

    async def test_moderated_and_failed_come_back_failed_with_codes(
        self, imagen_connection: str, emulator: Any, submitter: ImagenClient
    ) -> None:
        ids, times = submit(submitter, "fine", "bad [[moderate]] one", "broken [[fail]] one")
        events = await collect(make_trigger(ids, submitted_at=times))
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "success" and outcome.completed_ids == [ids[0]]
        assert outcome.failed == {ids[1]: 80006, ids[2]: 60001}
        assert_clean(emulator, events)

    async def test_unknown_id_is_not_found(self, imagen_connection: str, emulator: Any) -> None:
        events = await collect(make_trigger(["task_0123456789abcdef0123456789abcdef"]))
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "success"
        assert outcome.not_found_ids == ["task_0123456789abcdef0123456789abcdef"]

    async def test_fire_when_done_fires_before_all_end(
        self, imagen_connection: str, emulator: Any, submitter: ImagenClient
    ) -> None:
        ids, times = submit(submitter, "quick one", "quick two", "a [[slow]] one")
        events = await collect(make_trigger(ids, submitted_at=times, fire_when_done=2))
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "success" and outcome.completed_ids == ids[:2]
        assert outcome.processing_ids == [ids[2]]


class Watch:
    """The trigger's poll loop with its clock and sleeps observed (both still real): when it slept, how
    long, and when it last read the time, so deadline tests need no wall-clock bounds of their own."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sleeps: list[tuple[float, float]] = []  # (clock when it went to sleep, seconds asked)
        self.last_reading = 0.0
        real = trigger_module.apoll_tasks
        monkeypatch.setattr(
            trigger_module, "apoll_tasks", functools.partial(real, clock=self.clock, sleep=self.sleep)
        )

    def clock(self) -> float:
        self.last_reading = time.time()
        return self.last_reading

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append((time.time(), seconds))
        await asyncio.sleep(seconds)


class TestDeadline:
    async def test_deadline_already_passed_gives_timeout_after_one_look(
        self, imagen_connection: str, emulator: Any, submitter: ImagenClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ids, times = submit(submitter, "[[slow]] one", "[[slow]] two")
        polls_before = emulator.ledger()["polls"]
        watch = Watch(monkeypatch)
        events = await collect(make_trigger(ids, submitted_at=times, deadline_in=-5.0))
        assert watch.sleeps == []  # one look at each id, then the event: it never waited
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "timeout" and outcome.processing_ids == ids
        assert outcome.message is not None and "2 task(s) still processing" in outcome.message
        assert emulator.ledger()["polls"] - polls_before == 2

    async def test_slow_tasks_time_out_listing_the_processing_ids(
        self, imagen_connection: str, emulator: Any, submitter: ImagenClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ids, times = submit(submitter, "quick", "a [[slow]] render")
        watch = Watch(monkeypatch)
        trigger = make_trigger(ids, submitted_at=times, deadline_in=0.6)
        events = await collect(trigger)
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "timeout"
        assert outcome.completed_ids == [ids[0]] and outcome.processing_ids == [ids[1]]
        # It waited until the deadline, not less, and never went to sleep once the deadline had passed.
        assert watch.last_reading >= trigger.deadline
        assert watch.sleeps and all(asleep_at < trigger.deadline for asleep_at, _ in watch.sleeps)


class TestRestartsAndTwins:
    async def test_restart_from_serialized_kwargs_keeps_the_deadline_and_never_submits(
        self, imagen_connection: str, emulator: Any, submitter: ImagenClient
    ) -> None:
        ids, times = submit(submitter, "[[slow]] castle", "[[slow]] river", "quick hill")
        posts = emulator.ledger()["posts"]
        first = make_trigger(ids, submitted_at=times, deadline_in=20.0)
        running = asyncio.ensure_future(collect(first))
        await asyncio.sleep(0.5)  # mid-flight: the quick one is done, the slow ones are not
        assert not running.done()
        classpath, kwargs = first.serialize()
        running.cancel()  # the triggerer dies
        with pytest.raises(asyncio.CancelledError):
            await running
        kwargs = json.loads(json.dumps(kwargs))  # what the database keeps
        second = import_string(classpath)(**kwargs)
        assert second.deadline == first.deadline and second.serialize() == first.serialize()
        events = await collect(second)
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "success" and outcome.completed_ids == ids
        assert emulator.ledger()["posts"] == posts == 3

    async def test_two_triggers_over_the_same_ids_both_finish(
        self, imagen_connection: str, emulator: Any, submitter: ImagenClient
    ) -> None:
        ids, times = submit(submitter, "twin one", "twin two", "twin [[moderate]]")
        one, two = make_trigger(ids, submitted_at=times), make_trigger(ids, submitted_at=times)
        events_one, events_two = await asyncio.gather(collect(one), collect(two))
        assert len(events_one) == len(events_two) == 1
        assert events_one[0]["status"] == events_two[0]["status"] == "success"
        assert events_one[0]["tasks"] == events_two[0]["tasks"]
        assert emulator.ledger()["posts"] == 3

    async def test_an_event_due_at_once_is_held_until_not_before(
        self, imagen_connection: str, submitter: ImagenClient
    ) -> None:
        """The condition is met at the trigger's start (the task ended before the deferral): the event
        still waits until ``not_before``, so the scheduler has handled the deferral when the task resumes."""
        ids, times = submit(submitter, "ready before the deferral")
        await asyncio.sleep(0.6)  # rendered (0.2 ± 0.1 s)
        hold_until = time.time() + 1.5
        trigger = make_trigger(
            ids, submitted_at=times, imagen_conn_id=imagen_connection, not_before=hold_until
        )
        events = await collect(trigger)
        assert time.time() >= hold_until and PollOutcome.from_event(events[0]).status == "success"
        # A restarted trigger holds until the same absolute moment; without a hold it fires at once.
        assert trigger.serialize()[1]["not_before"] == hold_until
        started = time.time()
        await collect(make_trigger(ids, submitted_at=times, imagen_conn_id=imagen_connection))
        assert time.time() - started < 1.0

    def test_resume_not_before_follows_the_configured_settle_time(self, monkeypatch: Any) -> None:
        """The hold is the deployment's: ``[imagen] min_deferral_seconds``, else derived from how long
        a worker's supervisor may take to notice a deferring process's exit."""
        monkeypatch.setenv("AIRFLOW__IMAGEN__MIN_DEFERRAL_SECONDS", "7.5")
        assert trigger_module.resume_not_before(now=100.0) == 107.5
        assert trigger_module.resume_not_before(1.0, now=100.0) == 101.0
        monkeypatch.setenv("AIRFLOW__IMAGEN__MIN_DEFERRAL_SECONDS", "0")
        assert trigger_module.resume_not_before(now=100.0) == 100.0
        monkeypatch.delenv("AIRFLOW__IMAGEN__MIN_DEFERRAL_SECONDS")
        # Unset: the supervisor's longest wait to notice an exit, plus a scheduler loop and a margin.
        monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "5")
        assert trigger_module.resume_not_before(now=100.0) == 107.0
        monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")
        assert trigger_module.resume_not_before(now=100.0) == 103.0

    def test_kwargs_are_json_scalars_and_old_kwargs_still_build(self, emulator: Any) -> None:
        trigger = make_trigger(["task_a", "task_b"], submitted_at=[1.7e9, None], fire_when_done=1)
        classpath, kwargs = trigger.serialize()
        assert classpath == "airflow_provider_imagen.triggers.imagen.ImagenTaskTrigger"
        assert json.loads(json.dumps(kwargs)) == kwargs
        assert set(kwargs) == {
            "imagen_conn_id", "task_ids", "deadline", "submitted_at", "fire_when_done", "polled_until",
            "fire_ahead", "not_before", *FAST.field_names(),
        }  # fmt: skip
        assert_clean(emulator, kwargs)
        old = ImagenTaskTrigger(task_ids=["task_a"], deadline=kwargs["deadline"])  # an older version's kwargs
        assert old.schedule == PollSchedule() and old.imagen_conn_id == "imagen_default"
        assert old.submitted_at is None and old.fire_when_done is None

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"task_ids": ["a"], "deadline": 600.0}, "looks like a relative number of seconds"),
            ({"task_ids": "task_a", "deadline": 2e9}, "list of non-empty strings"),
            ({"task_ids": ["a", ""], "deadline": 2e9}, "list of non-empty strings"),
            ({"task_ids": ["a"], "deadline": 2e9, "submitted_at": [1.0, 2.0]}, "parallel to task_ids"),
            ({"task_ids": ["a"], "deadline": 2e9, "fire_when_done": 0}, "fire_when_done=0"),
            ({"task_ids": ["a"], "deadline": 2e9, "backoff": 0.5}, "backoff=0.5"),
        ],
    )
    def test_bad_kwargs_fail_at_construction(self, kwargs: dict[str, Any], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            ImagenTaskTrigger(**kwargs)


class TestFailures:
    async def test_5xx_storm_gives_an_error_event_after_max_consecutive_errors(
        self, emulator: Any, submitter: ImagenClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        conn = {"conn_type": "imagen", "host": emulator.base_url, "password": emulator.api_key}
        monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_NORETRY", json.dumps({**conn, "extra": {"max_retries": 0}}))
        ids, times = submit(submitter, "storm one", "storm two")
        emulator.configure(error_rate_5xx=1.0)
        schedule = PollSchedule(
            expected_render=0.0, poll_interval=0.05, max_poll_interval=0.2, max_consecutive_errors=4
        )
        trigger = make_trigger(ids, submitted_at=times, schedule=schedule, imagen_conn_id="imagen_noretry")
        events = await collect(trigger)
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "error" and outcome.processing_ids == ids
        assert outcome.message is not None and "4 consecutive poll failures" in outcome.message
        assert outcome.polls >= 4
        assert_clean(emulator, events)

    async def test_a_wrong_key_gives_an_error_event_without_the_key(
        self, emulator: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        wrong = "rk_wrong_key_for_trigger_test"
        conn = {"conn_type": "imagen", "host": emulator.base_url, "password": wrong}
        monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_WRONG", json.dumps(conn))
        events = await collect(make_trigger(["task_x"], deadline_in=5.0, imagen_conn_id="imagen_wrong"))
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "error" and "10003" in (outcome.message or "")
        assert wrong not in json.dumps(events) and "http" not in json.dumps(events)

    @pytest.mark.parametrize("conn", [None, {"conn_type": "imagen", "host": "http://127.0.0.1:9"}])
    async def test_a_broken_connection_gives_an_error_event(
        self, conn: dict[str, Any] | None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("AIRFLOW_CONN_IMAGEN_BROKEN", raising=False)
        if conn is not None:
            monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_BROKEN", json.dumps(conn))
        events = await collect(make_trigger(["task_x"], deadline_in=5.0, imagen_conn_id="imagen_broken"))
        assert len(events) == 1
        outcome = PollOutcome.from_event(events[0])
        assert outcome.status == "error" and outcome.processing_ids == ["task_x"]
        assert "could not use connection 'imagen_broken'" in (outcome.message or "")
        assert "http" not in json.dumps(events)

    async def test_log_lines_at_start_and_end_without_urls(
        self,
        imagen_connection: str,
        emulator: Any,
        submitter: ImagenClient,
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        ids, times = submit(submitter, "logged [[moderate]]", "logged fine")
        capfd.readouterr()
        await collect(make_trigger(ids, submitted_at=times))
        captured = capfd.readouterr()
        # Airflow routes ``self.log`` through structlog to the console; keep our logger's lines only.
        ours = [line for line in (captured.out + captured.err).splitlines() if "ImagenTaskTrigger" in line]
        assert any("Polling 2 Imagen task(s)" in line for line in ours), ours
        assert any("success" in line and "1 completed, 1 failed" in line for line in ours), ours
        assert not any("http" in line or emulator.api_key in line for line in ours)
