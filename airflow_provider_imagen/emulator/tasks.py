"""What the emulator keeps per task and per key: a task's fixed fate, the answers it hands out, counters.

Plain records, apart from :class:`~airflow_provider_imagen.emulator.state.EmulatorState`, which moves
them through time under one lock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
MODERATED = "moderated"
"""An internal outcome: the API shows it as ``failed`` with code 80006."""

MEDIA_PREFIX = "/_emulator/media/"

Clock = Callable[[], float]


@dataclass
class Task:
    """One generation task, with its pre-drawn fate and the counters benchmarks read."""

    id: str
    key: str
    prompt: str
    size: str
    created_at: float
    ready_at: float
    outcome: str
    image_ttl: float
    html: bool = False
    ambiguous: bool = False
    answer_delay: float = 0.0
    wrong_size: bool = False
    polls: int = 0
    downloads: int = 0
    first_terminal_poll_at: float | None = None
    settled: bool = False
    refunded: bool = False

    def status(self, now: float) -> str:
        """Return the API status (``processing``, ``completed`` or ``failed``) at time ``now``."""
        if now < self.ready_at:
            return PROCESSING
        return COMPLETED if self.outcome == COMPLETED else FAILED

    def internal_status(self, now: float) -> str:
        """Like :meth:`status` but telling moderation apart from other failures."""
        return PROCESSING if now < self.ready_at else self.outcome

    @property
    def expires(self) -> int:
        """Unix second at which this task's media URL stops working (at least ``image_ttl`` after ready)."""
        return math.ceil(self.ready_at + self.image_ttl)


@dataclass(frozen=True)
class SubmitResult:
    """A created (and charged) task, and how the HTTP layer must answer it.

    ``ambiguous``: answer 502 anyway; ``answer_delay``: hold the answer back this many seconds first.
    """

    task: Task
    response: dict[str, Any]
    ambiguous: bool
    answer_delay: float = 0.0


@dataclass(frozen=True)
class MediaTicket:
    """What the HTTP layer needs to serve a validated media download."""

    task_id: str
    prompt: str
    size: str
    html: bool
    scale: float


@dataclass
class _Bucket:
    tokens: float
    updated: float
    rps: float
    burst: float


@dataclass
class _Counters:
    requests: int = 0
    posts: int = 0
    polls: int = 0
    balance_reads: int = 0
    downloads: int = 0
    downloads_rejected: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    ambiguous_submits: int = 0
    late_submits: int = 0
    #: Submits refused (429) because the key had ``max_concurrent_renders`` tasks rendering.
    concurrency_limited: int = 0
    tasks_created: int = 0
    credits_charged: int = 0
    credits_refunded: int = 0
    refunds: int = 0
    submissions_by_prompt: Counter[str] = field(default_factory=Counter)


_REQUEST_KINDS = {"submit": "posts", "poll": "polls", "balance": "balance_reads"}


def _contains_any(text: str, needles: tuple[str, ...]) -> bool:
    lowered = text.lower()
    return any(needle.lower() in lowered for needle in needles)
