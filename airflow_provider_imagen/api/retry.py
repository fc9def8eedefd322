"""The retry policy: the one place that decides whether a failed call is tried again, and when.

Two kinds of call, two rules:
- *safe* calls (poll a task, read the balance, download an image) change nothing on the server, so
  they are retried on 429 (after ``Retry-After``), on 5xx and on transport errors, with capped
  exponential backoff and full jitter, a bounded number of times;
- a *submit* creates a paid task, so it is retried only when the server provably created nothing: a
  429, or a connection that failed before the request was sent. A timeout after sending, a 5xx or a
  dropped answer leaves the outcome unknown and is never retried here.

The decisions are pure functions of (attempt, outcome): no I/O, no sleeping, so they are tested without
a server and shared by the sync and async clients.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import httpx

from airflow_provider_imagen.api.wire import Reply

#: HTTP statuses after which a safe call is worth repeating.
RETRYABLE_STATUSES: Final[frozenset[int]] = frozenset({429, 500, 502, 503, 504})

#: Transport errors raised before a single byte of the request left this machine.
NOT_SENT_ERRORS: Final[tuple[type[httpx.TransportError], ...]] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    :param max_attempts: attempts per call in total (first try included); at least 1.
    :param base_delay: first backoff, in seconds; doubles each attempt.
    :param max_delay: cap of one backoff, in seconds.
    :param max_retry_after: cap on a server's ``Retry-After``, so a bogus header cannot stall a task.
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0
    #: Source of jitter in [0, 1); replaceable in tests.
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts}: must be at least 1")

    def backoff(self, attempt: int) -> float:
        """Return the full-jitter delay after failed ``attempt`` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return ceiling * self.rand()

    def delay_for(self, attempt: int, retry_after: float | None) -> float:
        """Return how long to wait before the next attempt, honouring ``Retry-After`` (capped)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return self.backoff(attempt)

    def retry_safe_call(self, attempt: int, outcome: Reply | httpx.TransportError) -> bool:
        """Return whether a poll, balance read or download should be tried again."""
        if attempt >= self.max_attempts:
            return False
        if isinstance(outcome, httpx.TransportError):
            return True
        return outcome.status_code in RETRYABLE_STATUSES

    def retry_submit(
        self, attempt: int, outcome: Reply | httpx.TransportError, *, rate_limited: bool = True
    ) -> bool:
        """Return whether a submit should be tried again: only when nothing can have been created.

        :param rate_limited: whether a 429 is retried here. A caller that sizes its own load from the
            API's 429s (a batch window) must hear each of them, so it asks for ``False``.
        """
        if attempt >= self.max_attempts:
            return False
        if isinstance(outcome, httpx.TransportError):
            return isinstance(outcome, NOT_SENT_ERRORS)
        return rate_limited and outcome.status_code == 429


def parse_retry_after(value: str | None) -> float | None:
    """Return ``Retry-After`` in seconds; ``None`` if absent or not a number of seconds.

    The HTTP-date form is not used by reAPI; treating it as absent falls back to backoff, which is safe.
    """
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
