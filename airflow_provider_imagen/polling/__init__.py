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

Modules: :mod:`.schedule` decides (:class:`PollTracker`: no I/O, no clock of its own, tested with a
fake clock); :mod:`.drivers` drives it (:func:`apoll_tasks` in triggers, :func:`poll_tasks` on workers);
:mod:`.outcome` is what a poll reports and the trigger event contract. Nothing here ever
holds an image URL: outcomes and events carry statuses and error codes only.
"""

from __future__ import annotations

from airflow_provider_imagen.polling.drivers import POLL_ERRORS, apoll_tasks, poll_tasks
from airflow_provider_imagen.polling.outcome import (
    ENDED_STATUSES,
    NOT_FOUND,
    OUTCOME_STATUSES,
    PROCESSING,
    TASK_STATUSES,
    OutcomeStatus,
    PollOutcome,
    TaskPollState,
    safe_message,
)
from airflow_provider_imagen.polling.schedule import PollSchedule, PollTracker

__all__ = [
    "ENDED_STATUSES",
    "NOT_FOUND",
    "OUTCOME_STATUSES",
    "POLL_ERRORS",
    "PROCESSING",
    "TASK_STATUSES",
    "OutcomeStatus",
    "PollOutcome",
    "PollSchedule",
    "PollTracker",
    "TaskPollState",
    "apoll_tasks",
    "poll_tasks",
    "safe_message",
]
