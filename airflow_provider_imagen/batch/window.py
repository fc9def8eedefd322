"""Decide, from the journal alone, what a batch pass must do next: mirror, submit, wait, or finish.

Why pure: a batch runs as many short passes (``execute``, then ``execute_complete`` after each trigger
event, possibly on other workers and across retries). Each pass rebuilds its view from the specs and the
journal, never from memory; this module turns that view into a plan without I/O, so the
rules — the window bound, the budget, what an unknown submit means — are tested without a server.

Invariants:
- never more than ``max_in_flight`` tasks in flight after the plan's submits;
- the credits that may have been charged (``committed``) plus 46 per planned submit never exceed
  ``max_credits``;
- an unknown submit is never planned again unless ``resubmit_unknown`` is set;
- a journalled request whose digest differs from its spec's is planned as a new request, never
  re-attached: an edited prompt must not be filed with the image of the old one;
- specs are submitted in table order, so a budget cut keeps the first rows.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, cast

import numpy as np

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.batch.journal import JournalEntries, JournalEntry
from airflow_provider_imagen.batch.keyindex import SLICE, KeyIndex, key_hashes
from airflow_provider_imagen.batch.spec_cache import SpecTable, spec_slices
from airflow_provider_imagen.polling.outcome import ENDED_STATUSES
from airflow_provider_imagen.polling.schedule import PollSchedule, next_visible_end

if TYPE_CHECKING:
    from airflow_provider_imagen.batch.specs import ImageSpec


@dataclass
class WindowPlan:
    """What one pass should do, and the counts it reports."""

    #: key → task id: submitted, no final status yet.
    in_flight: dict[str, str] = field(default_factory=dict)
    #: Completed but not mirrored (and not given up on): download these now.
    to_mirror: list[str] = field(default_factory=list)
    #: Specs to submit in this pass, in order.
    to_submit: list[ImageSpec] = field(default_factory=list)
    #: How many valid specs wait beyond this pass (for window room or budget).
    waiting_count: int = 0
    #: Those specs, in table order; filled only where a caller needs them all (the end of a run).
    waiting: list[ImageSpec] = field(default_factory=list)
    #: Keys with an unknown submit that stay unknown (no consent to pay again).
    unknown: list[str] = field(default_factory=list)
    #: Keys whose submit the API refused in this try (final until the next try).
    rejected: list[str] = field(default_factory=list)
    #: Credits that may have been charged so far.
    committed: int = 0
    #: Requests that have reached their final state (including invalid ones).
    done: int = 0
    total: int = 0
    #: Keys whose final state is a failure (failed or not found), moderated excluded.
    failed: int = 0
    moderated: int = 0
    #: Whether the budget is what keeps ``waiting`` from being submitted.
    budget_bound: bool = False

    @property
    def finished(self) -> bool:
        """Return whether nothing is left to mirror, wait for, or submit."""
        return not self.in_flight and not self.to_mirror and not self.to_submit and not self.waiting_count


def plan_window(
    specs: Sequence[ImageSpec],
    entries: Mapping[str, JournalEntry],
    *,
    max_in_flight: int,
    max_credits: int | None = None,
    resubmit_unknown: bool = False,
    retry_mirror_after: float | None = None,
    retry_rejected_before: float | None = None,
    stop_submitting: bool = False,
) -> WindowPlan:
    """Plan one pass.

    :param max_in_flight: the window: tasks submitted and not yet finished, at most.
    :param max_credits: the run's budget; ``None`` for none.
    :param resubmit_unknown: plan unknown submits again (paying again if the first POST was charged).
    :param retry_mirror_after: mirror failures recorded before this time are tried again (a new try of
        the task); later ones are final for this try. ``None`` never retries them.
    :param retry_rejected_before: submits the API refused before this time (an earlier try) are planned
        again; later refusals are final for this try (a wrong key does not improve by asking again).
        ``None`` plans every refused submit again.
    :param stop_submitting: plan no new submits (out of credits at the API, or past the deadline).
    """
    plan = WindowPlan(total=len(specs))
    unsent: list[ImageSpec] = []
    rules = _Rules(resubmit_unknown, retry_mirror_after, retry_rejected_before)
    for spec in specs:
        entry = entries.get(spec.key)
        category = rules.classify(spec, entry)
        plan.committed += _charged(entry)
        if category == UNSENT:
            unsent.append(spec)
        elif category == IN_FLIGHT:
            plan.in_flight[spec.key] = entry.task_id  # type: ignore[union-attr,assignment]
        elif category == TO_MIRROR:
            plan.to_mirror.append(spec.key)
        else:
            plan.done += 1
            if category == UNKNOWN:
                plan.unknown.append(spec.key)
            elif category == REJECTED:
                plan.rejected.append(spec.key)
            elif category == MODERATED:
                plan.moderated += 1
            elif category == FAILED:
                plan.failed += 1
    return _fill(plan, unsent, len(unsent), max_in_flight, max_credits, stop_submitting)


def _fill(
    plan: WindowPlan,
    unsent: list[ImageSpec],
    unsent_count: int,
    max_in_flight: int,
    max_credits: int | None,
    stop_submitting: bool,
) -> WindowPlan:
    """Take what fits (window room, budget) from the head of ``unsent``; the rest waits."""
    if stop_submitting:
        plan.waiting, plan.waiting_count = unsent, unsent_count
        return plan
    room = max(0, max_in_flight - len(plan.in_flight))
    affordable = unsent_count
    if max_credits is not None:
        affordable = max(0, (max_credits - plan.committed) // CREDITS_PER_IMAGE)
    take = min(room, affordable, unsent_count)
    plan.to_submit = unsent[:take]
    plan.waiting = unsent[take:]
    plan.waiting_count = unsent_count - take
    plan.budget_bound = bool(plan.waiting_count) and affordable <= room
    return plan


Category = Literal[
    "invalid", "unsent", "in_flight", "to_mirror", "unknown", "rejected", "moderated", "failed", "done"
]
INVALID: Final = "invalid"
#: Valid and to be sent (never sent, provably not created, a changed request, or resent by consent).
UNSENT: Final = "unsent"
IN_FLIGHT: Final = "in_flight"
TO_MIRROR: Final = "to_mirror"
#: An unknown submit that stays unknown (no consent to pay again).
UNKNOWN: Final = "unknown"
#: Refused by the API in this try: final until the next try.
REJECTED: Final = "rejected"
MODERATED: Final = "moderated"
FAILED: Final = "failed"
#: Ended otherwise (completed and mirrored, or given up on).
DONE: Final = "done"


@dataclass(frozen=True)
class _Rules:
    """The parameters of a try that decide a spec's category (constant for the whole try)."""

    resubmit_unknown: bool
    retry_mirror_after: float | None
    retry_rejected_before: float | None

    def classify(self, spec: ImageSpec, entry: JournalEntry | None) -> Category:
        """Return where ``spec`` stands, from its journal entry alone."""
        return self.classify_row(spec.valid, spec.digest, entry)

    def classify_row(self, valid: bool, digest: str | None, entry: JournalEntry | None) -> Category:
        """Return where a spec stands from its validity and digest (no spec needs to be built)."""
        if not valid:
            return INVALID
        if entry is None or not entry.matches(digest):
            # Nothing sent yet, or the request changed since it was paid for (an edited prompt): the
            # old task's image is not this request's, so it is sent anew; its cost stays committed.
            return UNSENT
        if entry.unknown_submit:
            return UNSENT if self.resubmit_unknown else UNKNOWN
        if entry.task_id is None:  # every submit so far was provably rejected
            if entry.rejected_kind in ("not_sent", "rate_limited"):
                # Never sent (a stopped loop, a fenced older try), or refused only for now (a rate or
                # concurrency limit): nothing was created, so it goes back with the rows to send.
                return UNSENT
            if (
                self.retry_rejected_before is not None
                and entry.rejected_at is not None
                and entry.rejected_at >= self.retry_rejected_before
            ):
                return REJECTED
            return UNSENT
        if entry.status not in ENDED_STATUSES:
            return IN_FLIGHT
        if (
            entry.status == "completed"
            and entry.mirrored is None
            and _mirror_again(entry, self.retry_mirror_after)
        ):
            return TO_MIRROR
        if entry.status == "failed" and entry.error_code == 80006:
            return MODERATED
        if entry.status in ("failed", "not_found"):
            return FAILED
        return DONE


