"""ImagenTaskTrigger: wait in the triggerer for many Imagen tasks at once, holding no worker slot.

The trigger is the async driver of :mod:`airflow_provider_imagen.polling` plus what the triggerer needs:
kwargs that survive serialisation and restarts, an async connection lookup, exactly one event, and
log lines and events that never carry a key or a URL.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from airflow.configuration import conf
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_imagen.api.errors import ImagenError
from airflow_provider_imagen.hooks.imagen import ImagenHook
from airflow_provider_imagen.polling import (
    PROCESSING,
    PollOutcome,
    PollSchedule,
    TaskPollState,
    apoll_tasks,
    safe_message,
)

#: Where Airflow finds this class again when it rebuilds the trigger from its kwargs.
CLASSPATH: Final = "airflow_provider_imagen.triggers.imagen.ImagenTaskTrigger"
#: Added to ``defer(timeout=…)`` by every task that defers to this trigger: the trigger enforces the real
#: (absolute) deadline and says so in an event; Airflow's own deferral timeout runs neither
#: ``execute_complete`` nor ``on_kill``, so it is only a safety net for a triggerer that never answers.
DEFERRAL_SAFETY_MARGIN: Final = timedelta(minutes=10)
#: Seconds a deferral lasts beyond the deployment's ``[workers] min_heartbeat_interval``, unless
#: ``[imagen] min_deferral_seconds`` says otherwise. The deferring process's "success" reaches the scheduler
#: only when its supervisor sees it exit, which can take up to one supervisor wait (the heartbeat
#: interval: 5 s by default), then a scheduler loop; a resumed try already queued or running by then is
#: failed as "killed externally" (Airflow 3.3 guards a resumed task only while it is ``scheduled``).
SCHEDULER_MARGIN: Final = 2.0
#: Deadlines before this (2001-09-09) are surely relative seconds, not epoch seconds: refuse them.
_EPOCH_FLOOR: Final = 1_000_000_000.0
_DEFAULTS: Final = PollSchedule()


def min_deferral_seconds() -> float:
    """Return how long this deployment's deferrals last at least (see :func:`resume_not_before`).

    ``[imagen] min_deferral_seconds`` if set, else the supervisor's longest wait to notice a process
    exit (``[workers] min_heartbeat_interval``) plus :data:`SCHEDULER_MARGIN`: 7 s with Airflow's defaults.
    """
    configured = conf.get("imagen", "min_deferral_seconds", fallback=None)
    if configured not in (None, ""):
        return max(float(configured), 0.0)
    return conf.getfloat("workers", "min_heartbeat_interval", fallback=5.0) + SCHEDULER_MARGIN


def resume_not_before(settle: float | None = None, *, now: float | None = None) -> float:
    """Return the earliest epoch time a deferral made now may end (``not_before`` of the trigger).

    Airflow's stale-success race (apache/airflow#72716): when a trigger fires within moments of the
    deferral, the resumed try can be running before the scheduler has handled the deferring process's
    exit, and the scheduler then fails it. Holding every event until :func:`min_deferral_seconds` after
    the deferral closes that window without spending a retry. ``settle`` overrides it.
    """
    settle = min_deferral_seconds() if settle is None else max(settle, 0.0)
    return (time.time() if now is None else now) + settle


class ImagenTaskTrigger(BaseTrigger):
    """Poll Imagen task ids until enough have ended or the deadline passes; yield one event.

    It only polls: submitting (which is paid) and downloading belong to the worker. A trigger can run
    more than once, even in two triggerers at a time, and restarts from its kwargs after a triggerer dies;
    a submit in :meth:`run` would pay again each time, and a download would put image bytes and signed
    URLs where they do not belong. Polls are free and idempotent, so running twice costs nothing but a
    few GETs, and a restart keeps its absolute deadline. The kwargs are JSON-safe scalars: never a key, a
    header, a prompt or a URL.

    :param imagen_conn_id: the ``imagen`` connection (read with the async lookup in the triggerer).
    :param task_ids: the task ids to watch.
    :param deadline: absolute wall-clock deadline in epoch seconds (``time.time() + timeout``).
    :param submitted_at: submit time of each id (epoch seconds), parallel to ``task_ids``; ``None``
        (or a ``None`` entry) means "unknown", counted from the trigger's start.
    :param fire_when_done: fire once this many ids have ended (``None``: all), so a batch can come back
        and refill its window early.
    :param polled_until: an earlier trigger polled these ids on their grids up to this epoch time; skip
        those instants instead of polling every overdue id at once (``None``: catch up).
    :param expected_render: seconds after submit of an id's first poll.
    :param poll_interval: seconds between the first "still processing" and the next poll.
    :param backoff: growth of the interval after each further "still processing".
    :param max_poll_interval: cap of one interval, in seconds.
    :param max_consecutive_errors: transient poll failures in a row before an ``error`` event.
    :param max_concurrent_polls: polls in flight at once (and the HTTP connection pool size).
    :param round_gap: least seconds between two poll rounds; ids falling due meanwhile go together.
    :param fire_ahead: fire this many seconds before enough ids are due for their first poll (counted
        with those that ended): a batch's worker, which needs about that long to resume, polls them
        itself on arrival. Waiting for every id, fire that long before the last next poll, once some id
        ended and while every id is at its first or second poll (see ``PollTracker``'s ``lead``).
        ``None``: fire on ends seen.
    :param not_before: yield no event before this epoch time (see :func:`resume_not_before`): a
        condition met at once is held until the deferral has settled in the scheduler.
    """

    def __init__(
        self,
        *,
        imagen_conn_id: str = ImagenHook.default_conn_name,
        task_ids: list[str],
        deadline: float,
        submitted_at: list[float | None] | None = None,
        fire_when_done: int | None = None,
        polled_until: float | None = None,
        expected_render: float = _DEFAULTS.expected_render,
        poll_interval: float = _DEFAULTS.poll_interval,
        backoff: float = _DEFAULTS.backoff,
        max_poll_interval: float = _DEFAULTS.max_poll_interval,
        max_consecutive_errors: int = _DEFAULTS.max_consecutive_errors,
        max_concurrent_polls: int = _DEFAULTS.max_concurrent_polls,
        round_gap: float = _DEFAULTS.round_gap,
        fire_ahead: float | None = None,
        not_before: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(task_ids, str) or not all(isinstance(t, str) and t.strip() for t in task_ids):
            raise ValueError(f"task_ids must be a list of non-empty strings, got {task_ids!r:.200}")
        if (
            isinstance(deadline, bool)
            or not isinstance(deadline, (int, float))
            or not math.isfinite(deadline)
        ):
            raise ValueError(f"deadline={deadline!r}: must be epoch seconds (time.time() + timeout)")
        if deadline < _EPOCH_FLOOR:
            raise ValueError(
                f"deadline={deadline}: looks like a relative number of seconds; pass an absolute epoch "
                "time (time.time() + timeout) so that a restarted trigger keeps it"
            )
        if submitted_at is not None and len(submitted_at) != len(task_ids):
            raise ValueError(
                f"submitted_at has {len(submitted_at)} entries for {len(task_ids)} task_ids: "
                "it must be parallel to task_ids (or None)"
            )
        if fire_when_done is not None and (isinstance(fire_when_done, bool) or int(fire_when_done) < 1):
            raise ValueError(f"fire_when_done={fire_when_done!r}: must be >= 1 (or None for all)")
        self.imagen_conn_id = imagen_conn_id
        #: Polled ids, as given.
        self.task_ids = list(task_ids)
        #: Absolute, wall clock: a restart from kwargs keeps it.
        self.deadline = float(deadline)
        self.submitted_at = (
            None if submitted_at is None else [None if s is None else float(s) for s in submitted_at]
        )
        self.fire_when_done = None if fire_when_done is None else int(fire_when_done)
        #: An earlier trigger polled these ids on their grids up to this epoch time (a batch refill).
        self.polled_until = None if polled_until is None else float(polled_until)
        self.fire_ahead = None if fire_ahead is None else float(fire_ahead)
        #: Absolute like the deadline: a trigger restarted from its kwargs holds until the same moment.
        self.not_before = None if not_before is None else float(not_before)
        #: Validated here, so a bad schedule fails at ``defer()`` on the worker, not in the triggerer.
        self.schedule = PollSchedule(
            expected_render=expected_render,
            poll_interval=poll_interval,
            backoff=backoff,
            max_poll_interval=max_poll_interval,
            max_consecutive_errors=max_consecutive_errors,
            max_concurrent_polls=max_concurrent_polls,
            round_gap=round_gap,
        )

    def __repr__(self) -> str:
        return (
            f"ImagenTaskTrigger(imagen_conn_id={self.imagen_conn_id!r}, {len(self.task_ids)} task id(s), "
            f"deadline={self.deadline:.0f})"
        )

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the classpath and kwargs that rebuild this trigger: JSON-safe scalars and lists only."""
        return (
            CLASSPATH,
            {
                "imagen_conn_id": self.imagen_conn_id,
                "task_ids": list(self.task_ids),
                "deadline": self.deadline,
                "submitted_at": None if self.submitted_at is None else list(self.submitted_at),
                "fire_when_done": self.fire_when_done,
                "polled_until": self.polled_until,
                "fire_ahead": self.fire_ahead,
                "not_before": self.not_before,
                **self.schedule.to_kwargs(),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the fire condition, the deadline or too many failures; yield exactly one event."""
        count = len(self.task_ids)
        self.log.info(
            "Polling %d Imagen task(s) on connection %r until %s (epoch %.0f); firing when %s ended.",
            count,
            self.imagen_conn_id,
            datetime.fromtimestamp(self.deadline, tz=timezone.utc).isoformat(timespec="seconds"),
            self.deadline,
            "all" if self.fire_when_done is None else min(self.fire_when_done, count),
        )
        outcome = await self._poll()
        self.log.info(
            "Imagen poll ended: %s after %d poll(s); %s%s",
            outcome.status,
            outcome.polls,
            ", ".join(f"{n} {status}" for status, n in outcome.counts().items() if n),
            f" ({outcome.message})" if outcome.message else "",
        )
        hold = 0.0 if self.not_before is None else self.not_before - time.time()
        if hold > 0:
            self.log.info("Holding the event %.1f s, until the deferral has settled in the scheduler.", hold)
            await asyncio.sleep(hold)
        yield TriggerEvent(outcome.to_event())

    async def _poll(self) -> PollOutcome:
        """Return the poll's outcome; turn any failure into an ``error`` outcome without secrets."""
        try:
            client = await ImagenHook(self.imagen_conn_id).aget_conn(
                max_connections=self.schedule.max_concurrent_polls
            )
        except Exception as exc:
            message = f"could not use connection {self.imagen_conn_id!r}: {safe_message(exc)}"
            self.log.error("%s", message)
            return self._error(message)
        api_key = client.settings.api_key
        submitted = (
            None if self.submitted_at is None else dict(zip(self.task_ids, self.submitted_at, strict=True))
        )
        try:
            async with client:
                return await apoll_tasks(
                    client,
                    self.task_ids,
                    deadline=self.deadline,
                    schedule=self.schedule,
                    submitted_at=submitted,
                    fire_when_done=self.fire_when_done,
                    polled_until=self.polled_until,
                    fire_ahead=self.fire_ahead,
                )
        except Exception as exc:
            message = f"polling failed: {safe_message(exc, secrets=[api_key])}"
            # A traceback helps with a bug; an API answer (401, 403, ...) is fully described by its message.
            self.log.error("%s", message, exc_info=not isinstance(exc, ImagenError))
            return self._error(message)

    def _error(self, message: str) -> PollOutcome:
        """Return an ``error`` outcome that knows nothing of the ids' states (all still processing)."""
        return PollOutcome(
            status="error", tasks={tid: TaskPollState(PROCESSING) for tid in self.task_ids}, message=message
        )
