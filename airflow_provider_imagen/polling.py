"""Decide when to poll which Imagen task, and when to stop: pure decisions, two thin drivers.

Polls (``GET /tasks/{id}``) are free, but we promise to be polite: about two polls per image inside the
poller, while noticing a finished task little more than a second late on average. Renders take 10 s ± 2 s
(benchmarks), so polling every second wastes ~10 polls per image and a fixed 2 s cadence still ~5.

The schedule
------------
Each task gets a *grid* of poll instants that depends only on its submit time ``s``::

    g0 = s + expected_render
    g1 = g0 + poll_interval
    gk = g(k-1) + min(poll_interval * backoff ** (k - 1), max_poll_interval)

With the defaults (10 s, 2 s, x1.5, cap 30 s) that is s + 10, 12, 15, 19.5, 26.25, 36.4, … then every
30 s. The first poll lands on the *middle* of the render-time distribution, not its start: about half
the tasks are done at the first poll, nearly all the rest at the second, and the rare slow task falls
into a backoff that keeps a stuck task from costing more than two polls a minute. Simulated with renders
uniform in [8, 12] s (``tests/test_polling.py``): 1.5 polls per task, 1.0 s mean lateness, 1.9 s p95.
(Starting at 8 s instead costs one useless poll on nearly every task: 2.5 polls per task.)

Because the grid is a function of the submit time, a restarted trigger, a second triggerer running the
same trigger, or the next trigger after a batch refill all poll at the same instants: no backoff is ever
reset. A tracker only knows what it saw, so an id whose first instant is already past when the tracker
starts is polled once right away (it may have finished while nobody watched), then rejoins its grid.
After any answer the next poll is at least ``poll_interval / 2`` away, so a late poll is never followed
by a near-duplicate.

Stopping
--------
- ``success``: at least ``fire_when_done`` ids (all by default) are terminal: ``completed``, ``failed``
  or ``not_found`` (a 404: the id is unknown to this key and will not come back). Any other status,
  documented or not, means "keep polling".
- ``timeout``: the absolute wall-clock ``deadline`` (epoch seconds, so a restart keeps it) passed first.
  At the deadline every unfinished id is polled one last time, so the outcome reports what is true then.
- ``error``: ``max_consecutive_errors`` transient failures in a row (5xx, transport, 429; each already
  retried by the client's own policy). A 429's ``Retry-After`` pauses *every* poll until then; other
  failures pause all polls with the same backoff as the grid. Failures that arrive while polls are
  already paused belong to the same episode and count once; any answer resets the count.

Everything that decides is in :class:`PollTracker` (no I/O, no clock of its own, tested with a fake
clock). :func:`apoll_tasks` (triggers) and :func:`poll_tasks` (workers) only drive it. Nothing here ever
holds an image URL: outcomes and events carry statuses and error codes only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from airflow_provider_imagen.api.errors import (
    ImagenTransportError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.models import TERMINAL_STATUSES, Task

if TYPE_CHECKING:
    from airflow_provider_imagen.api.client import AsyncImagenClient, ImagenClient

OutcomeStatus = Literal["success", "timeout", "error"]
#: How a poll ends: the fire condition, the deadline, or too many consecutive failures.
OUTCOME_STATUSES: Final[frozenset[str]] = frozenset({"success", "timeout", "error"})
#: Status of an id whose task the API does not know (HTTP 404). Terminal: it is not coming back.
NOT_FOUND: Final = "not_found"
#: Status reported for every id that has not ended (whatever the API last said about it).
PROCESSING: Final = "processing"
#: Per-id statuses an outcome may carry.
TASK_STATUSES: Final[frozenset[str]] = frozenset({"completed", "failed", NOT_FOUND, PROCESSING})
#: Statuses after which an id is never polled again.
ENDED_STATUSES: Final[frozenset[str]] = TERMINAL_STATUSES | {NOT_FOUND}
#: Failures of ``get_task`` that the poller absorbs; anything else (a 401, a bug) propagates.
POLL_ERRORS: Final[tuple[type[Exception], ...]] = (
    ImagenTransportError,
    ServerError,
    RateLimitedError,
    TaskNotFoundError,
)
#: After any answer, the next poll of that id is at least this fraction of ``poll_interval`` away.
_MIN_GAP_FRACTION: Final = 0.5
_URL_RE: Final = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_MESSAGE_LIMIT: Final = 300


def safe_message(error: BaseException | str, *, secrets: Iterable[str] = ()) -> str:
    """Return a short one-line description of ``error`` with URLs and the given secrets cut out.

    Outcome messages travel in trigger events, which the triggerer logs: a signed URL or a key must never
    reach them, even from an exception text we did not write.
    """
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = _URL_RE.sub("<url>", " ".join(text.split()))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    return float(value)


def _integer(name: str, value: object) -> int:
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

    def __post_init__(self) -> None:
        for name in ("expected_render", "poll_interval", "backoff", "max_poll_interval", "round_gap"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        for name in ("max_consecutive_errors", "max_concurrent_polls"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
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


@dataclass(frozen=True)
class TaskPollState:
    """What the poller last knew about one task id: never more than a status and an error code."""

    #: ``completed``, ``failed``, ``not_found`` or ``processing`` (which covers unknown statuses).
    status: str
    #: The API's code for a failed task (80006 = moderated) or a 404; ``None`` otherwise.
    error_code: int | None = None

    @property
    def is_terminal(self) -> bool:
        """Return whether the id will never change again."""
        return self.status in ENDED_STATUSES


@dataclass(frozen=True)
class PollOutcome:
    """How a poll ended and where every id stood; small and JSON-safe through :meth:`to_event`."""

    #: ``success`` (fire condition met), ``timeout`` (deadline first) or ``error`` (failures in a row).
    status: OutcomeStatus
    #: Every polled id, in the order it was given.
    tasks: dict[str, TaskPollState] = field(default_factory=dict)
    #: Why it is a timeout or an error; free of URLs and keys.
    message: str | None = None
    #: GET requests the poller made (each may include the client's own retries).
    polls: int = 0
    #: Every id was polled on its grid up to this instant (the poller's last full round), so the next
    #: poller may skip the instants before it. Not part of events: a resumed worker sweeps instead.
    polled_until: float | None = None

    @property
    def completed_ids(self) -> list[str]:
        """Return the ids whose image is ready to fetch."""
        return [tid for tid, state in self.tasks.items() if state.status == "completed"]

    @property
    def failed(self) -> dict[str, int | None]:
        """Return ``{id: error code}`` of the tasks that ended ``failed`` (refunded by the API)."""
        return {tid: state.error_code for tid, state in self.tasks.items() if state.status == "failed"}

    @property
    def not_found_ids(self) -> list[str]:
        """Return the ids the API does not know (404)."""
        return [tid for tid, state in self.tasks.items() if state.status == NOT_FOUND]

    @property
    def processing_ids(self) -> list[str]:
        """Return the ids that had not ended when polling stopped."""
        return [tid for tid, state in self.tasks.items() if state.status == PROCESSING]

    @property
    def terminal_ids(self) -> list[str]:
        """Return the ids that ended, in any way."""
        return [tid for tid, state in self.tasks.items() if state.is_terminal]

    def counts(self) -> dict[str, int]:
        """Return how many ids are in each status (for log lines)."""
        tally = dict.fromkeys(("completed", "failed", NOT_FOUND, PROCESSING), 0)
        for state in self.tasks.values():
            tally[state.status] += 1
        return tally

    def to_event(self) -> dict[str, Any]:
        """Return the outcome as a trigger event payload: JSON scalars only, no URLs."""
        return {
            "status": self.status,
            "message": self.message,
            "polls": self.polls,
            "tasks": {
                tid: {"status": state.status, "error_code": state.error_code}
                for tid, state in self.tasks.items()
            },
        }

    @classmethod
    def from_event(cls, event: object) -> PollOutcome:
        """Validate an event coming back to a worker and rebuild the outcome.

        Raise :class:`ValueError` naming what is wrong: an event is data from another process (and maybe
        another version), and a mistaken "success" would skip paid images.
        """
        if not isinstance(event, Mapping):
            raise ValueError(f"Imagen poll event must be a dict, got {type(event).__name__}")
        status = event.get("status")
        if status is None:
            raise ValueError("Imagen poll event has no 'status'")
        if status not in OUTCOME_STATUSES:
            raise ValueError(
                f"Imagen poll event has unknown status {status!r}; expected one of "
                f"{', '.join(sorted(OUTCOME_STATUSES))}"
            )
        raw_tasks = event.get("tasks")
        if not isinstance(raw_tasks, Mapping):
            raise ValueError(f"Imagen poll event 'tasks' must be a dict, got {type(raw_tasks).__name__}")
        tasks: dict[str, TaskPollState] = {}
        for tid, raw in raw_tasks.items():
            if not isinstance(tid, str) or not tid:
                raise ValueError(f"Imagen poll event has a task id that is not a non-empty string: {tid!r}")
            if not isinstance(raw, Mapping):
                raise ValueError(f"Imagen poll event task {tid}: must be a dict, got {type(raw).__name__}")
            task_status = raw.get("status")
            if task_status not in TASK_STATUSES:
                raise ValueError(
                    f"Imagen poll event task {tid}: unknown status {task_status!r}; expected one of "
                    f"{', '.join(sorted(TASK_STATUSES))}"
                )
            code = raw.get("error_code")
            if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
                raise ValueError(f"Imagen poll event task {tid}: error_code {code!r} is not an integer")
            tasks[tid] = TaskPollState(task_status, code)
        message = event.get("message")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"Imagen poll event 'message' must be a string, got {type(message).__name__}")
        polls = event.get("polls", 0)
        if isinstance(polls, bool) or not isinstance(polls, int) or polls < 0:
            raise ValueError(f"Imagen poll event 'polls' must be a non-negative integer, got {polls!r}")
        return cls(status=status, tasks=tasks, message=message, polls=polls)


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
    """

    def __init__(
        self,
        task_ids: Iterable[str],
        schedule: PollSchedule,
        *,
        start: float,
        submitted_at: Mapping[str, float | None] | None = None,
        polled_until: float | None = None,
    ) -> None:
        self.schedule = schedule
        self.start = start
        self._tracks: dict[str, _Track] = {}
        known = submitted_at or {}
        for tid in task_ids:
            if not isinstance(tid, str) or not tid.strip():
                raise ValueError(f"task id {tid!r}: must be a non-empty string")
            if tid in self._tracks:
                continue
            submitted = known.get(tid)
            submitted = start if submitted is None else _number(f"submitted_at[{tid}]", submitted)
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

    def next_wake(self, now: float, deadline: float | None = None) -> float:
        """Return when something can next happen: a poll falls due, a pause ends, or the deadline."""
        while self._queue and not self._current(self._queue[0]):
            heapq.heappop(self._queue)
        if not self._queue:
            return max(now, self._next_round)
        wake = max(self._queue[0][0], self.paused_until, self._next_round)
        return wake if deadline is None else max(min(wake, deadline), self._next_round)

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
        if ended >= need:
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