def _charged(entry: JournalEntry | None) -> int:
    return CREDITS_PER_IMAGE * entry.charged_submits if entry is not None else 0


class WindowIndex:
    """The plan of one try, kept up to date as records fold in: a pass touches only what changed.

    Why: a batch of 10^5 rows refilling its window on the worker runs thousands of passes in one
    process; planning each from every row would cost O(rows) per pass. The index classifies every spec
    once (O(rows), when a process starts), then each :meth:`touch` reclassifies only the keys a pass's
    records changed, and :meth:`plan` reads the window, what to mirror and the head of the rows to send
    in O(window). It answers exactly what :func:`plan_window` answers for the same journal.

    :param specs: the try's specs, in table order.
    :param entries: the journal, folded.
    """

    def __init__(
        self,
        specs: Sequence[ImageSpec],
        entries: Mapping[str, JournalEntry],
        *,
        resubmit_unknown: bool = False,
        retry_mirror_after: float | None = None,
        retry_rejected_before: float | None = None,
    ) -> None:
        self.specs = specs
        self._rules = _Rules(resubmit_unknown, retry_mirror_after, retry_rejected_before)
        self._category: list[Category] = []
        self._charge: list[int] = []
        self.in_flight: dict[str, str] = {}
        self._task_key: dict[str, str] = {}
        self._sets: dict[str, set[int]] = {TO_MIRROR: set(), UNKNOWN: set(), REJECTED: set()}
        self._counts: dict[str, int] = dict.fromkeys((INVALID, UNSENT, MODERATED, FAILED, DONE), 0)
        self.committed = 0
        #: Every spec before this index is not unsent, or sits in ``_returned``.
        self._cursor = 0
        self._returned: list[int] = []
        #: Specs (re)classified since the index was built: the work passes cost (tests count it).
        self.touched = 0
        #: Why this try may send no more: the API refused the key or the account in this try.
        self.stopping: Literal["authentication", "insufficient_credits"] | None = None
        #: Settled keys whose entries were not read (their task ids are looked up only when asked).
        self._entries = entries
        #: Credits each spec may have cost since :attr:`_since`, kept once asked (see :meth:`paid_since`).
        self._paid: list[int] | None = None
        self._paid_total = 0
        self._since = 0.0
        #: Whether each spec is valid (one byte a row).
        self._valid = bytearray()
        # Specs read from the cache give their keys and digests as columns, read a slice at a time and
        # looked up again by row when needed: a stream of 10^5 rows keeps no string per row. Specs given
        # as objects hold theirs already; their digests (computed, not stored) are kept as a list.
        cached = isinstance(specs, SpecTable)
        keys_kept: list[str] = []
        digests_kept: list[str | None] = []
        hashes: list[np.ndarray] = []
        settled = entries.settled if isinstance(entries, JournalEntries) else None
        for start, keys, digests, valid in spec_slices(specs, SLICE):
            hashes.append(key_hashes(keys, len(keys)))
            self._valid.extend(valid)
            if not cached:
                keys_kept.extend(keys)
                digests_kept.extend(digests)
            for offset, key in enumerate(keys):
                self._classify_first(start + offset, key, digests[offset], valid[offset], settled)
        if isinstance(specs, SpecTable):
            self._key_at: Callable[[int], str] = specs.key_at
            self._digest_at: Callable[[int], str | None] = specs.digest_at
        else:
            self._key_at, self._digest_at = keys_kept.__getitem__, digests_kept.__getitem__
        #: Key → position of its spec.
        self.position = KeyIndex(
            np.concatenate(hashes) if hashes else np.empty(0, dtype=np.int64),
            np.arange(len(specs), dtype=np.int64),
            self._key_at,
        )

    def _classify_first(
        self,
        i: int,
        key: str,
        digest: str | None,
        valid: bool,
        settled: Callable[[str, str | None], tuple[str, int] | None] | None,
    ) -> None:
        """Classify spec ``i`` as the index is built."""
        if settled is not None and valid:
            known = settled(key, digest)
            if known is not None:
                # Ended and nothing left to do: no rule of this try changes it, so its entry (one of
                # the 10^5 a resume would otherwise build) stays unread.
                category, charged = cast("tuple[Category, int]", known)
                self._category.append(category)
                self._charge.append(CREDITS_PER_IMAGE * charged)
                self.committed += CREDITS_PER_IMAGE * charged
                self._counts[category] += 1
                return
        entry = self._entries.get(key)
        category = self._rules.classify_row(valid, digest, entry)
        self._category.append(category)
        self._charge.append(_charged(entry))
        self._add(i, category, entry, key)

    def task_key(self, task_id: str) -> str | None:
        """Return the key whose current task is ``task_id``, if that task is in flight.

        Polls ask only about tasks in flight; a task that has ended already has its outcome, so the map
        holds the window, not every task of the run.
        """
        return self._task_key.get(task_id)

    def paid_since(self, since: float) -> int:
        """Return the credits that may have been charged for POSTs made at or after ``since``.

        The first call reads every entry with an intent since then; later ones add what :meth:`touch`
        changed, so a progress line costs O(changes), not O(rows).
        """
        if self._paid is None or since != self._since:
            self._paid, self._since = [0] * len(self.specs), since
            entries = self._entries
            recent = (
                entries.attempted_since(since) if isinstance(entries, JournalEntries) else entries.values()
            )
            for entry in recent:
                i = self.position.get(entry.key)
                if i is not None:
                    self._paid[i] = CREDITS_PER_IMAGE * entry.charged_since(since)
            self._paid_total = sum(self._paid)
        return self._paid_total

    def touch(self, keys: Iterable[str], entries: Mapping[str, JournalEntry]) -> None:
        """Reclassify the specs of ``keys`` (records about them were just folded into ``entries``)."""
        for key in set(keys):
            i = self.position.get(key)
            if i is None:
                continue
            self.touched += 1
            entry = entries.get(key)
            if self._paid is not None:
                paid = CREDITS_PER_IMAGE * entry.charged_since(self._since) if entry is not None else 0
                self._paid_total += paid - self._paid[i]
                self._paid[i] = paid
            self._remove(i, self._category[i], key)
            self.committed -= self._charge[i]
            category = self._rules.classify_row(bool(self._valid[i]), self._digest_at(i), entry)
            self._category[i] = category
            self._charge[i] = _charged(entry)
            self._add(i, category, entry, key)
            if category == UNSENT and i < self._cursor:
                heapq.heappush(self._returned, i)

    def plan(
        self, *, max_in_flight: int, max_credits: int | None = None, stop_submitting: bool = False
    ) -> WindowPlan:
        """Return the plan :func:`plan_window` would, reading only the window and the rows to send next.

        ``waiting_count`` counts the specs left to send; ``waiting`` stays empty (see :meth:`waiting`).
        """
        plan = WindowPlan(
            total=len(self.specs),
            in_flight=dict(self.in_flight),
            to_mirror=[self._key_at(i) for i in sorted(self._sets[TO_MIRROR])],
            unknown=[self._key_at(i) for i in sorted(self._sets[UNKNOWN])],
            rejected=[self._key_at(i) for i in sorted(self._sets[REJECTED])],
            committed=self.committed,
            failed=self._counts[FAILED],
            moderated=self._counts[MODERATED],
        )
        plan.done = (
            self._counts[INVALID]
            + self._counts[DONE]
            + self._counts[FAILED]
            + self._counts[MODERATED]
            + len(plan.unknown)
            + len(plan.rejected)
        )
        unsent_count = self._counts[UNSENT]
        room = 0 if stop_submitting else max(0, max_in_flight - len(plan.in_flight))
        _fill(plan, self._unsent(room), unsent_count, max_in_flight, max_credits, stop_submitting)
        plan.waiting = []  # the head only was read: :meth:`waiting` lists them all, when needed
        return plan

    def waiting(self) -> list[ImageSpec]:
        """Return every unsent spec, in table order (O(rows): for the end of a run)."""
        return [self.specs[i] for i, category in enumerate(self._category) if category == UNSENT]

    def _unsent(self, limit: int) -> list[ImageSpec]:
        """Return up to ``limit`` unsent specs, in table order."""
        if limit <= 0:
            return []
        while self._returned and self._category[self._returned[0]] != UNSENT:
            heapq.heappop(self._returned)
        head = [i for i in heapq.nsmallest(limit, self._returned) if self._category[i] == UNSENT]
        order = self._category
        while self._cursor < len(order) and order[self._cursor] != UNSENT:
            self._cursor += 1
        found: list[int] = []
        j = self._cursor
        while j < len(order) and len(head) + len(found) < limit:
            if order[j] == UNSENT:
                found.append(j)
            j += 1
        return [self.specs[i] for i in sorted(set(head + found))[:limit]]

    def _add(self, i: int, category: Category, entry: JournalEntry | None, key: str) -> None:
        self.committed += self._charge[i]
        if (
            category == REJECTED
            and entry is not None
            and entry.rejected_kind in ("authentication", "insufficient_credits")
        ):
            self.stopping = entry.rejected_kind  # type: ignore[assignment]
        if category == IN_FLIGHT:
            # Only tasks in flight are asked about (a poll's answers): ended ones leave the map.
            self._task_key[entry.task_id] = key  # type: ignore[union-attr,index]
            self.in_flight[key] = entry.task_id  # type: ignore[union-attr,assignment]
        elif category in self._sets:
            self._sets[category].add(i)
        else:
            self._counts[category] += 1

    def _remove(self, i: int, category: Category, key: str) -> None:
        if category == IN_FLIGHT:
            task_id = self.in_flight.pop(key, None)
            if task_id is not None:
                self._task_key.pop(task_id, None)
        elif category in self._sets:
            self._sets[category].discard(i)
        else:
            self._counts[category] -= 1


