"""Paid submits, journalled: intent first, POST once, then the task id — for one image or a window.

Why a module of its own: the single-image operator and the batch window must follow exactly the same
steps, and this is the one place that spends money. Invariants:
- the intents of a chunk are durable before its first POST;
- whatever happens (an exception, a stop on 402), every key of the chunk leaves with a record:
  ``submitted`` (with its id), ``rejected`` (provably nothing created, including "never sent"), or its
  intent left pending with an ``ambiguous`` reason (the POST may have been paid for);
- nothing here retries a POST: the client already retried those that provably created nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_imagen.api.client import ImagenClient
from airflow_provider_imagen.api.errors import (
    AmbiguousSubmitError,
    ImagenAPIError,
    ImagenTransportError,
    InsufficientCreditsError,
)
from airflow_provider_imagen.api.models import ImageRequest
from airflow_provider_imagen.batch.journal import Journal, record

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
    #: Every journal record written for the chunk, in order (callers fold them instead of re-reading).
    records: list[dict[str, Any]] = field(default_factory=list)


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
    attempts: Mapping[str, int] | None = None,
    min_interval: float = 0.0,
) -> SubmitReport:
    """Journal the intents, POST each request once, journal what came back.

    :param requests: key → request, in submit order.
    :param attempts: key → how many task ids the key already has (for the idempotency key).
    :param min_interval: seconds between two POSTs at least (the submit rate bound).
    """
    report = SubmitReport()
    if not requests:
        return report
    intents = [record("intent", key) for key in requests]
    journal.append(intents)
    report.records += intents
    last_post = -math.inf
    try:
        for key, request in requests.items():
            if report.out_of_credits is not None:
                report.rejected[key] = report.out_of_credits
                continue
            wait = last_post + min_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last_post = time.monotonic()
            try:
                task = client.submit(
                    request, idempotency_key=idempotency_key(journal, key, (attempts or {}).get(key, 0))
                )
            except AmbiguousSubmitError as exc:
                log.warning("Submit of %s has an unknown outcome: %s", key, exc.reason)
                report.ambiguous[key] = exc.reason
            except InsufficientCreditsError as exc:
                report.out_of_credits = exc
                report.rejected[key] = exc
            except (ImagenAPIError, ImagenTransportError) as exc:
                report.rejected[key] = exc
            else:
                report.submitted[key] = task.id
    finally:
        unsent = [k for k in requests if k not in report.submitted and k not in report.ambiguous]
        for key in unsent:
            report.rejected.setdefault(key, RuntimeError("not sent: the submit loop stopped first"))
        outcomes = (
            [record("submitted", key, task_id=tid) for key, tid in report.submitted.items()]
            + [record("ambiguous", key, reason=reason) for key, reason in report.ambiguous.items()]
            + [
                record("rejected", key, reason=f"{type(error).__name__}: {error}")
                for key, error in report.rejected.items()
            ]
        )
        journal.append(outcomes)
        report.records += outcomes
    return report
