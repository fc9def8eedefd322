"""Paid submits, journalled: intent first, POST once, then the task id — for one image or a window.

Why a module of its own: the single-image operator and the batch window must follow exactly the same
steps, and this is the one place that spends money. Invariants:
- the intents of a chunk are durable before its first POST;
- whatever happens (an exception, a stop on 402, an interrupt from Airflow: ``execution_timeout``'s
  timeout, SIGTERM from a clear, KeyboardInterrupt), every key of the chunk leaves with a record
  (written, or handed to the caller's outbox, which writes it before its next POST or when it stops):
  ``submitted`` (with its id), ``rejected`` (provably nothing created: never sent), or ``ambiguous``
  (the POST may have been paid for). The key whose POST was on the wire when an interrupt came is
  ambiguous, never "not sent";
- each intent names its attempt and the digest of its request, and each outcome names the attempt;
- before each POST the try checks it still owns the journal (:mod:`airflow_provider_imagen.batch.fence`);
- nothing here retries a POST: the client already retried those that provably created nothing, or,
  for a caller that paces itself on 429s (``retry_rate_limited=False``), handed each 429 back; the rest
  of such a chunk is then not sent (the account is full now: every other POST would hear the same).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_imagen.api.client import ImagenClient
from airflow_provider_imagen.api.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    ImagenAPIError,
    ImagenTransportError,
    InsufficientCreditsError,
    RateLimitedError,
)
from airflow_provider_imagen.api.models import ImageRequest
from airflow_provider_imagen.batch.fence import FencedError
from airflow_provider_imagen.batch.journal import Journal, RefusalKind, new_record

log = logging.getLogger(__name__)


@dataclass
class SubmitReport:
    """What became of one chunk of submits."""

    #: key → task id: created and paid for.
    submitted: dict[str, str] = field(default_factory=dict)
    #: key → reason: the POST may have created a paid task we cannot find.
    ambiguous: dict[str, str] = field(default_factory=dict)
    #: key → error: provably nothing created (never sent, 4xx, 429 or refused after retries).
    rejected: dict[str, Exception] = field(default_factory=dict)
    #: Set when the account ran out of credits; the caller should stop submitting.
    out_of_credits: InsufficientCreditsError | None = None
    #: Set when a newer try owns the journal; this try must stop.
    fenced: FencedError | None = None
    #: Every journal record written for the chunk, in order (callers fold them instead of re-reading).
    records: list[dict[str, Any]] = field(default_factory=list)


class RateLimiter:
    """Space calls at least ``1 / rate`` seconds apart, across threads (``None``: no bound)."""

    def __init__(self, rate: float | None) -> None:
        self._gap = 1.0 / rate if rate else 0.0
        self._next = -math.inf
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if not self._gap:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._gap
        if slot > now:
            time.sleep(slot - now)


def idempotency_key(journal: Journal, key: str, attempt: int) -> str:
    """Return a stable ``Idempotency-Key`` for the ``attempt``-th submit of ``key``.

    reAPI ignores the header today; sending a stable one costs nothing and makes our submits safe
    the day it is honoured.
    """
    return hashlib.sha256(f"{journal.path}|{key}|{attempt}".encode()).hexdigest()[:32]


def submit_chunk(
    client: ImagenClient,
    journal: Journal,
    requests: Mapping[str, ImageRequest],
    *,
    digests: Mapping[str, str | None] | None = None,
    attempts: Mapping[str, int] | None = None,
    pace: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    retry_rate_limited: bool = True,
    outbox: list[dict[str, Any]] | None = None,
) -> SubmitReport:
    """Journal the intents, POST each request once, journal what came back.

    :param requests: key → request, in submit order.
    :param digests: key → :func:`~airflow_provider_imagen.api.models.request_digest` of the request
        (default: the request's own, as variation 0).
    :param attempts: key → how many task ids the key already has (for the idempotency key).
    :param pace: called before each POST; blocks as long as the submit rate bound requires.
    :param should_stop: checked before the chunk and before each POST; when true, the rest of the chunk
        is not sent (another chunk ran out of credits or met a 429, or the try is stopping). A chunk
        stopped before its first intent journals nothing: its keys stay as they were.
    :param retry_rate_limited: let the client wait out a 429 and send again; ``False`` hands each 429
        back in :attr:`SubmitReport.rejected` (nothing was created) and sends no more of the chunk.
    :param outbox: outcome records of the caller's previous chunk, not yet written. They are written
        with this chunk's intents, in the one durable write that precedes its first POST, and the list
        is emptied; this chunk's outcomes are then left in it instead of written, unless the chunk ends
        by an exception (then they are written at once). One write per chunk instead of two, and an
        answer is still durable before its thread sends anything more; the caller writes what is left
        in the outbox when it stops sending (see ``BatchPass._submit``).
    :raises FencedError: a newer try owns the journal; nothing more was sent (the outcomes are written).
    """
    report = SubmitReport()
    if not requests or (should_stop is not None and should_stop()):
        return report
    ids = {key: uuid.uuid4().hex[:12] for key in requests}
    intents = [
        new_record("intent", key, a=ids[key], d=(digests or {}).get(key) or request.digest())
        for key, request in requests.items()
    ]
    journal.append([*(outbox or ()), *intents])
    if outbox:
        outbox.clear()
    report.records += intents
    on_the_wire: str | None = None
    interrupted: BaseException | None = None
    limited = False
    try:
        for key, request in requests.items():
            if report.out_of_credits is not None or limited or (should_stop is not None and should_stop()):
                break
            if pace is not None:
                pace()
            try:
                journal.check_lease()
            except FencedError as exc:
                report.fenced = exc
                break
            on_the_wire = key
            try:
                task = client.submit(
                    request,
                    idempotency_key=idempotency_key(journal, key, (attempts or {}).get(key, 0)),
                    retry_rate_limited=retry_rate_limited,
                )
            except AmbiguousSubmitError as exc:
                log.warning("Submit of %s has an unknown outcome: %s", key, exc.reason)
                report.ambiguous[key] = exc.reason
            except InsufficientCreditsError as exc:
                report.out_of_credits = exc
                report.rejected[key] = exc
            except RateLimitedError as exc:
                limited = not retry_rate_limited
                report.rejected[key] = exc
            except (ImagenAPIError, ImagenTransportError) as exc:
                report.rejected[key] = exc
            else:
                report.submitted[key] = task.id
            on_the_wire = None
    except BaseException as exc:
        interrupted = exc
        raise
    finally:
        if on_the_wire is not None:
            # Interrupted while the POST was sent or awaited: the API may have created and charged it.
            why = type(interrupted).__name__ if interrupted is not None else "the submit loop stopped"
            report.ambiguous[on_the_wire] = f"interrupted ({why}) while the POST was on the wire"
        unsent = [k for k in requests if k not in report.submitted and k not in report.ambiguous]
        for key in unsent:
            report.rejected.setdefault(key, NotSentError("not sent: the submit loop stopped first"))
        outcomes = (
            [new_record("submitted", key, a=ids[key], task_id=tid) for key, tid in report.submitted.items()]
            + [new_record("ambiguous", key, a=ids[key], reason=why) for key, why in report.ambiguous.items()]
            + [
                new_record(
                    "rejected",
                    key,
                    a=ids[key],
                    refusal=refusal_kind(error),
                    reason=f"{type(error).__name__}: {error}",
                )
                for key, error in report.rejected.items()
            ]
        )
        if outbox is not None and interrupted is None and report.fenced is None:
            outbox.extend(outcomes)
        else:
            journal.append(outcomes)
        report.records += outcomes
    if report.fenced is not None:
        raise report.fenced
    return report


class NotSentError(RuntimeError):
    """The POST was never sent: the submit loop stopped before its turn. Nothing was created."""


def refusal_kind(error: Exception) -> RefusalKind:
    """Return what a refused (provably not created) POST means for the rest of the run."""
    if isinstance(error, NotSentError):
        return "not_sent"
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    if isinstance(error, AuthenticationError):
        return "authentication"
    if isinstance(error, InsufficientCreditsError):
        return "insufficient_credits"
    return "refused"