def _mirror_again(entry: JournalEntry, retry_after: float | None) -> bool:
    if entry.mirror_failed_at is None:
        return True
    if entry.mirror_final:
        return False
    return retry_after is not None and entry.mirror_failed_at < retry_after


#: Seconds from a trigger's event to the resumed pass on a worker (triggerer, scheduler, task start),
#: as measured on a LocalExecutor with SQLite (0.5–1.6 s) and Celery with PostgreSQL (0.6–1.2 s), rounded up.
RESUME_LATENCY: Final = 1.5
#: How far ahead of the tasks' next polls a batch's trigger fires (its first polls for a refill, the
#: last polls for its last wait): a little under the usual resume, so the worker arrives as they fall
#: due rather than before (an early arrival finds nothing).
FIRE_AHEAD: Final = 1.0
#: The share of a try's wall time a slot-free batch may spend on the worker waiting for ends that are
#: about to be seen (each such wait refills places at once instead of after a round trip).
SLOT_SHARE: Final = 0.28


def streams_on_worker(schedule: PollSchedule, *, linger: float, min_deferral: float) -> bool:
    """Return whether a batch with rows waiting for room refills its window on the worker.

    Deferring frees the worker slot but a round trip lasts at least ``min_deferral`` (the hold that keeps
    Airflow from failing a resume that comes too soon) plus a resume; places that free meanwhile wait for
    the next pass, half a round trip on average. Against renders of ``expected_render`` seconds that costs
    under a quarter of the throughput when renders are at least twice the round trip, so the batch
    defers; shorter renders would leave the window mostly empty, so it streams on the worker, each place
    refilled as it frees. ``linger=0`` always defers.
    """
    return linger > 0 and schedule.expected_render < 2 * (min_deferral + RESUME_LATENCY)


