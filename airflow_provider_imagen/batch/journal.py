"""The exactly-once journal: what was about to be paid for, what was paid for, and what came of it.

Why storage and not XCom: XCom is wiped when a task retries, and ``execute`` and ``execute_complete``
may run on different workers. The journal lives on an :class:`ObjectStoragePath` (local disk, S3, GCS…)
keyed by ``dag_id / run_id / task_id / map_index`` — never ``try_number``, so every try of a task
instance reads the same journal and re-attaches to the tasks an earlier try paid for.

Invariants:
- an ``intent`` record for a request is durable BEFORE its paid POST is sent; its ``submitted`` record
  (the task id) is written right after. An intent with no id after it is an *unknown submit*: the POST
  may or may not have created a paid task. It is reported, and resubmitted only by explicit policy;
- records are only ever appended, in *segments*: one immutable file per write, written whole and
  fsynced (a rename on local disk, one PUT on object stores). Two writers (a zombie try and its retry)
  cannot overwrite each other; reading folds every segment in name order;
- segment names start with a sequence number one higher than any segment the writer has seen (a
  Lamport clock), never a host's clock: a step back or two hosts' skew cannot put a ``submitted`` before
  its ``intent``;
- every intent carries the digest of its exact request
  (:func:`~airflow_provider_imagen.api.models.request_digest`) and an attempt id that its outcome
  names. An intent with another digest than the key's starts a new *generation*: the request changed
  (an edited prompt), so nothing of the old one is re-attached, while what the old one cost stays
  counted;
- a request that was provably not created (401, 400, 402, a 429 or a refused connection after retries,
  or a POST never sent) gets a ``rejected`` record, which clears its intent so a later try may submit
  it again;
- compaction writes a snapshot that names the segments it holds; a reader skips what a later snapshot
  holds, so two readers compacting at once never make a record count twice;
- at most one try pays at a time: see :mod:`airflow_provider_imagen.batch.fence`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast, get_args

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch import fence
from airflow_provider_imagen.batch.fence import FencedError, Lease
from airflow_provider_imagen.batch.storage import as_path, path_part, read_bytes, write_whole

log = logging.getLogger(__name__)

RecordKind = Literal[
    "intent", "submitted", "rejected", "ambiguous", "terminal", "mirrored", "mirror_failed", "timeout", "try"
]
#: Every record kind, in the order a request normally goes through them.
RECORD_KINDS: Final[tuple[str, ...]] = (
    "intent",
    "submitted",
    "rejected",
    "ambiguous",
    "terminal",
    "mirrored",
    "mirror_failed",
    "timeout",
    "try",
)
#: Key under which the records of a try's clock are stored (no request key has a ``/``: prompt ids with
#: one are invalid). :meth:`Journal.load` returns them apart, in :attr:`Journal.tries`.
TRY_KEY: Final = "/try"
_SEGMENT_SUFFIX: Final = ".jsonl"
#: Kind of a snapshot's first line: the names of the segments it holds.
HOLDS: Final = "_holds"
#: How a snapshot's text starts (its header is written compact, kind first).
_HOLDS_PREFIX: Final = '{"e":"' + HOLDS + '"'
#: This process's part of segment names: two writers with the same sequence number never collide.
_WRITER: Final = uuid.uuid4().hex[:8]
#: Reads restarted when a segment vanishes mid-read (a concurrent compaction).
_LOAD_ATTEMPTS: Final = 5
#: Compact the journal into one snapshot when a read finds more segments than this.
DEFAULT_COMPACT_OVER: Final = 200


RefusalKind = Literal["not_sent", "rate_limited", "authentication", "insufficient_credits", "refused"]
#: Why a POST provably created nothing, as decisions need it: never sent, or refused for now by a rate
#: or concurrency limit (send it again, later), a wrong key or an empty account (every other POST would
#: be refused the same way: stop), or any other refusal (final for this try).
REFUSAL_KINDS: Final[tuple[str, ...]] = get_args(RefusalKind)
#: Error names in the ``reason`` of journals written before ``rejected`` records carried a ``kind``.
_KIND_OF_ERROR: Final = {
    "NotSentError": "not_sent",
    "RateLimitedError": "rate_limited",
    "AuthenticationError": "authentication",
    "InsufficientCreditsError": "insufficient_credits",
}

#: Outcomes of one submit attempt (one intent): sent and answered, sent with no answer, or provably
#: nothing created.
PENDING: Final = "pending"
AMBIGUOUS: Final = "ambiguous"
SUBMITTED: Final = "submitted"
REJECTED: Final = "rejected"


@dataclass
class JournalEntry:
    """Everything the journal knows about one request, folded from its records."""

    key: str
    #: Digest of the request of the current generation (``None`` in journals written without one).
    digest: str | None = None
    #: Attempt id → its outcome (:data:`PENDING`, :data:`AMBIGUOUS`, :data:`SUBMITTED`, :data:`REJECTED`).
    attempts: dict[str, str] = field(default_factory=dict)
    #: Attempt id → when its intent was written (epoch seconds; for "paid in this try" counts only).
    attempted_at: dict[str, float] = field(default_factory=dict)
    #: Task ids received for this request; more than one only after an explicit resubmit.
    task_ids: list[str] = field(default_factory=list)
    #: Why the last submit's outcome is unknown, when it is.
    ambiguous_reason: str | None = None
    submitted_at: float | None = None
    #: ``completed``, ``failed`` or ``not_found`` once the API said so.
    status: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    completed_at: float | None = None
    #: Where the image was mirrored: uri, sha256, width, height, size_bytes, content_type.
    mirrored: dict[str, Any] | None = None
    #: Why the mirrored image is not what was asked for (its pixel size), when it is not.
    mismatch: str | None = None
    #: Set when a deadline passed while the task was still processing.
    timed_out_at: float | None = None
    #: Why the last submit was rejected (its kind, and the API's words), and when.
    rejected_kind: RefusalKind | None = None
    rejected_reason: str | None = None
    rejected_at: float | None = None
    #: Why mirroring the latest task's image failed after retries, when, and whether its URL expired.
    mirror_error: str | None = None
    mirror_failed_at: float | None = None
    expired: bool = False
    #: The failure cannot improve by asking again (expired URL, not an image): never retried.
    mirror_final: bool = False
    #: Earlier generations of this key (the request changed): digest, task id, image URI, charged POSTs.
    replaced: list[dict[str, Any]] = field(default_factory=list)
    #: POSTs of earlier generations that may have been charged and not refunded.
    earlier_charged: int = 0

    @property
    def task_id(self) -> str | None:
        """Return the task id to follow: the latest one received."""
        return self.task_ids[-1] if self.task_ids else None

    @property
    def unknown_submit(self) -> bool:
        """Return whether a POST may have been paid for without our knowing its task id."""
        return not self.task_ids and any(o in (PENDING, AMBIGUOUS) for o in self.attempts.values())

    @property
    def ambiguous_count(self) -> int:
        """Return how many POSTs were sent and never answered."""
        return sum(1 for outcome in self.attempts.values() if outcome == AMBIGUOUS)

    @property
    def charged_submits(self) -> int:
        """Return how many POSTs for this request may have been charged and not refunded.

        Every attempt counts unless the API provably created nothing (``rejected``), across every
        generation of the key; the latest task not if it ended ``failed``/``not_found`` (refunded). A
        try that crashed between its intent and the answer counts, so a resubmit counts twice: the
        first POST may have been paid.
        """
        refunded = 1 if self.task_ids and self.status in ("failed", "not_found") else 0
        sent = sum(1 for outcome in self.attempts.values() if outcome != REJECTED)
        # Every task id is a POST that was answered, whether or not its intent is known here.
        return self.earlier_charged + max(sent, len(self.task_ids)) - refunded

    def sent_since(self, since: float) -> int:
        """Return how many POSTs of this request were sent (or may have been) at or after ``since``."""
        return sum(
            1 for a, o in self.attempts.items() if o != REJECTED and self.attempted_at.get(a, 0) >= since
        )

    def charged_since(self, since: float) -> int:
        """Return the POSTs made at or after ``since`` that may have been charged and not refunded."""
        sent = self.sent_since(since)
        refunded = 1 if sent and self.task_ids and self.status in ("failed", "not_found") else 0
        return sent - refunded

    def matches(self, digest: str | None) -> bool:
        """Return whether this entry's request is ``digest`` (journals without digests always match)."""
        return digest is None or self.digest is None or self.digest == digest

    def apply(self, record: Mapping[str, Any]) -> None:
        """Fold one record into this entry."""
        kind = record["e"]
        attempt = record.get("a")
        if kind == "intent":
            digest = record.get("d")
            if digest is not None and not self.matches(digest) and self.attempts:
                self._new_generation()
            if digest is not None:
                self.digest = digest
            attempt = attempt or f"#{len(self.attempts)}"
            if attempt not in self.attempts:
                self.attempts[attempt] = PENDING
                self.attempted_at[attempt] = record.get("ts") or 0.0
                self.ambiguous_reason = None
                self.rejected_kind = self.rejected_reason = self.rejected_at = None
        elif kind == "submitted":
            if self._settle(attempt, SUBMITTED) and record["task_id"] not in self.task_ids:
                self.task_ids.append(record["task_id"])
                self.submitted_at = record.get("ts")
                # A new task starts with no outcome of its own.
                self.status = self.error_code = self.error_message = self.completed_at = None
                self.mirrored = self.mismatch = None
                self.timed_out_at = self.mirror_error = self.mirror_failed_at = None
                self.expired = self.mirror_final = False
        elif kind == "rejected":
            if self._settle(attempt, REJECTED):
                self.rejected_reason = record.get("reason")
                self.rejected_at = record.get("ts")
                kind = record.get("refusal") or _KIND_OF_ERROR.get(
                    (self.rejected_reason or "").split(":", 1)[0], "refused"
                )
                self.rejected_kind = cast(RefusalKind, kind if kind in REFUSAL_KINDS else "refused")
        elif kind == "ambiguous":
            if self._settle(attempt, AMBIGUOUS):
                self.ambiguous_reason = record.get("reason")
        elif kind == "terminal":
            if record.get("task_id") == self.task_id:
                self.status = record["status"]
                self.error_code = record.get("error_code")
                self.error_message = record.get("error_message")
                self.completed_at = record.get("ts")
        elif kind == "mirrored":
            if record.get("task_id") == self.task_id:
                self.mirrored = record["image"]
                self.mismatch = record.get("mismatch")
                self.mirror_error = self.mirror_failed_at = None
        elif kind == "mirror_failed":
            if record.get("task_id") == self.task_id:
                self.mirror_error = record.get("reason")
                self.mirror_failed_at = record.get("ts")
                self.expired = bool(record.get("expired"))
                self.mirror_final = self.expired or bool(record.get("final"))
        elif kind == "timeout" and record.get("task_id") == self.task_id:
            self.timed_out_at = record.get("ts")

    def _settle(self, attempt: str | None, outcome: str) -> bool:
        """Record ``outcome`` for ``attempt``; return ``False`` when it is not of this generation.

        Records without attempt ids (older journals) answer the latest intent. An outcome naming an
        attempt this generation never made answers a request that has since changed: what it cost was
        counted when the generation was set aside, and its task is not the current request's.
        """
        if attempt is None:
            attempt = next(reversed(self.attempts)) if self.attempts else "#0"
        elif attempt not in self.attempts:
            return False
        self.attempts[attempt] = outcome
        return True

    def _new_generation(self) -> None:
        """Set the current request aside: it changed, so nothing of it is re-attached to the new one."""
        self.replaced.append(
            {
                "digest": self.digest,
                "task_id": self.task_id,
                "status": self.status,
                "image_uri": (self.mirrored or {}).get("uri"),
                "charged": self.charged_submits - self.earlier_charged,
            }
        )
        kept = (self.replaced, self.charged_submits)
        fresh = JournalEntry(self.key)
        self.__dict__.update(fresh.__dict__)
        self.replaced, self.earlier_charged = kept


