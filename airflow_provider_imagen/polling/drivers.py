"""The two thin drivers of a poll tracker: async for the triggerer, threaded for a worker.

They only send the GETs the :class:`~airflow_provider_imagen.polling.schedule.PollTracker` asks for and
report the answers to it; every decision is the tracker's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from airflow_provider_imagen.api.errors import (
    ImagenTransportError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.models import Task
from airflow_provider_imagen.polling.outcome import (
    PollOutcome,
)
from airflow_provider_imagen.polling.schedule import PollSchedule, PollTracker, check_integer, check_number

if TYPE_CHECKING:
    from airflow_provider_imagen.api.client import AsyncImagenClient, ImagenClient

#: Failures of ``get_task`` that the poller absorbs; anything else (a 401, a bug) propagates.
POLL_ERRORS: Final[tuple[type[Exception], ...]] = (
    ImagenTransportError,
    ServerError,
    RateLimitedError,
    TaskNotFoundError,
)


def _tracker(
    task_ids: Iterable[str],
    deadline: float,
    schedule: PollSchedule | None,
    submitted_at: Mapping[str, float | None] | None,
    fire_when_done: int | None,
    start: float,
    polled_until: float | None = None,
    lead: float | None = None,
) -> PollTracker:
    """Validate a driver's arguments and build its tracker (shared by both drivers)."""
    if isinstance(task_ids, str):
        raise ValueError("task_ids must be a list of task ids, not one string")
    check_number("deadline", deadline)
    if fire_when_done is not None and check_integer("fire_when_done", fire_when_done) < 1:
        raise ValueError(f"fire_when_done={fire_when_done}: must be >= 1 (or None for all)")
    return PollTracker(
        task_ids,
        schedule or PollSchedule(),
        start=start,
        submitted_at=submitted_at,
        polled_until=polled_until,
        lead=lead,
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
    fire_ahead: float | None = None,
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
    :param fire_ahead: also count ids whose first poll falls due within this many seconds (the
        tracker's ``lead``): the caller polls them itself when it arrives.
    """
    tracker = _tracker(
        task_ids, deadline, schedule, submitted_at, fire_when_done, clock(), polled_until, fire_ahead
    )
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
        await sleep(max(tracker.next_wake(now, deadline, fire_when_done) - now, 0.0))


def poll_tasks(
    client: ImagenClient,
    task_ids: Iterable[str],
    *,
    deadline: float,
    schedule: PollSchedule | None = None,
    submitted_at: Mapping[str, float | None] | None = None,
    fire_when_done: int | None = None,
    polled_until: float | None = None,
    answers: dict[str, Task] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Any] = time.sleep,
    executor: Executor | None = None,
) -> PollOutcome:
    """Poll like :func:`apoll_tasks`, blocking, on the worker (non-deferrable tasks, a lingering batch).

    Due ids are polled from a few threads (at most ``schedule.max_concurrent_polls``): a batch that
    refills on the worker polls, downloads and submits ~10 times a second, and one GET at a time would
    make the notice of every end wait for the others.

    :param deadline: absolute wall-clock time (epoch seconds, like ``time.time()``).
    :param submitted_at: per-id submit time (epoch seconds); missing ids count as submitted now.
    :param fire_when_done: stop with ``success`` once this many ids ended (``None``: all of them).
    :param polled_until: skip grid instants up to this time (see :class:`PollTracker`).
    :param answers: filled with the last answer of every id that ended. On a worker the answer may stay in
        memory, image URL and all, so the download needs no second GET; it never goes to an event.
    :param executor: the threads to poll from, kept by a caller that polls round after round
        (default: a pool of ``schedule.max_concurrent_polls`` threads for this call).
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
            if answers is not None and isinstance(answer, Task) and answer.is_terminal:
                answers[task_id] = answer

    if executor is None:
        with ThreadPoolExecutor(max_workers=tracker.schedule.max_concurrent_polls) as pool:
            return _poll_rounds(tracker, poll_one, pool, deadline, fire_when_done, clock, sleep)
    return _poll_rounds(tracker, poll_one, executor, deadline, fire_when_done, clock, sleep)


def _poll_rounds(
    tracker: PollTracker,
    poll_one: Callable[[str], None],
    pool: Executor,
    deadline: float,
    fire_when_done: int | None,
    clock: Callable[[], float],
    sleep: Callable[[float], Any],
) -> PollOutcome:
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
        sleep(max(tracker.next_wake(now, deadline, fire_when_done) - now, 0.0))
