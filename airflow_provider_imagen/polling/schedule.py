"""When to poll which id: the grid of each task and the tracker that follows many of them.

Pure decisions: no I/O and no clock of its own (the caller passes "now"), so every rule is tested with
a fake clock. See the package docstring for the schedule itself.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from airflow_provider_imagen.api.errors import (
    ImagenTransportError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.models import Task
from airflow_provider_imagen.polling.outcome import (
    ENDED_STATUSES,
    NOT_FOUND,
    PROCESSING,
    OutcomeStatus,
    PollOutcome,
    TaskPollState,
    safe_message,
)

if TYPE_CHECKING:
    pass

#: After any answer, the next poll of that id is at least this fraction of ``poll_interval`` away.
_MIN_GAP_FRACTION: Final = 0.5


def check_number(name: str, value: object) -> float:
    """Return ``value`` as a float, refusing booleans, text and non-finite numbers (kwargs come as JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    return float(value)


def check_integer(name: str, value: object) -> int:
    """Return ``value`` as an int (``3.0`` is 3), refusing booleans and fractions."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: must be an integer")
    return value


@dataclass(frozen=True)
class PollSchedule:
    """When to poll and how patient to be; JSON-safe scalars, so it rides trigger kwargs as they are.

    Validated on construction: a schedule that exists can be used.
    """

    #: Seconds after submit of a task's first poll; aim at the typical render time, not the shortest.
    expected_render: float = 10.0
    #: Seconds between the first "still processing" answer and the next poll.
    poll_interval: float = 2.0
    #: Growth of the interval after each further "still processing" (1 = constant cadence).
    backoff: float = 1.5
    #: Cap of one interval, in seconds; also the longest pause after a run of failures.
    max_poll_interval: float = 30.0
    #: Transient failures in a row (5xx, transport, 429) after which polling gives up with ``error``.
    max_consecutive_errors: int = 10
    #: Polls in flight at once: threads on a worker, connections in the trigger's aiohttp pool. Kept small:
    #: 8 still serve thousands of polls a second, and more bought no earlier notice for more CPU per poll
    #: (20 concurrent GETs cost ~1.7 ms each against the emulator, 8 ~0.9 ms; measured through httpx).
    max_concurrent_polls: int = 8
    #: Least seconds between the starts of two poll rounds: ids falling due meanwhile wait for the next
    #: round, so a poller wakes at most 4 times a second however many ids it watches. Waking for each id
    #: as it falls due costs ~40 % more CPU per poll (measured: 0.40 vs 0.25 ms against the emulator,
    #: docs/benchmarks.md, scenario 3) for at most 0.25 s earlier notice.
    round_gap: float = 0.25

    @classmethod
    def for_renders(cls, expected_render: float, poll_interval: float) -> PollSchedule:
        """Return a schedule whose rounds are at most a tenth of the render time apart (0.25 s at most).

        An id falling due waits half a round gap on average: 0.125 s is 1 % of a 10 s render but 12 % of
        a 1 s one, where a window refilled as its tasks are seen ended loses that share of its pace.
        Short renders get rounds as frequent as their length asks (0.05 s at least).
        """
        gap = min(cls.round_gap, max(0.05, expected_render / 10))
        return cls(expected_render=expected_render, poll_interval=poll_interval, round_gap=gap)

    def __post_init__(self) -> None:
        for name in ("expected_render", "poll_interval", "backoff", "max_poll_interval", "round_gap"):
            object.__setattr__(self, name, check_number(name, getattr(self, name)))
        for name in ("max_consecutive_errors", "max_concurrent_polls"):
            object.__setattr__(self, name, check_integer(name, getattr(self, name)))
        if self.expected_render < 0:
            raise ValueError(f"expected_render={self.expected_render}: must be >= 0 seconds")
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval={self.poll_interval}: must be > 0 seconds")
        if self.backoff < 1:
            raise ValueError(f"backoff={self.backoff}: must be >= 1 (1 keeps the interval constant)")
        if self.max_poll_interval < self.poll_interval:
            raise ValueError(
                f"max_poll_interval={self.max_poll_interval}: must be >= poll_interval={self.poll_interval}"
            )
        if self.max_consecutive_errors < 1:
            raise ValueError(f"max_consecutive_errors={self.max_consecutive_errors}: must be >= 1")
        if self.max_concurrent_polls < 1:
            raise ValueError(f"max_concurrent_polls={self.max_concurrent_polls}: must be >= 1")
        if self.round_gap < 0:
            raise ValueError(f"round_gap={self.round_gap}: must be >= 0 seconds")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Return the names of the schedule's fields, which are also its kwargs."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_kwargs(self) -> dict[str, float | int]:
        """Return the fields as a flat dict of scalars (trigger kwargs, JSON)."""
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> PollSchedule:
        """Build a schedule from :meth:`to_kwargs` output; missing fields take their defaults.

        Unknown names are rejected so that a typo in a DAG does not silently fall back to a default.
        """
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown poll schedule field(s): {', '.join(unknown)}")
        return cls(**{name: value for name, value in kwargs.items() if value is not None})

    def error_pause(self, consecutive_errors: int) -> float:
        """Return how long to pause all polls after ``consecutive_errors`` failures in a row (>= 1)."""
        exponent = min(max(consecutive_errors - 1, 0), 64)
        return min(self.poll_interval * self.backoff**exponent, self.max_poll_interval)


@dataclass
class _Track:
    """The tracker's mutable view of one id."""

    submitted_at: float
    #: Next instant of this id's grid (a pure function of submit time and schedule).
    grid: float
    #: Gap from ``grid`` to the grid instant after it.
    gap: float
    #: When to poll next: ``grid``, or earlier to catch up when the tracker starts late.
    due: float
    status: str = PROCESSING
    error_code: int | None = None
    polls: int = 0
    last_attempt: float | None = None
    #: When this tracker first saw the id terminal.
    ended_at: float | None = None


class PollTracker:
    """The poll state of many task ids, advanced by what the caller reports; no I/O, no clock.

    :param task_ids: the ids to watch (duplicates are watched once).
    :param schedule: poll timing and patience.
    :param start: the caller's "now" when it starts (epoch seconds).
    :param submitted_at: per-id submit time (epoch seconds); ids without one count as submitted at
        ``start``.
    :param polled_until: the ids were polled on their grids by an earlier poller up to this instant
        (epoch seconds): a batch's next trigger after a refill. ``None`` (a fresh start, a retry) polls
        every overdue id once right away.
    :param lead: count, toward the fire condition, ids whose first poll falls due within this many
        seconds and that no poller has polled yet (see :meth:`result`). ``None``: only ended ids count.
        A caller waiting for every id (nothing left to send) fires once every unfinished id's next
        poll is within the lead, while each is still at its first or second poll and some id has been
        seen ended (the renders keep to the schedule): it comes back to make those polls itself,
        instead of a resume after the last of them. Renders slower than the schedule (nothing ended
        yet, or an id past its second poll) turn this off: the caller comes back when everything has
        ended, not once per backoff step.
    """

    def __init__(
        self,
        task_ids: Iterable[str],
        schedule: PollSchedule,
        *,
        start: float,
        submitted_at: Mapping[str, float | None] | None = None,
        polled_until: float | None = None,
        lead: float | None = None,
    ) -> None:
        self.schedule = schedule
        self.start = start
        self.lead = lead
        self._tracks: dict[str, _Track] = {}
        known = submitted_at or {}
        for tid in task_ids:
            if not isinstance(tid, str) or not tid.strip():
                raise ValueError(f"task id {tid!r}: must be a non-empty string")
            if tid in self._tracks:
                continue
            submitted = known.get(tid)
            submitted = start if submitted is None else check_number(f"submitted_at[{tid}]", submitted)
            first = submitted + schedule.expected_render
            track = _Track(submitted_at=submitted, grid=first, gap=schedule.poll_interval, due=first)
            if polled_until is not None:
                # An earlier poller followed this grid up to ``polled_until``: skip the instants it
                # already polled instead of catching up on them (each would be one more GET per id).
                while track.grid <= polled_until:
                    track.grid += track.gap
                    track.gap = min(track.gap * schedule.backoff, schedule.max_poll_interval)
            track.due = max(track.grid, start)
            self._tracks[tid] = track
        # (due, id) of every unfinished id, plus stale pairs dropped when they surface: each round of a
        # trigger watching thousands of ids must not scan them all (measured: 3 CPU-s for 2,000 ids).
        self._queue = [(track.due, tid) for tid, track in self._tracks.items()]
        heapq.heapify(self._queue)
        #: (first poll, id) of the ids no poller has polled yet, for the fire-ahead count (sorted); only
        #: a tracker with a ``lead`` counts them.
        self._firsts = (
            []
            if lead is None
            else sorted(
                (track.grid, tid)
                for tid, track in self._tracks.items()
                if track.grid == track.submitted_at + schedule.expected_render
                and (polled_until is None or track.grid > polled_until)
            )
        )
        self._ended = 0
        #: No poll at all before this instant (Retry-After or error backoff).
        self.paused_until = -math.inf
        #: Transient failure episodes in a row.
        self.consecutive_errors = 0
        #: Why the last transient failure happened (URL-free).
        self.last_error: str | None = None
        #: The last instant at which a round polled every id then due (see :meth:`round_done`).
        self.polled_until: float | None = None
        #: No round starts before this instant (``schedule.round_gap`` after the last one).
        self._next_round = -math.inf

    # -- what the caller asks ------------------------------------------------------------------

    @property
    def task_ids(self) -> list[str]:
        """Return the watched ids, in the order given."""
        return list(self._tracks)

    def is_paused(self, now: float) -> bool:
        """Return whether polls must wait (a 429's Retry-After, or backoff after failures)."""
        return now < self.paused_until

    def due(self, now: float, deadline: float | None = None) -> list[str]:
        """Return the ids to poll now, most overdue first; at the deadline, every unfinished id once.

        Nothing until ``schedule.round_gap`` after the last round: the ids then due go together.
        """
        if self.is_paused(now) or now < self._next_round:
            return []
        if deadline is not None and now >= deadline:  # the last sweep: once per poller, a full scan
            swept = [
                (track.due, tid)
                for tid, track in self._tracks.items()
                if track.status not in ENDED_STATUSES
                and (track.due <= now or self._needs_sweep(track, deadline))
            ]
            return [tid for _, tid in sorted(swept)]
        due: list[tuple[float, str]] = []
        while self._queue and self._queue[0][0] <= now:
            item = heapq.heappop(self._queue)
            if self._current(item):
                due.append(item)
        for item in due:  # still due until answered: an answer queues the id's next instant
            heapq.heappush(self._queue, item)
        return [tid for _, tid in due]

    def round_done(self, now: float) -> None:
        """Note that the ids :meth:`due` returned at ``now`` were all polled, unless a pause cut the round.

        A later poller skips the grid instants up to here; an instant after the round's ``now`` was
        not polled, however late the poller returned.
        """
        if not self.is_paused(now):
            self.polled_until = now
        self._next_round = now + self.schedule.round_gap

    def next_wake(
        self, now: float, deadline: float | None = None, fire_when_done: int | None = None
    ) -> float:
        """Return when something can next happen: a poll falls due, a pause ends, or the deadline.

        With a ``lead``, also when one more id comes within it of its first poll (see :meth:`_coming`),
        or, waiting for every id (``fire_when_done`` ``None`` or all of them), when the last next poll
        comes within it.
        """
        while self._queue and not self._current(self._queue[0]):
            heapq.heappop(self._queue)
        if not self._queue:
            return max(now, self._next_round)
        wake = max(self._queue[0][0], self.paused_until, self._next_round)
        if self.lead is not None:
            if self._waits_for_all(fire_when_done):
                wake = min(wake, max(self._final_fire_at(), now))
            else:
                upcoming = bisect.bisect_right(self._firsts, (now + self.lead, "\uffff"))
                if upcoming < len(self._firsts):
                    wake = min(wake, max(self._firsts[upcoming][0] - self.lead, now))
        return wake if deadline is None else max(min(wake, deadline), self._next_round)

    def _waits_for_all(self, fire_when_done: int | None) -> bool:
        return fire_when_done is None or fire_when_done >= len(self._tracks)

    def _final_fire_at(self) -> float:
        """Return when a wait for every id fires ahead (see ``lead``); infinity once an id is late.

        O(ids), asked once per round, and only by a final wait.
        """
        assert self.lead is not None
        if not self._ended:
            return math.inf  # no render has kept to the schedule yet: nothing says the rest will
        on_time = self.schedule.expected_render + self.schedule.poll_interval
        last = -math.inf
        for track in self._tracks.values():
            if track.status in ENDED_STATUSES:
                continue
            if track.due > track.submitted_at + on_time:
                return math.inf
            last = max(last, track.due)
        return last - self.lead

    def _coming(self, now: float) -> int:
        """Return how many ids no poller has polled yet are due for their first poll by ``now + lead``.

        A caller that needs ``lead`` seconds before it can act (a worker's resume) fires then, and finds
        them due when it arrives.
        """
        assert self.lead is not None
        upto = bisect.bisect_right(self._firsts, (now + self.lead, "\uffff"))
        return sum(1 for _, tid in self._firsts[:upto] if self._tracks[tid].polls == 0)

    def _ahead(self, now: float, need: int) -> bool:
        """Return whether the ids still needed are due within the lead (see ``lead``)."""
        assert self.lead is not None
        if self._waits_for_all(need):
            return now >= self._final_fire_at()
        return self._ended + self._coming(now) >= need

    def polls(self, task_id: str | None = None) -> int:
        """Return the polls made for ``task_id``, or for all ids."""
        if task_id is not None:
            return self._tracks[task_id].polls
        return sum(track.polls for track in self._tracks.values())

    def next_due(self, task_id: str) -> float | None:
        """Return when ``task_id`` is next due, or ``None`` once it has ended."""
        track = self._tracks[task_id]
        return None if track.status in ENDED_STATUSES else track.due

    def ended_at(self, task_id: str) -> float | None:
        """Return when the tracker first saw ``task_id`` terminal."""
        return self._tracks[task_id].ended_at

    def state(self, task_id: str) -> TaskPollState:
        """Return what is known of ``task_id`` (unknown statuses read as ``processing``)."""
        track = self._tracks[task_id]
        status = track.status if track.status in ENDED_STATUSES else PROCESSING
        return TaskPollState(status, track.error_code)

    def result(self, now: float, deadline: float, fire_when_done: int | None = None) -> PollOutcome | None:
        """Return the outcome if polling should stop now, else ``None``.

        Success wins over everything (the caller has work to do); then too many failures; then the
        deadline, once every unfinished id has had its last poll at or after it (or polls are paused).
        """
        need = len(self._tracks) if fire_when_done is None else min(fire_when_done, len(self._tracks))
        ended = self._ended
        if ended >= need or (self.lead is not None and self._ahead(now, need)):
            return self._outcome("success", None)
        if self.consecutive_errors >= self.schedule.max_consecutive_errors:
            return self._outcome(
                "error",
                f"{self.consecutive_errors} consecutive poll failures "
                f"(limit {self.schedule.max_consecutive_errors}); last: {self.last_error}",
            )
        if now >= deadline:
            unswept = [t for t in self._tracks.values() if self._needs_sweep(t, deadline)]
            if not unswept or self.is_paused(now):
                left = len(self._tracks) - ended
                return self._outcome(
                    "timeout", f"deadline (epoch {deadline:.0f}) passed with {left} task(s) still processing"
                )
        return None

    # -- what the caller reports ---------------------------------------------------------------

    def record(self, task_id: str, answer: Task | BaseException, now: float) -> None:
        """Record one ``get_task`` answer or failure; re-raise a failure the poller must not absorb."""
        if isinstance(answer, Task):
            self.record_status(task_id, answer.status, answer.error_code, now)
        elif isinstance(answer, TaskNotFoundError):
            self.record_not_found(task_id, now, answer.code)
        elif isinstance(answer, RateLimitedError):
            self.record_error(answer, now, retry_after=answer.retry_after, task_id=task_id)
        elif isinstance(answer, (ServerError, ImagenTransportError)):
            self.record_error(answer, now, task_id=task_id)
        else:
            raise answer

    def record_status(self, task_id: str, status: str, error_code: int | None, now: float) -> None:
        """Record an answer: terminal statuses end the id; any other status schedules its next poll."""
        track = self._answered(task_id, now)
        if track.status in ENDED_STATUSES:
            return
        if status in ENDED_STATUSES:
            track.status, track.error_code, track.ended_at = status, error_code, now
            self._ended += 1
            return
        track.status = status
        self._advance(task_id, track, now)

    def record_not_found(self, task_id: str, now: float, error_code: int | None = None) -> None:
        """Record a 404 for ``task_id``: it ends as ``not_found`` (an answer, so failures reset)."""
        self.record_status(task_id, NOT_FOUND, error_code, now)

    def record_error(
        self,
        error: BaseException | str,
        now: float,
        retry_after: float | None = None,
        *,
        task_id: str | None = None,
    ) -> None:
        """Record a transient failure: pause every poll, and count it unless polls were already paused.

        ``retry_after`` (a 429's header) sets the pause; otherwise it grows with the run of failures.
        The failed id, if named, stays due and is polled first when the pause ends.
        """
        if task_id is not None:
            track = self._tracks[task_id]
            track.polls += 1
            track.last_attempt = now
        self.last_error = safe_message(error)
        if self.is_paused(now):
            # Part of the episode that already paused us (e.g. a round of concurrent polls): count once.
            pause = retry_after if retry_after is not None else 0.0
        else:
            self.consecutive_errors += 1
            pause = (
                retry_after if retry_after is not None else self.schedule.error_pause(self.consecutive_errors)
            )
        self.paused_until = max(self.paused_until, now + max(pause, 0.0))

    # -- internals -----------------------------------------------------------------------------

    def _answered(self, task_id: str, now: float) -> _Track:
        track = self._tracks.get(task_id)
        if track is None:
            raise KeyError(f"task id {task_id!r} is not tracked")
        track.polls += 1
        track.last_attempt = now
        self.consecutive_errors = 0
        return track

    def _advance(self, task_id: str, track: _Track, now: float) -> None:
        """Move ``track`` to its first grid instant far enough after ``now``."""
        schedule = self.schedule
        earliest = now + schedule.poll_interval * _MIN_GAP_FRACTION
        while track.grid < earliest:
            track.grid += track.gap
            track.gap = min(track.gap * schedule.backoff, schedule.max_poll_interval)
        track.due = track.grid
        heapq.heappush(self._queue, (track.due, task_id))

    def _current(self, item: tuple[float, str]) -> bool:
        """Return whether a queued (due, id) pair is still the id's next poll."""
        track = self._tracks[item[1]]
        return track.status not in ENDED_STATUSES and track.due == item[0]

    @staticmethod
    def _needs_sweep(track: _Track, deadline: float) -> bool:
        return track.status not in ENDED_STATUSES and (
            track.last_attempt is None or track.last_attempt < deadline
        )

    def _outcome(self, status: OutcomeStatus, message: str | None) -> PollOutcome:
        tasks = {tid: self.state(tid) for tid in self._tracks}
        return PollOutcome(
            status=status, tasks=tasks, message=message, polls=self.polls(), polled_until=self.polled_until
        )


def next_visible_end(
    submitted_at: Mapping[str, float | None], schedule: PollSchedule, *, now: float
) -> float:
    """Return the first instant at which a poll on the schedule could see one of these tasks end.

    Overdue tasks back off along their grids, so a slow API makes the next look far away; a task whose
    first poll is past and not yet made counts as due now.
    """
    tracker = PollTracker(submitted_at, schedule, start=now, submitted_at=submitted_at, polled_until=now)
    return tracker.next_wake(now)
