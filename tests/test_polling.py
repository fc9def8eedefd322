"""The poll schedule and tracker with a fake clock (no server, no mocks), the event contract, and both drivers
over small scripted fake clients."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
from typing import Any

import pytest

from airflow_provider_imagen.api.errors import (
    AuthenticationError,
    ImagenTransportError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.models import Task
from airflow_provider_imagen.polling import (
    PollOutcome,
    PollSchedule,
    PollTracker,
    TaskPollState,
    apoll_tasks,
    poll_tasks,
    safe_message,
)

FAR = 1e12  # a deadline that never comes


def server_error() -> ServerError:
    return ServerError("boom", status_code=503, code=60099, method="GET", path="/tasks/x")


def rate_limited(retry_after: float | None) -> RateLimitedError:
    return RateLimitedError("slow down", retry_after=retry_after, status_code=429, code=50001)


def not_found() -> TaskNotFoundError:
    return TaskNotFoundError("Task not found", status_code=404, code=40401)


class TestSchedule:
    def test_kwargs_round_trip_through_json(self) -> None:
        s = PollSchedule(
            expected_render=0.1, poll_interval=0.05, backoff=1.0, max_poll_interval=1, max_concurrent_polls=3
        )
        kwargs = json.loads(json.dumps(s.to_kwargs()))
        assert PollSchedule.from_kwargs(kwargs) == s
        assert all(isinstance(v, (int, float)) for v in kwargs.values())

    def test_from_kwargs_fills_defaults_and_rejects_typos(self) -> None:
        assert PollSchedule.from_kwargs({"poll_interval": 3}) == PollSchedule(poll_interval=3.0)
        assert PollSchedule.from_kwargs({"backoff": None}) == PollSchedule()
        with pytest.raises(ValueError, match=r"unknown poll schedule field.*poll_intervall"):
            PollSchedule.from_kwargs({"poll_intervall": 3})

    @pytest.mark.parametrize(
        ("field", "value", "match"),
        [
            ("expected_render", -1, "expected_render=-1.0: must be >= 0"),
            ("poll_interval", 0, "poll_interval=0.0: must be > 0"),
            ("backoff", 0.9, "backoff=0.9: must be >= 1"),
            ("max_poll_interval", 1.0, "max_poll_interval=1.0: must be >= poll_interval"),
            ("max_consecutive_errors", 0, "max_consecutive_errors=0: must be >= 1"),
            ("max_concurrent_polls", 2.5, "max_concurrent_polls=2.5: must be an integer"),
            ("round_gap", -0.1, "round_gap=-0.1: must be >= 0"),
            ("poll_interval", "2", "poll_interval='2': must be a finite number"),
            ("poll_interval", float("nan"), "must be a finite number"),
            ("max_consecutive_errors", True, "must be an integer"),
        ],
    )
    def test_validation_names_the_field(self, field: str, value: Any, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            PollSchedule(**{field: value})

    def test_error_pause_grows_and_caps(self) -> None:
        s = PollSchedule()
        assert [s.error_pause(n) for n in (1, 2, 3)] == [2.0, 3.0, 4.5]
        assert s.error_pause(10) == 30.0 and s.error_pause(10_000) == 30.0


class TestGrid:
    def test_first_poll_at_submit_plus_expected_render(self) -> None:
        tracker = PollTracker(["a", "b"], PollSchedule(), start=100.0, submitted_at={"a": 95.0})
        assert tracker.next_due("a") == 105.0  # submitted 95 + 10
        assert tracker.next_due("b") == 110.0  # submit unknown: the tracker's start
        assert tracker.due(104.9) == []
        assert tracker.due(105.0) == ["a"]
        assert tracker.next_wake(100.0) == 105.0

    def test_an_id_overdue_at_start_is_polled_at_once_then_rejoins_its_grid(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=100.0, submitted_at={"a": 87.0})
        assert tracker.due(100.0) == ["a"]  # grid 97, 99, 102, ...: 97 passed unseen
        tracker.record_status("a", "processing", None, 100.0)
        assert tracker.next_due("a") == 102.0  # 87 + 10 + 2 + 3

    def test_backoff_grows_from_poll_interval_and_caps(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0, submitted_at={"a": 0.0})
        times = []
        now = tracker.next_due("a")
        for _ in range(10):
            times.append(now)
            tracker.record_status("a", "processing", None, now)
            now = tracker.next_due("a")
        gaps = [round(b - a, 4) for a, b in itertools.pairwise(times)]
        assert times[0] == 10.0
        assert gaps == [2.0, 3.0, 4.5, 6.75, 10.125, 15.1875, 22.7812, 30.0, 30.0]
        assert tracker.polls("a") == 10

    def test_a_constant_cadence_with_backoff_one(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(expected_render=1, poll_interval=2, backoff=1), start=0.0)
        for now in (1.0, 3.0, 5.0):
            assert tracker.due(now) == ["a"]
            tracker.record_status("a", "processing", None, now)
        assert tracker.next_due("a") == 7.0

    def test_short_renders_get_rounds_a_tenth_of_a_render_apart(self) -> None:
        """A round gap is a delay added to the notice of an end: a share of a short render, so it
        shrinks with the render; long renders keep the default."""
        assert PollSchedule.for_renders(10.0, 2.0) == PollSchedule(expected_render=10.0, poll_interval=2.0)
        assert PollSchedule.for_renders(5.0, 1.0).round_gap == 0.25
        short = PollSchedule.for_renders(1.0, 0.25)
        assert (short.expected_render, short.poll_interval, short.round_gap) == (1.0, 0.25, 0.1)
        assert PollSchedule.for_renders(0.0, 0.25).round_gap == 0.05

    def test_ids_falling_due_within_the_round_gap_wait_for_the_next_round(self) -> None:
        submits = {"a": 0.0, "b": 0.1, "c": 0.2, "d": 0.3}
        tracker = PollTracker(list(submits), PollSchedule(), start=0.0, submitted_at=submits)
        rounds = []
        now = tracker.next_wake(0.0)
        while len(rounds) < 3:
            due = tracker.due(now)
            rounds.append((round(now, 3), due))
            for tid in due:
                tracker.record_status(tid, "processing", None, now)
            tracker.round_done(now)
            assert tracker.due(now + 0.1) == []  # the next round waits for the gap
            now = tracker.next_wake(now)
        assert rounds == [(10.0, ["a"]), (10.25, ["b", "c"]), (10.5, ["d"])]
        # Without a gap each id is polled the moment it falls due.
        tracker = PollTracker(list(submits), PollSchedule(round_gap=0), start=0.0, submitted_at=submits)
        assert tracker.due(10.0) == ["a"]
        tracker.record_status("a", "processing", None, 10.0)
        tracker.round_done(10.0)
        assert tracker.next_wake(10.0) == 10.1

    def test_a_late_answer_is_not_followed_by_a_near_duplicate(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0)
        tracker.record_status("a", "processing", None, 11.9)  # first poll ran late; grid has 12 next
        assert tracker.next_due("a") == 15.0  # 12 is only 0.1 s away: skip to the next grid instant

    @pytest.mark.parametrize("status", ["queued", "unknown", "", "PROCESSING", "succeeded", "pending"])
    def test_statuses_other_than_completed_and_failed_keep_polling(self, status: str) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0)
        tracker.record_status("a", status, None, 10.0)
        assert tracker.state("a") == TaskPollState("processing", None)
        assert tracker.next_due("a") == 12.0
        assert tracker.result(10.0, FAR) is None

    def test_terminal_ids_are_never_polled_again(self) -> None:
        tracker = PollTracker(["a", "b"], PollSchedule(), start=0.0)
        tracker.record_status("a", "completed", None, 10.0)
        tracker.record_status("b", "failed", 80006, 10.0)
        assert tracker.due(1e6) == [] and tracker.next_due("a") is None
        assert tracker.state("b") == TaskPollState("failed", 80006)
        tracker.record_status("a", "processing", None, 11.0)  # a stale answer cannot revive it
        assert tracker.state("a").status == "completed"

    def test_404_ends_the_id_as_not_found(self) -> None:
        tracker = PollTracker(["a", "b"], PollSchedule(), start=0.0)
        tracker.record("a", not_found(), 10.0)
        assert tracker.state("a") == TaskPollState("not_found", 40401)
        assert tracker.due(10.0) == ["b"]
        tracker.record("b", Task(id="b", status="completed", image_url="https://cdn/x.png"), 10.0)
        outcome = tracker.result(10.0, FAR)
        assert outcome is not None and outcome.status == "success"
        assert outcome.not_found_ids == ["a"] and outcome.completed_ids == ["b"]

    def test_duplicates_are_watched_once_and_bad_ids_rejected(self) -> None:
        assert PollTracker(["a", "b", "a"], PollSchedule(), start=0.0).task_ids == ["a", "b"]
        with pytest.raises(ValueError, match="non-empty string"):
            PollTracker(["a", " "], PollSchedule(), start=0.0)
        with pytest.raises(KeyError, match="not tracked"):
            PollTracker(["a"], PollSchedule(), start=0.0).record_status("zzz", "completed", None, 1.0)


class TestFailures:
    def test_consecutive_errors_bound_yields_error(self) -> None:
        schedule = PollSchedule(max_consecutive_errors=3)
        tracker = PollTracker(["a"], schedule, start=0.0)
        now = 10.0
        for n in range(1, 4):
            assert tracker.result(now, FAR) is None
            assert tracker.due(now) == ["a"]
            tracker.record("a", server_error(), now)
            assert tracker.consecutive_errors == n
            assert tracker.is_paused(now) and tracker.due(now) == []
            now = tracker.next_wake(now)  # the pause: 2, 3, ...
        outcome = tracker.result(now, FAR)
        assert outcome is not None and outcome.status == "error"
        assert outcome.message is not None and "3 consecutive poll failures" in outcome.message
        assert "ServerError" in outcome.message
        assert outcome.processing_ids == ["a"]

    def test_any_answer_resets_the_count(self) -> None:
        tracker = PollTracker(["a", "b"], PollSchedule(max_consecutive_errors=3), start=0.0)
        tracker.record("a", server_error(), 10.0)
        tracker.record("b", ImagenTransportError("GET /tasks/b: ReadTimeout"), 13.0)
        assert tracker.consecutive_errors == 2
        tracker.record_status("a", "processing", None, 20.0)
        assert tracker.consecutive_errors == 0
        tracker.record("a", server_error(), 30.0)
        tracker.record("a", server_error(), 40.0)
        assert tracker.result(40.0, FAR) is None

    def test_failures_while_already_paused_count_once(self) -> None:
        tracker = PollTracker([f"t{i}" for i in range(20)], PollSchedule(max_consecutive_errors=2), start=0.0)
        for i in range(20):  # one round of concurrent polls, all failing together
            tracker.record(f"t{i}", server_error(), 10.0 + i * 0.01)
        assert tracker.consecutive_errors == 1 and tracker.result(10.5, FAR) is None

    def test_error_pause_backs_off(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0)
        tracker.record("a", server_error(), 10.0)
        assert tracker.next_wake(10.0) == 12.0
        tracker.record("a", server_error(), 12.0)
        assert tracker.next_wake(12.0) == 15.0
        assert tracker.polls("a") == 2

    def test_retry_after_pauses_every_id(self) -> None:
        tracker = PollTracker(["a", "b", "c"], PollSchedule(), start=0.0)
        tracker.record("a", rate_limited(7.0), 10.0)
        assert tracker.due(16.9) == [] and tracker.next_wake(10.0) == 17.0
        assert tracker.due(17.0) == ["a", "b", "c"]  # the failed id first among equals, none lost

    def test_429_without_retry_after_backs_off(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0)
        tracker.record("a", rate_limited(None), 10.0)
        assert tracker.next_wake(10.0) == 12.0

    def test_unexpected_failures_are_not_absorbed(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0)
        with pytest.raises(AuthenticationError):
            tracker.record("a", AuthenticationError("key invalid", status_code=401, code=10003), 10.0)

    def test_error_message_has_no_url(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(max_consecutive_errors=1), start=0.0)
        tracker.record(
            "a", ImagenTransportError("ConnectError for https://reapi.ai/api/v1/tasks/a?x=1"), 10.0
        )
        outcome = tracker.result(10.0, FAR)
        assert outcome is not None and "https" not in (outcome.message or "")
        assert "<url>" in (outcome.message or "")


class TestStopping:
    def test_deadline_gives_timeout_after_one_last_poll(self) -> None:
        tracker = PollTracker(["a", "b"], PollSchedule(), start=0.0)
        tracker.record_status("a", "completed", None, 10.0)
        tracker.record_status("b", "processing", None, 10.0)  # next grid instant: 12
        assert tracker.next_wake(10.0, deadline=11.0) == 11.0
        assert tracker.result(11.0, 11.0) is None  # not before b had its last look
        assert tracker.due(11.0, deadline=11.0) == ["b"]
        tracker.record_status("b", "processing", None, 11.0)
        assert tracker.due(11.0, deadline=11.0) == []
        outcome = tracker.result(11.0, 11.0)
        assert outcome is not None and outcome.status == "timeout"
        assert outcome.processing_ids == ["b"] and outcome.completed_ids == ["a"]
        assert outcome.message is not None and "1 task(s) still processing" in outcome.message

    def test_the_last_poll_can_still_find_it_done(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0)
        assert tracker.due(5.0, deadline=5.0) == ["a"]  # deadline before the first grid instant
        tracker.record_status("a", "completed", None, 5.0)
        outcome = tracker.result(5.0, 5.0)
        assert outcome is not None and outcome.status == "success"

    def test_deadline_while_paused_times_out_without_polling(self) -> None:
        tracker = PollTracker(["a"], PollSchedule(), start=0.0)
        tracker.record("a", rate_limited(60.0), 10.0)
        assert tracker.next_wake(10.0, deadline=20.0) == 20.0
        assert tracker.due(20.0, deadline=20.0) == []
        outcome = tracker.result(20.0, 20.0)
        assert outcome is not None and outcome.status == "timeout"

    def test_fire_when_done(self) -> None:
        tracker = PollTracker(["a", "b", "c"], PollSchedule(), start=0.0)
        tracker.record_status("a", "completed", None, 10.0)
        assert tracker.result(10.0, FAR, fire_when_done=2) is None
        tracker.record_status("b", "failed", 60001, 10.0)
        outcome = tracker.result(10.0, FAR, fire_when_done=2)
        assert outcome is not None and outcome.status == "success"
        assert outcome.completed_ids == ["a"] and outcome.failed == {"b": 60001}
        assert outcome.processing_ids == ["c"] and outcome.polls == 2
        assert tracker.result(10.0, FAR) is None  # None = all
        assert tracker.result(10.0, FAR, fire_when_done=99) is None  # capped at all

    def test_fire_ahead_counts_ids_whose_first_poll_falls_due_within_the_lead(self) -> None:
        """A refilling batch's trigger fires ``lead`` seconds before enough ids are due for their first
        poll (the worker polls them when it arrives), without polling them itself."""
        submitted = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 50.0}
        tracker = PollTracker(submitted, PollSchedule(), start=0.0, submitted_at=submitted, lead=1.5)
        # First polls at 10, 11, 12 and 60: two of them are within 1.5 s at 9.5, three at 10.5.
        assert tracker.result(9.0, FAR, fire_when_done=3) is None
        assert tracker.next_wake(9.0, FAR, 3) == 9.5  # when the second comes within the lead: no poll needed
        assert tracker.result(9.5, FAR, fire_when_done=3) is None
        outcome = tracker.result(10.5, FAR, fire_when_done=3)
        assert outcome is not None and outcome.status == "success" and outcome.polls == 0
        assert outcome.processing_ids == ["a", "b", "c", "d"]  # nothing seen ended: the worker looks
        # Without a lead, only ends count; an id already polled (still rendering) no longer counts.
        plain = PollTracker(submitted, PollSchedule(), start=0.0, submitted_at=submitted)
        assert plain.result(10.5, FAR, fire_when_done=3) is None
        tracker.record_status("a", "processing", None, 10.0)
        assert tracker.result(10.5, FAR, fire_when_done=3) is None

    def test_fire_ahead_skips_ids_an_earlier_poller_already_polled(self) -> None:
        """After a resume, the ids its sweep polled (first poll before ``polled_until``) are not new."""
        submitted = {"a": 0.0, "b": 20.0}
        tracker = PollTracker(
            submitted, PollSchedule(), start=15.0, submitted_at=submitted, polled_until=14.0, lead=1.0
        )
        assert tracker.result(15.0, FAR, fire_when_done=1) is None  # a's first poll (10) was made
        assert tracker.next_wake(15.0, FAR, 1) == pytest.approx(
            15.0
        )  # a's next grid poll comes before b's lead
        assert tracker.result(28.5, FAR, fire_when_done=1) is None
        assert tracker.result(29.0, FAR, fire_when_done=1) is not None

    def test_a_wait_for_every_id_fires_ahead_of_the_last_next_poll_while_all_are_on_time(self) -> None:
        """With nothing left to send, the trigger fires ``lead`` before the last unfinished id's next poll
        (first or second), so the worker makes those polls on arrival, once some id has ended on
        schedule; before any end, or once an id is past its second poll (a slow render), it fires only
        when every id has ended."""
        submitted = {"a": 0.0, "b": 1.0, "c": 2.0}
        tracker = PollTracker(submitted, PollSchedule(), start=0.0, submitted_at=submitted, lead=1.5)
        # First polls at 10, 11 and 12; nothing seen ended yet: no firing ahead.
        assert tracker.result(10.5, FAR) is None
        assert tracker.next_wake(9.0, FAR) == pytest.approx(10.0)  # a's first poll
        # a ended at its first poll: b's and c's next polls (11, 12) are the last; fire at 10.5.
        tracker.record_status("a", "completed", None, 10.0)
        assert tracker.next_wake(10.0, FAR) == pytest.approx(10.5)  # no poll due before: wake for the lead
        assert tracker.result(10.4, FAR) is None
        outcome = tracker.result(10.5, FAR)
        assert outcome is not None and outcome.status == "success" and outcome.polls == 1
        # b polled at 11, still rendering: its second poll (13) is the last; fire at 11.5.
        tracker.record_status("b", "processing", None, 11.0)
        assert tracker.result(11.4, FAR) is None and tracker.result(11.5, FAR) is not None
        # Past its second poll (13), b is late: only ends count, and the wake is the next poll.
        tracker.record_status("b", "processing", None, 13.0)
        tracker.record_status("c", "completed", None, 13.0)
        assert tracker.result(15.9, FAR) is None
        assert tracker.next_wake(13.0, FAR) == pytest.approx(16.0)
        tracker.record_status("b", "completed", None, 16.0)
        assert tracker.result(16.0, FAR) is not None

    def test_nothing_to_watch_is_done(self) -> None:
        outcome = PollTracker([], PollSchedule(), start=0.0).result(0.0, FAR)
        assert outcome is not None and outcome.status == "success" and outcome.tasks == {}


class TestEvent:
    def outcome(self) -> PollOutcome:
        return PollOutcome(
            status="timeout",
            tasks={
                "task_a": TaskPollState("completed"),
                "task_b": TaskPollState("failed", 80006),
                "task_c": TaskPollState("not_found", 40401),
                "task_d": TaskPollState("processing"),
            },
            message="deadline passed",
            polls=9,
        )

    def test_round_trip_through_json(self) -> None:
        outcome = self.outcome()
        event = json.loads(json.dumps(outcome.to_event()))
        assert PollOutcome.from_event(event) == outcome
        assert outcome.counts() == {"completed": 1, "failed": 1, "not_found": 1, "processing": 1}
        assert outcome.terminal_ids == ["task_a", "task_b", "task_c"]

    def test_minimal_event_needs_no_url_message_or_poll_count(self) -> None:
        outcome = PollOutcome.from_event({"status": "success", "tasks": {"t": {"status": "completed"}}})
        assert outcome.completed_ids == ["t"] and outcome.message is None and outcome.polls == 0
        # fields this version does not know (say, a URL someone added) are ignored, never required
        extra = {"status": "success", "tasks": {"t": {"status": "completed", "image_url": "x"}}, "v": 2}
        assert PollOutcome.from_event(extra).tasks == {"t": TaskPollState("completed")}

    @pytest.mark.parametrize(
        ("event", "match"),
        [
            (None, "must be a dict, got NoneType"),
            ({"tasks": {}}, "has no 'status'"),
            ({"status": "done", "tasks": {}}, "unknown status 'done'"),
            ({"status": "success"}, "'tasks' must be a dict, got NoneType"),
            ({"status": "success", "tasks": ["t"]}, "'tasks' must be a dict, got list"),
            ({"status": "success", "tasks": {"t": "completed"}}, "task t: must be a dict"),
            ({"status": "success", "tasks": {"t": {}}}, "task t: unknown status None"),
            ({"status": "success", "tasks": {"t": {"status": "succeeded"}}}, "task t: unknown status"),
            (
                {"status": "success", "tasks": {"t": {"status": "failed", "error_code": "8"}}},
                "not an integer",
            ),
            ({"status": "error", "tasks": {}, "message": 5}, "'message' must be a string"),
            ({"status": "error", "tasks": {}, "polls": -1}, "'polls' must be a non-negative integer"),
            ({"status": "success", "tasks": {"": {"status": "completed"}}}, "not a non-empty string"),
        ],
    )
    def test_from_event_rejects_bad_events(self, event: Any, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            PollOutcome.from_event(event)

    def test_safe_message(self) -> None:
        text = safe_message(
            RuntimeError("GET https://cdn.reapi.ai/a.png?sig=abc failed\nkey rk_x"), secrets=["rk_x"]
        )
        assert text == "RuntimeError: GET <url> failed key ***"
        assert len(safe_message("x" * 1000)) == 300


def simulate(
    schedule: PollSchedule, renders: list[float], submits: list[float]
) -> tuple[float, float, float]:
    """Drive the tracker like a poller would, with a fake clock; return (polls/task, mean late, p95 late)."""
    ids = [f"task_{i}" for i in range(len(renders))]
    ready = {tid: submit + render for tid, submit, render in zip(ids, submits, renders, strict=True)}
    tracker = PollTracker(ids, schedule, start=0.0, submitted_at=dict(zip(ids, submits, strict=True)))
    now = 0.0
    while tracker.result(now, FAR) is None:
        for tid in tracker.due(now, FAR):
            tracker.record_status(tid, "completed" if now >= ready[tid] else "processing", None, now)
        tracker.round_done(now)
        now = tracker.next_wake(now, FAR)
    late = sorted(tracker.ended_at(tid) - ready[tid] for tid in ids)  # type: ignore[operator]
    return tracker.polls() / len(ids), statistics.mean(late), late[int(0.95 * len(late)) - 1]


class TestSimulation:
    """The politeness promise: ~2 polls per image, finished tasks noticed ~1 s late (renders 10 ± 2 s)."""

    @pytest.mark.parametrize("stagger", [0.0, 0.05], ids=["submitted-together", "submitted-50ms-apart"])
    def test_default_schedule_on_200_tasks_of_8_to_12_s(self, stagger: float) -> None:
        rng = random.Random(20_26)
        renders = [rng.uniform(8.0, 12.0) for _ in range(200)]
        polls, mean_late, p95_late = simulate(PollSchedule(), renders, [i * stagger for i in range(200)])
        print(f"polls/task={polls:.2f} mean_late={mean_late:.2f}s p95_late={p95_late:.2f}s")
        assert polls <= 2.2
        assert mean_late <= 1.5
        assert p95_late <= 3.0

    def test_starting_at_8_s_would_waste_a_poll_on_nearly_every_task(self) -> None:
        rng = random.Random(7)
        renders = [rng.uniform(8.0, 12.0) for _ in range(200)]
        polls, _, _ = simulate(PollSchedule(expected_render=8.0), renders, [0.0] * 200)
        assert polls > 2.4

    def test_a_stuck_task_costs_few_polls(self) -> None:
        polls, _, _ = simulate(PollSchedule(), [600.0], [0.0])
        assert polls <= 8 + 600 / 30  # 8 polls in the first ~90 s, then one per 30 s


# -- drivers over scripted fake clients -----------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


class FakeClient:
    """Answers ``get_task`` from a script: per id a ready time, or a list of exceptions to raise first."""

    def __init__(
        self, clock: FakeClock, ready: dict[str, float], failures: list[BaseException] | None = None
    ):
        self.clock = clock
        self.ready = ready
        self.failures = list(failures or [])
        self.calls: list[tuple[float, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def answer(self, task_id: str) -> Task:
        self.calls.append((self.clock.now, task_id))
        if self.failures:
            raise self.failures.pop(0)
        if task_id not in self.ready:
            raise not_found()
        done = self.clock.now >= self.ready[task_id]
        if done and task_id.startswith("bad"):
            return Task(id=task_id, status="failed", error_code=80006, error_message="policy")
        return Task(id=task_id, status="completed" if done else "processing", image_url="https://cdn/x.png")

    def get_task(self, task_id: str) -> Task:
        return self.answer(task_id)


class FakeAsyncClient(FakeClient):
    async def get_task(self, task_id: str) -> Task:  # type: ignore[override]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)
            return self.answer(task_id)
        finally:
            self.in_flight -= 1


async def run_driver(kind: str, client: FakeClient, ids: list[str], **kwargs: Any) -> PollOutcome:
    clock = client.clock
    if kind == "sync":
        return poll_tasks(client, ids, clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]
    return await apoll_tasks(client, ids, clock=clock, sleep=clock.asleep, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def make_client(kind: str, clock: FakeClock, ready: dict[str, float], **kwargs: Any) -> FakeClient:
    return (FakeClient if kind == "sync" else FakeAsyncClient)(clock, ready, **kwargs)


class TestDrivers:
    async def test_polls_on_the_grid_until_all_done(self, kind: str) -> None:
        clock = FakeClock()
        t0 = clock.now
        client = make_client(kind, clock, {"a": t0 + 9.0, "bad": t0 + 11.0, "c": t0 + 16.0})
        outcome = await run_driver(kind, client, ["a", "bad", "c"], deadline=t0 + 100, submitted_at={})
        assert outcome.status == "success"
        assert outcome.completed_ids == ["a", "c"] and outcome.failed == {"bad": 80006}
        assert [(round(t - t0, 3), tid) for t, tid in client.calls] == [
            (10.0, "a"), (10.0, "bad"), (10.0, "c"), (12.0, "bad"), (12.0, "c"), (15.0, "c"), (19.5, "c"),
        ]  # fmt: skip
        assert outcome.polls == 7
        assert "https" not in json.dumps(outcome.to_event())

    async def test_fire_when_done_and_timeout(self, kind: str) -> None:
        clock = FakeClock()
        t0 = clock.now
        client = make_client(kind, clock, {"a": t0 + 1.0, "b": t0 + 500.0})
        outcome = await run_driver(kind, client, ["a", "b"], deadline=t0 + 100, fire_when_done=1)
        assert outcome.status == "success" and outcome.processing_ids == ["b"] and clock.now == t0 + 10
        outcome = await run_driver(
            kind, client, ["a", "b"], deadline=t0 + 60, submitted_at={"a": t0, "b": t0}
        )
        assert outcome.status == "timeout" and outcome.processing_ids == ["b"]
        assert clock.now == t0 + 60  # woke at the deadline, polled b one last time

    async def test_transient_failures_are_absorbed_then_bounded(self, kind: str) -> None:
        clock = FakeClock()
        t0 = clock.now
        failures: list[BaseException] = [server_error(), rate_limited(5.0), ImagenTransportError("x")]
        client = make_client(kind, clock, {"a": t0}, failures=failures)
        outcome = await run_driver(
            kind, client, ["a"], deadline=t0 + 100, schedule=PollSchedule(expected_render=0)
        )
        assert outcome.status == "success" and len(client.calls) == 4
        assert [round(t - t0, 3) for t, _ in client.calls] == [0.0, 2.0, 7.0, 11.5]

        client = make_client(kind, clock, {"a": t0}, failures=[server_error()] * 5)
        schedule = PollSchedule(expected_render=0, max_consecutive_errors=3)
        outcome = await run_driver(kind, client, ["a"], deadline=clock.now + 1000, schedule=schedule)
        assert outcome.status == "error" and len(client.calls) == 3

    async def test_other_exceptions_propagate(self, kind: str) -> None:
        clock = FakeClock()
        failures: list[BaseException] = [AuthenticationError("revoked", status_code=401, code=10004)]
        client = make_client(kind, clock, {"a": 0.0}, failures=failures)
        with pytest.raises(AuthenticationError):
            await run_driver(kind, client, ["a"], deadline=clock.now + 100)

    async def test_unknown_id_is_not_found(self, kind: str) -> None:
        clock = FakeClock()
        client = make_client(kind, clock, {})
        outcome = await run_driver(kind, client, ["task_nope"], deadline=clock.now + 100)
        assert outcome.status == "success" and outcome.tasks["task_nope"] == TaskPollState("not_found", 40401)

    async def test_bad_arguments(self, kind: str) -> None:
        client = make_client(kind, FakeClock(), {})
        with pytest.raises(ValueError, match="not one string"):
            await run_driver(kind, client, "task_a", deadline=FAR)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="fire_when_done=0"):
            await run_driver(kind, client, ["a"], deadline=FAR, fire_when_done=0)
        with pytest.raises(ValueError, match="deadline"):
            await run_driver(kind, client, ["a"], deadline=None)  # type: ignore[arg-type]

    async def test_ids_falling_due_together_share_a_round(self, kind: str) -> None:
        clock = FakeClock()
        t0 = clock.now
        ids = [f"t{i}" for i in range(40)]  # submitted 10 ms apart, each ready at its first poll
        submitted = {tid: t0 + i * 0.01 for i, tid in enumerate(ids)}
        client = make_client(kind, clock, {tid: at + 10.0 for tid, at in submitted.items()})
        outcome = await run_driver(kind, client, ids, deadline=t0 + 100, submitted_at=submitted)
        assert outcome.status == "success" and outcome.polls == 40
        rounds = sorted({round(t - t0, 3) for t, _ in client.calls})
        assert rounds == [10.0, 10.25, 10.5]  # 3 wake-ups for 40 ids falling due over 0.39 s
        assert all(t >= submitted[tid] + 10.0 for t, tid in client.calls)  # never before the grid

    async def test_async_polls_are_concurrent_but_bounded(self) -> None:
        clock = FakeClock()
        ids = [f"t{i}" for i in range(50)]
        client = FakeAsyncClient(clock, dict.fromkeys(ids, 0.0))
        schedule = PollSchedule(expected_render=0, max_concurrent_polls=7)
        outcome = await run_driver("async", client, ids, deadline=clock.now + 10, schedule=schedule)
        assert outcome.status == "success" and len(client.calls) == 50
        assert client.max_in_flight == 7

    async def test_async_round_stops_sending_once_paused(self) -> None:
        clock = FakeClock()
        ids = [f"t{i}" for i in range(10)]
        client = FakeAsyncClient(clock, dict.fromkeys(ids, 0.0), failures=[rate_limited(3.0)])
        schedule = PollSchedule(expected_render=0, max_concurrent_polls=1)
        outcome = await run_driver("async", client, ids, deadline=clock.now + 10, schedule=schedule)
        assert outcome.status == "success" and len(client.calls) == 11  # 1 refused, then each once


class TestPolledUntil:
    def test_a_follow_up_poller_skips_instants_already_polled(self) -> None:
        """After a batch refill, ids still rendering are not all polled at once: they keep their grid."""
        schedule = PollSchedule()
        fresh = PollTracker(["a"], schedule, start=120.0, submitted_at={"a": 100.0})
        follow = PollTracker(["a"], schedule, start=120.0, submitted_at={"a": 100.0}, polled_until=120.0)
        assert fresh.due(120.0) == ["a"]  # a fresh start catches up at once
        assert follow.due(120.0) == []
        # grid: 110, 112, 115, 119.5, 126.25 → the next instant after 120 is 126.25
        assert follow.next_due("a") == pytest.approx(126.25)

    def test_ids_submitted_after_the_mark_are_unaffected(self) -> None:
        tracker = PollTracker(
            ["b"], PollSchedule(), start=120.0, submitted_at={"b": 119.0}, polled_until=120.0
        )
        assert tracker.next_due("b") == pytest.approx(129.0)

    async def test_a_poller_that_returns_early_hands_on_only_what_it_polled(self, kind: str) -> None:
        """A lingering batch returns from each poll at the first end, runs a pass, and polls again.

        The next poller may skip only the instants its predecessor really polled: its last round, not
        the time it returned or the next pass started. (Skipping up to the pass start lost ids for whole
        backoff steps: a task ready at 8.7 s was first polled at 26 s.)
        """
        clock = FakeClock()
        t0 = clock.now
        submitted = {"a": t0, "b": t0 + 0.5}
        client = make_client(kind, clock, {"a": t0 + 9, "b": t0 + 10.6})
        first = await run_driver(kind, client, ["a", "b"], deadline=t0 + 60, submitted_at=submitted,
                                 fire_when_done=1)  # fmt: skip
        assert first.completed_ids == ["a"]
        assert first.polled_until == pytest.approx(t0 + 10)  # the round that saw "a"; "b" is due at 10.5
        clock.sleep(1.0)  # the pass: mirror "a", refill its place
        second = await run_driver(kind, client, ["b"], deadline=t0 + 60, submitted_at=submitted,
                                  fire_when_done=1, polled_until=first.polled_until)  # fmt: skip
        assert second.completed_ids == ["b"]
        b_polls = [at - t0 for at, tid in client.calls if tid == "b"]
        assert b_polls == [pytest.approx(11.0)]  # its 10.5 instant is caught up at once, not skipped to 12.5