class JournalReadError(RuntimeError):
    """A journal segment exists but cannot be read: refuse to guess, or we might pay twice."""


class Journal:
    """Append-only record of one task instance's paid requests, on any ``ObjectStoragePath``.

    :param root: the folder under which all journals live (``file://``, ``s3://``…).
    :param dag_id: the DAG of the task instance.
    :param task_id: the Airflow task id.
    :param run_id: the DAG run id.
    :param map_index: the map index; ``-1`` for unmapped tasks.
    :param compact_over: fold the segments into one snapshot when a read finds more than this many.
    """

    def __init__(
        self,
        root: ObjectStoragePath | str,
        *,
        dag_id: str,
        task_id: str,
        run_id: str,
        map_index: int = -1,
        compact_over: int = DEFAULT_COMPACT_OVER,
    ) -> None:
        self.compact_over = compact_over
        #: Segments this object wrote since it last read the journal.
        self.appended = 0
        #: The next segment's sequence number; ``None`` until the journal's segments were listed.
        self._next_seq: int | None = None
        #: The try this object writes for; every paid POST checks it first (see :meth:`claim`).
        self.lease: Lease | None = None
        #: Each try's clock (started_at, deadline, budget…) by its lease epoch, as of the last read.
        self.tries: dict[int, dict[str, Any]] = {}
        self.path = (
            as_path(root) / path_part(dag_id) / path_part(run_id) / path_part(task_id) / f"map_{map_index}"
        )

    @classmethod
    def for_task_instance(cls, root: ObjectStoragePath | str, context: Mapping[str, Any]) -> Journal:
        """Return the journal of the task instance running in ``context``."""
        ti = context["ti"]
        return cls(
            root,
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            map_index=getattr(ti, "map_index", -1) if getattr(ti, "map_index", None) is not None else -1,
        )

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    def record_try(self, clock: Mapping[str, Any]) -> None:
        """Journal the clock of the try that holds the lease (a resumed pass reads it back)."""
        rec = new_record("try", TRY_KEY, **clock)
        self.append([rec])
        self.tries[int(rec.get("epoch") or 0)] = _clock_of(rec)

    # -- the try that may pay -----------------------------------------------------------------------

    def claim(self, owner: str, **facts: Any) -> Lease:
        """Make this try the journal's only payer: any older try stops before its next POST."""
        self.lease = fence.claim(self.path, owner=owner, **facts)
        return self.lease

    def resume(self, owner: str, epoch: int | None = None) -> Lease:
        """Take back the lease a try claimed before it deferred; raise if a newer try claimed since.

        :raises FencedError: the lease is not found or a newer one exists.
        """
        lease = fence.find(self.path, owner=owner, epoch=epoch)
        if lease is None:
            raise FencedError(
                f"this try holds no lease on the journal at {self.path} (owner {owner}); it stops here"
            )
        lease.check()
        self.lease = lease
        return lease

    def check_lease(self) -> None:
        """Raise :class:`FencedError` when a newer try owns the journal (no-op without a lease)."""
        if self.lease is not None:
            self.lease.check()

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> dict[str, JournalEntry]:
        """Fold every segment, oldest first, into one entry per request key.

        An absent journal is empty; an unreadable segment raises :class:`JournalReadError`. A segment
        that vanishes while we read (another pass compacted it into a snapshot) restarts the read, so
        no record is ever missed; what a later snapshot holds is skipped, so none counts twice.
        """
        for _ in range(_LOAD_ATTEMPTS):
            segments = self._segments()
            try:
                texts = [(segment, self._read(segment)) for segment in segments]
            except FileNotFoundError:
                continue
            live = _without_held(texts)
            entries: dict[str, JournalEntry] = {}
            tries: dict[int, dict[str, Any]] = {}
            for segment, text in live:
                _fold_text(entries, tries, segment, text)
            self.tries = tries
            self._next_seq = max(self._next_seq or 0, *(_seq(p.name) + 1 for p in segments), 1)
            if len(segments) > self.compact_over:
                self._compact(live)
            self.appended = 0
            return entries
        raise JournalReadError(f"{self.path}: segments kept vanishing while reading ({_LOAD_ATTEMPTS} tries)")

    @staticmethod
    def _read(segment: ObjectStoragePath) -> str:
        try:
            return read_bytes(segment).decode("utf-8")
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise JournalReadError(f"cannot read journal segment {segment}: {exc}") from exc

    def _compact(self, texts: list[tuple[ObjectStoragePath, str]]) -> None:
        """Replace many small segments by one snapshot at the same place in the order.

        The snapshot is written (whole) before any segment is deleted, sorts right after the last
        segment it holds and before any later one, and opens with the names of everything it holds: a
        reader that finds both the snapshot and a segment (or an older snapshot) it holds skips the
        latter, so two readers compacting at once never double a record.
        """
        held = sorted({name for segment, text in texts for name in (segment.name, *_holds(text))})
        last = texts[-1][0].name.removesuffix(_SEGMENT_SUFFIX)
        header = json.dumps({"e": HOLDS, "names": held}, separators=(",", ":")) + "\n"
        records = [_records_of(text) for _, text in texts]
        body = header + "".join(r if r.endswith("\n") else r + "\n" for r in records)
        write_whole(self.path / f"{last}~{uuid.uuid4().hex[:8]}{_SEGMENT_SUFFIX}", body.encode("utf-8"))
        for segment, _ in texts:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()

    def _segments(self) -> list[ObjectStoragePath]:
        try:
            if not self.path.exists():
                return []
            found = [p for p in self.path.iterdir() if p.name.endswith(_SEGMENT_SUFFIX)]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda p: p.name)

    # -- writing -------------------------------------------------------------------------------

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write ``records`` as one new immutable segment, durable when this returns."""
        lines = []
        for record in records:
            if record.get("e") not in RECORD_KINDS:
                raise ValueError(f"unknown journal record kind {record.get('e')!r}")
            lines.append(json.dumps(dict(record), ensure_ascii=False, separators=(",", ":")))
        if not lines:
            return
        if self._next_seq is None:  # never listed: continue after what is there
            self._next_seq = max((_seq(p.name) + 1 for p in self._segments()), default=1)
        name = f"{self._next_seq:020d}-{_WRITER}-{uuid.uuid4().hex[:8]}{_SEGMENT_SUFFIX}"
        self._next_seq += 1
        write_whole(self.path / name, ("\n".join(lines) + "\n").encode("utf-8"))
        self.appended += 1


def new_record(kind: RecordKind, key: str, **fields: Any) -> dict[str, Any]:
    """Return one journal record of ``kind`` for request ``key``, stamped with the wall-clock time."""
    return {"e": kind, "k": key, "ts": time.time(), **fields}


def record(kind: RecordKind, key: str, **fields: Any) -> dict[str, Any]:
    """Return :func:`new_record` (the old name: ``record`` reads like a verb and hides local names).

    .. deprecated:: 0.2.0 use :func:`new_record`.
    """
    warnings.warn(
        "journal.record() is deprecated: use journal.new_record()", DeprecationWarning, stacklevel=2
    )
    return new_record(kind, key, **fields)


def _seq(name: str) -> int:
    """Return the sequence number a segment's name starts with (0 for a name without one)."""
    digits = name[: len(name) - len(name.lstrip("0123456789"))]
    return int(digits) if digits else 0