def _tracker(
    task_ids: Iterable[str],
    deadline: float,
    schedule: PollSchedule | None,
    submitted_at: Mapping[str, float | None] | None,
    fire_when_done: int | None,
    start: float,
    polled_until: float | None = None,
) -> PollTracker:
    """Validate a driver's arguments and build its tracker (shared by both drivers)."""
    if isinstance(task_ids, str):
        raise ValueError("task_ids must be a list of task ids, not one string")
    _number("deadline", deadline)
    if fire_when_done is not None and _integer("fire_when_done", fire_when_done) < 1:
        raise ValueError(f"fire_when_done={fire_when_done}: must be >= 1 (or None for all)")
    return PollTracker(
        task_ids,
        schedule or PollSchedule(),
        start=start,
        submitted_at=submitted_at,
        polled_until=polled_until,
    )


async def apoll_tasks(
    client: AsyncImagenClient,
    task_ids: Iterable[str],
    *,
    deadline: float,
    schedule: PollSchedule | None = None,
    submitted_at: Mapping[str, float | None] | None = None,
    fire_when_done: int | None = None,
    polled_until: float | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> PollOutcome:
    """Poll ``task_ids`` until the fire condition, the deadline or too many failures; return the outcome.

    Due ids are polled concurrently, at most ``schedule.max_concurrent_polls`` at a time. Failures listed
    in :data:`POLL_ERRORS` go to the tracker; any other exception propagates once the round is over.

    :param deadline: absolute wall-clock time (epoch seconds, like ``time.time()``).
    :param submitted_at: per-id submit time (epoch seconds); missing ids count as submitted now.
    :param fire_when_done: stop with ``success`` once this many ids ended (``None``: all of them).
    :param polled_until: skip grid instants up to this time (see :class:`PollTracker`).
    """
    tracker = _tracker(task_ids, deadline, schedule, submitted_at, fire_when_done, clock(), polled_until)
    gate = asyncio.Semaphore(tracker.schedule.max_concurrent_polls)

    async def poll_one(task_id: str) -> None:
        async with gate:
            if tracker.is_paused(clock()):
                return  # an earlier poll of this round failed: wait for the pause like everyone else
            try:
                answer: Task | BaseException = await client.get_task(task_id)
            except POLL_ERRORS as exc:
                answer = exc
            tracker.record(task_id, answer, clock())

    while True:
        now = clock()
        outcome = tracker.result(now, deadline, fire_when_done)
        if outcome is not None:
            return outcome
        due = tracker.due(now, deadline)
        if due:
            answers = await asyncio.gather(*(poll_one(tid) for tid in due), return_exceptions=True)
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
            tracker.round_done(now)
            continue
        await sleep(max(tracker.next_wake(now, deadline) - now, 0.0))


def poll_tasks(
    client: ImagenClient,
    task_ids: Iterable[str],
    *,
    deadline: float,
    schedule: PollSchedule | None = None,
    submitted_at: Mapping[str, float | None] | None = None,
    fire_when_done: int | None = None,
    polled_until: float | None = None,
    seen: dict[str, Task] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Any] = time.sleep,
) -> PollOutcome:
    """Poll like :func:`apoll_tasks`, blocking, on the worker (non-deferrable tasks, a lingering batch).

    Due ids are polled from a few threads (at most ``schedule.max_concurrent_polls``): a batch that
    refills on the worker polls, downloads and submits ~10 times a second, and one GET at a time would
    make the notice of every end wait for the others.

    :param deadline: absolute wall-clock time (epoch seconds, like ``time.time()``).
    :param submitted_at: per-id submit time (epoch seconds); missing ids count as submitted now.
    :param fire_when_done: stop with ``success`` once this many ids ended (``None``: all of them).
    :param polled_until: skip grid instants up to this time (see :class:`PollTracker`).
    :param seen: filled with the last answer of every id that ended. On a worker the answer may stay in
        memory, image URL and all, so the download needs no second GET; it never goes to an event.
    """
    tracker = _tracker(task_ids, deadline, schedule, submitted_at, fire_when_done, clock(), polled_until)
    lock = threading.Lock()

    def poll_one(task_id: str) -> None:
        if tracker.is_paused(clock()):
            return  # an earlier poll of this round failed: wait for the pause like everyone else
        try:
            answer: Task | BaseException = client.get_task(task_id)
        except POLL_ERRORS as exc:
            answer = exc
        with lock:
            tracker.record(task_id, answer, clock())
            if seen is not None and isinstance(answer, Task) and answer.is_terminal:
                seen[task_id] = answer

    with ThreadPoolExecutor(max_workers=tracker.schedule.max_concurrent_polls) as pool:
        while True:
            now = clock()
            outcome = tracker.result(now, deadline, fire_when_done)
            if outcome is not None:
                return outcome
            due = tracker.due(now, deadline)
            if due:
                list(pool.map(poll_one, due))  # re-raises what POLL_ERRORS does not cover
                tracker.round_done(now)
                continue
            sleep(max(tracker.next_wake(now, deadline) - now, 0.0))
