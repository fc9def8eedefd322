"""The emulator's bookkeeping: tasks, per-key balances, rate-limit buckets and the ledger.

Pure logic with an injectable clock and no HTTP, so every money rule of the contract can be unit-tested
with a fake clock. A task's fate (outcome, latency, ambiguous submit) is drawn once at submit; its status is
then a function of the clock. Failed tasks are refunded lazily but consistently: every public method first
*settles* all tasks whose ``ready_at`` has passed (refunding the failed ones, exactly once) using the same
``now`` it then answers with. So no poll can see ``failed`` before the refund, and the balance and ledger
show the refund even if nobody ever polls.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from airflow_provider_imagen.emulator.config import (
    CREDITS_PER_IMAGE,
    MARKER_AMBIGUOUS,
    MARKER_FAIL,
    MARKER_HTML,
    MARKER_LATE,
    MARKER_SLOW,
    MARKER_WRONG_SIZE,
    MIN_LATENCY,
    MODEL,
    EmulatorConfig,
)
from airflow_provider_imagen.emulator.errors import (
    CONTENT_POLICY,
    CONTENT_POLICY_MESSAGE,
    GENERATION_FAILED,
    GENERATION_FAILED_MESSAGE,
    INSUFFICIENT_CREDITS,
    NOT_FOUND,
    RATE_LIMITED,
    ApiError,
    MediaError,
)
from airflow_provider_imagen.emulator.tasks import (
    _REQUEST_KINDS,
    COMPLETED,
    FAILED,
    MEDIA_PREFIX,
    MODERATED,
    PROCESSING,
    Clock,
    MediaTicket,
    SubmitResult,
    Task,
    _Bucket,
    _contains_any,
    _Counters,
)
from airflow_provider_imagen.emulator.validation import Submission, authenticate


class EmulatorState:
    """All mutable state of one emulator, guarded by one lock so the server and test threads can share it."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        clock: Clock = time.time,
        secret: bytes | None = None,
    ) -> None:
        """Start empty with ``config`` (default :class:`EmulatorConfig`) and a wall clock unless injected."""
        self._config = config or EmulatorConfig()
        self._clock = clock
        self._secret = secret or secrets.token_bytes(32)
        self._lock = threading.RLock()
        self._clear()

    # ----------------------------------------------------------------- config and lifecycle

    @property
    def config(self) -> EmulatorConfig:
        """The current configuration (immutable; replaced as a whole by :meth:`configure`)."""
        return self._config

    def configure(self, fields: Mapping[str, Any] | None = None, /, **more: Any) -> EmulatorConfig:
        """Change some knobs at runtime; a new ``seed`` re-seeds the random draws. Returns the new config."""
        with self._lock:
            old = self._config
            self._config = old.updated(fields, **more)
            if self._config.seed != old.seed:
                self._seed_rngs()
            return self._config

    def reset(self) -> None:
        """Forget all tasks, balances, rate-limit buckets and ledger counters; keep the config."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._tasks: dict[str, Task] = {}
        #: Tasks still rendering, per key (the account-wide cap counts these).
        self._rendering: Counter[str] = Counter()
        self._pending: list[tuple[float, str]] = []
        self._balances: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._counters = _Counters()
        self._seed_rngs()

    def _seed_rngs(self) -> None:
        seed = self._config.seed
        self._task_rng = random.Random(seed)
        self._fault_rng = random.Random(None if seed is None else seed + 1)

    def now(self) -> float:
        """Return the injected clock's current time."""
        return self._clock()

    # ----------------------------------------------------------------- request-level accounting and faults

    def record_request(self, kind: str) -> None:
        """Count an ``/api/v1`` request on arrival: ``submit``, ``poll``, ``balance`` or anything else."""
        with self._lock:
            self._counters.requests += 1
            attr = _REQUEST_KINDS.get(kind)
            if attr is not None:
                setattr(self._counters, attr, getattr(self._counters, attr) + 1)

    def record_response(self, status: int) -> None:
        """Count the answer sent to an ``/api/v1`` request (429s and 5xx are tallied)."""
        with self._lock:
            if status == 429:
                self._counters.rate_limited += 1
            elif status >= 500:
                self._counters.server_errors += 1

    def roll_server_error(self) -> bool:
        """Decide whether this request hits the ``error_rate_5xx`` fault (before anything else happens)."""
        with self._lock:
            rate = self._config.error_rate_5xx
            return rate > 0 and self._fault_rng.random() < rate

    def authenticate(self, header: str | None) -> str:
        """Return the caller's key or raise the 401 ``ApiError`` the contract prescribes."""
        return authenticate(header, self._config)

    def check_rate_limit(self, key: str) -> None:
        """Take one token from ``key``'s bucket or raise 429 (code 50001) with an integer ``Retry-After``."""
        with self._lock:
            rps = self._config.rate_limit_rps
            if rps is None:
                return
            burst = self._config.burst
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None or bucket.rps != rps or bucket.burst != burst:
                bucket = self._buckets[key] = _Bucket(tokens=burst, updated=now, rps=rps, burst=burst)
            else:
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(burst, bucket.tokens + elapsed * rps)
                bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            retry_after = max(1, math.ceil((1.0 - bucket.tokens) / rps))
        raise ApiError(
            429,
            RATE_LIMITED,
            f"Rate limit exceeded ({rps:g} requests/s); retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )

    # ----------------------------------------------------------------- money

    def _balance_of(self, key: str) -> int:
        if key not in self._balances:
            self._balances[key] = self._config.starting_balance
        return self._balances[key]

    def balance(self, key: str) -> int:
        """Return ``key``'s credits now (after settling any refunds that are due)."""
        with self._lock:
            self._settle(self._clock())
            return self._balance_of(key)

    def set_balance(self, key: str, credits: int) -> None:
        """Set ``key``'s balance directly (a test helper; not part of reAPI)."""
        if isinstance(credits, bool) or not isinstance(credits, int) or credits < 0:
            raise ValueError(f"credits must be a non-negative integer, got {credits!r}")
        with self._lock:
            self._settle(self._clock())
            self._balances[key] = credits

    def _settle(self, now: float) -> None:
        pending = self._pending
        while pending and pending[0][0] <= now:
            _, task_id = heapq.heappop(pending)
            task = self._tasks.get(task_id)
            if task is None or task.settled:
                continue
            task.settled = True
            self._rendering[task.key] -= 1
            if task.outcome != COMPLETED:
                self._balances[task.key] = self._balance_of(task.key) + CREDITS_PER_IMAGE
                self._counters.credits_refunded += CREDITS_PER_IMAGE
                self._counters.refunds += 1
                task.refunded = True

    # ----------------------------------------------------------------- tasks

    def submit(self, key: str, submission: Submission) -> SubmitResult:
        """Create and charge a task, or raise 402 (code 30001) if ``key`` cannot pay for it."""
        with self._lock:
            now = self._clock()
            self._settle(now)
            cap = self._config.max_concurrent_renders
            if cap is not None and self._rendering[key] >= cap:
                self._counters.concurrency_limited += 1
                # The heap holds only tasks still rendering (a few per cap), not every task ever made.
                soonest = min((at for at, tid in self._pending if self._tasks[tid].key == key), default=now)
                retry_after = max(1, math.ceil(soonest - now))
                raise ApiError(
                    429,
                    RATE_LIMITED,
                    f"Too many tasks rendering for this account ({cap} at most); retry after {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                )
            available = self._balance_of(key)
            if available < CREDITS_PER_IMAGE:
                raise ApiError(
                    402,
                    INSUFFICIENT_CREDITS,
                    f"Insufficient credits: {CREDITS_PER_IMAGE} required, {available} available",
                )
            cfg = self._config
            prompt = submission.prompt
            rng = self._task_rng
            # Always draw the same four numbers in the same order, so a seed reproduces a run exactly.
            spread, moderation_roll, failure_roll, ambiguous_roll = (
                rng.uniform(-1.0, 1.0),
                rng.random(),
                rng.random(),
                rng.random(),
            )
            if _contains_any(prompt, cfg.moderated_words):
                outcome = MODERATED
            elif _contains_any(prompt, (MARKER_FAIL,)):
                outcome = FAILED
            elif moderation_roll < cfg.moderation_rate:
                outcome = MODERATED
            elif failure_roll < cfg.failure_rate:
                outcome = FAILED
            else:
                outcome = COMPLETED
            latency = max(MIN_LATENCY, cfg.latency_mean + cfg.latency_jitter * spread)
            if _contains_any(prompt, (MARKER_SLOW,)):
                latency *= cfg.slow_factor
            ambiguous = (
                _contains_any(prompt, (MARKER_AMBIGUOUS,)) or ambiguous_roll < cfg.ambiguous_submit_rate
            )
            late = _contains_any(prompt, (MARKER_LATE,))
            answer_delay = cfg.late_submit_delay if late else cfg.submit_answer_delay

            task = Task(
                id=f"task_{secrets.token_hex(16)}",
                key=key,
                prompt=prompt,
                size=submission.size,
                created_at=now,
                ready_at=now + latency,
                outcome=outcome,
                image_ttl=cfg.image_ttl,
                html=_contains_any(prompt, (MARKER_HTML,)),
                ambiguous=ambiguous,
                answer_delay=answer_delay,
                wrong_size=_contains_any(prompt, (MARKER_WRONG_SIZE,)),
            )
            self._tasks[task.id] = task
            self._rendering[key] += 1
            heapq.heappush(self._pending, (task.ready_at, task.id))
            self._balances[key] = available - CREDITS_PER_IMAGE
            counters = self._counters
            counters.tasks_created += 1
            counters.credits_charged += CREDITS_PER_IMAGE
            counters.submissions_by_prompt[prompt] += 1
            if ambiguous:
                counters.ambiguous_submits += 1
            if answer_delay > 0:
                counters.late_submits += 1
            response = {"id": task.id, "model": MODEL, "status": PROCESSING, "created_at": int(now)}
            return SubmitResult(task=task, response=response, ambiguous=ambiguous, answer_delay=answer_delay)

    def poll(self, key: str, task_id: str, base_url: str) -> dict[str, Any]:
        """Answer ``GET /tasks/{id}`` for ``key``; 404 (code 40401) for unknown ids and other keys' tasks."""
        with self._lock:
            now = self._clock()
            self._settle(now)
            task = self._tasks.get(task_id)
            if task is None or task.key != key:
                shown = task_id if len(task_id) <= 80 else task_id[:77] + "..."
                raise ApiError(404, NOT_FOUND, f"Task not found: {shown}")
            task.polls += 1
            status = task.status(now)
            if status != PROCESSING and task.first_terminal_poll_at is None:
                task.first_terminal_poll_at = now
            output: dict[str, Any] | None = None
            error: dict[str, Any] | None = None
            if status == COMPLETED:
                output = {"image_urls": [base_url.rstrip("/") + self.media_path(task)]}
            elif status == FAILED:
                if task.outcome == MODERATED:
                    error = {"code": CONTENT_POLICY, "message": CONTENT_POLICY_MESSAGE}
                else:
                    error = {"code": GENERATION_FAILED, "message": GENERATION_FAILED_MESSAGE}
            return {
                "id": task.id,
                "model": MODEL,
                "status": status,
                "created_at": int(task.created_at),
                "output": output,
                "error": error,
            }

    # ----------------------------------------------------------------- media

    def _signature(self, task_id: str, expires: int) -> str:
        message = f"{task_id}:{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def media_path(self, task: Task) -> str:
        """Return the signed path (with query) of a task's image; the caller prefixes the base URL."""
        expires = task.expires
        return f"{MEDIA_PREFIX}{task.id}.png?expires={expires}&sig={self._signature(task.id, expires)}"

    def open_media(self, task_id: str, expires: str | None, sig: str | None) -> MediaTicket:
        """Check a media URL's signature and expiry; raise :class:`MediaError` (403/404) if refused."""
        with self._lock:
            now = self._clock()
            self._settle(now)
            try:
                task = self._tasks.get(task_id)
                if task is None:
                    raise MediaError(404, "Not found")
                try:
                    expires_at = int(expires or "")
                except ValueError:
                    raise MediaError(403, "Invalid signature") from None
                if not sig or not hmac.compare_digest(sig, self._signature(task_id, expires_at)):
                    raise MediaError(403, "Invalid signature")
                if now >= expires_at:
                    raise MediaError(403, "URL expired")
                if task.status(now) != COMPLETED:
                    raise MediaError(404, "Not found")
            except MediaError:
                self._counters.downloads_rejected += 1
                raise
            task.downloads += 1
            self._counters.downloads += 1
            return MediaTicket(
                task_id=task.id,
                prompt=task.prompt,
                size=task.size,
                html=task.html,
                scale=self._config.image_scale,
            )

    # ----------------------------------------------------------------- inspection

    def ledger(self) -> dict[str, Any]:
        """Return every counter tests use to prove nothing was paid twice (JSON-ready)."""
        with self._lock:
            now = self._clock()
            self._settle(now)
            counters = self._counters
            status_counts = {PROCESSING: 0, COMPLETED: 0, FAILED: 0, MODERATED: 0}
            for task in self._tasks.values():
                status_counts[task.internal_status(now)] += 1
            default_key = self._config.api_keys[0]
            return {
                "time": now,
                "requests": counters.requests,
                "posts": counters.posts,
                "tasks_created": counters.tasks_created,
                "credits_charged": counters.credits_charged,
                "credits_refunded": counters.credits_refunded,
                "refunds": counters.refunds,
                "net_credits": counters.credits_charged - counters.credits_refunded,
                "balance": self._balance_of(default_key),
                "balances": dict(self._balances),
                "polls": counters.polls,
                "balance_reads": counters.balance_reads,
                "downloads": counters.downloads,
                "downloads_rejected": counters.downloads_rejected,
                "rate_limited": counters.rate_limited,
                "server_errors": counters.server_errors,
                "ambiguous_submits": counters.ambiguous_submits,
                "late_submits": counters.late_submits,
                "concurrency_limited": counters.concurrency_limited,
                "status_counts": status_counts,
                "submissions_by_prompt": dict(counters.submissions_by_prompt),
            }

    def tasks(self) -> list[dict[str, Any]]:
        """Return every task in creation order with its timing and per-task counters (JSON-ready)."""
        with self._lock:
            now = self._clock()
            self._settle(now)
            return [
                {
                    "id": task.id,
                    "prompt": task.prompt,
                    "size": task.size,
                    "status": task.status(now),
                    "outcome": task.outcome,
                    "created_at": int(task.created_at),
                    "ready_at": task.ready_at,
                    "first_terminal_poll_at": task.first_terminal_poll_at,
                    "polls": task.polls,
                    "downloads": task.downloads,
                    "ambiguous": task.ambiguous,
                    "answer_delay": task.answer_delay,
                    "wrong_size": task.wrong_size,
                    "refunded": task.refunded,
                }
                for task in self._tasks.values()
            ]