def linger_for(
    submitted_at: Mapping[str, float | None],
    schedule: PollSchedule,
    *,
    linger: float,
    refillable: bool,
    stream: bool,
    now: float,
    deadline: float,
    min_deferral: float = 0.0,
    slot_share: float = 1.0,
) -> float | None:
    """Return how long to wait on the worker for the next task to end, or ``None`` to defer.

    A deferral costs a round trip through the triggerer (see :func:`streams_on_worker`); waiting costs a
    worker slot. While rows wait for room (``refillable``), a streaming batch (``stream``) waits on the
    worker for every end and refills its place at once, unless the next poll that can find an end is
    more than a render away (an API far slower than expected); otherwise it defers and comes back for a
    share of the window, except that it waits for an end about to be seen (within a poll interval and
    a quarter) while its slot time stays under :data:`SLOT_SHARE` of the try. With nothing left to
    send, it waits on the worker only when that poll is due within ``linger`` seconds, or before a
    deferral could end anyway (``min_deferral``).

    :param submitted_at: task id → submit time (epoch seconds) of the tasks in flight.
    :param linger: the operator's ``linger``; ``0`` always defers.
    :param min_deferral: seconds a deferral lasts at least (the trigger holds an earlier event).
    :param slot_share: the share of the try's wall time its slot was held so far.
    """
    if linger <= 0 or not submitted_at:
        return None
    wait = max(next_visible_end(submitted_at, schedule, now=now) - now, 0.0)
    if refillable and not stream:
        if wait > schedule.poll_interval * 1.25 or slot_share >= SLOT_SHARE:
            return None
    elif wait > (linger + schedule.expected_render if refillable else max(linger, min_deferral)):
        return None
    return min(wait + linger, max(deadline - now, 0.0))