def _holds(text: str) -> list[str]:
    """Return the names a snapshot's first line says it holds (none for a plain segment)."""
    if not text.startswith(_HOLDS_PREFIX):
        return []
    first = text.split("\n", 1)[0]
    try:
        return list(json.loads(first)["names"])
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalReadError(f"a journal snapshot's header is unreadable: {exc}") from exc


def _records_of(text: str) -> str:
    """Return a segment's text without a snapshot header."""
    return text.split("\n", 1)[1] if text.startswith(_HOLDS_PREFIX) else text


def _without_held(texts: list[tuple[ObjectStoragePath, str]]) -> list[tuple[ObjectStoragePath, str]]:
    """Drop every segment or snapshot that a snapshot (other than itself) holds."""
    held: set[str] = set()
    for _, text in texts:
        held.update(_holds(text))
    return [(segment, text) for segment, text in texts if segment.name not in held]


def _clock_of(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("e", "k", "ts", "epoch")}


def _fold_text(
    entries: dict[str, JournalEntry], tries: dict[int, dict[str, Any]], segment: ObjectStoragePath, text: str
) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (number == 1 and line.startswith(_HOLDS_PREFIX)):
            continue
        try:
            record = json.loads(line)
            if record["e"] == "try":
                tries[int(record.get("epoch") or 0)] = _clock_of(record)
                continue
            key = record["k"]
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = JournalEntry(key)
            entry.apply(record)
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalReadError(f"{segment} line {number} is not a journal record: {exc}") from exc


def resolve_journal_root(
    journal_path: ObjectStoragePath | str | None, output_path: ObjectStoragePath | str | None
) -> ObjectStoragePath:
    """Pick where journals live.

    In order: the operator's argument, ``[imagen] journal_root``, a ``_journal`` folder in the output
    folder (beside the file when the output is one ``.png`` file), ``$AIRFLOW_HOME/imagen/journal``.

    The output folder beats the local default because it is shared storage whenever the images are:
    a journal on one worker's disk is invisible to a retry on another worker. Only ``.png`` marks a
    file: a folder name may hold a dot (``catalog.v2``, ``2026.01``) and is still a folder.
    """
    if journal_path:
        return as_path(journal_path)
    from airflow.configuration import conf

    configured = conf.get("imagen", "journal_root", fallback=None)
    if configured:
        return as_path(configured)
    if output_path:
        out = as_path(output_path)
        return (out.parent if out.suffix.lower() == ".png" else out) / "_journal"
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return as_path(os.path.join(home, "imagen", "journal"))
