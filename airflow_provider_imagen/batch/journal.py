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
import dataclasses
import functools
import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal, cast, get_args

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch import fence
from airflow_provider_imagen.batch.fence import FencedError, Lease
from airflow_provider_imagen.batch.storage import (
    as_path,
    local_file,
    map_arrow_file,
    path_part,
    read_bytes,
    release_pages,
    write_whole,
    write_whole_from,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from airflow_provider_imagen.batch.keyindex import KeyIndex

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
#: Suffix of a state snapshot: the folded entries, one row per key, as an Arrow IPC file.
_STATE_SUFFIX: Final = ".arrow"
#: Schema-metadata keys of a state snapshot: what it holds, the tries' clocks, its format version.
_META_HOLDS: Final = b"imagen_journal_holds"
_META_TRIES: Final = b"imagen_journal_tries"
_META_VERSION: Final = b"imagen_journal_state_version"
STATE_VERSION: Final = 1
#: Live state snapshots, at most, after a compaction (see :func:`_levels_to_merge`).
MAX_LEVELS: Final = 12
#: Entries :meth:`JournalEntries.peek` reads between two releases of the levels' mapped pages.
_RELEASE_EVERY: Final = 2048
#: The row part of a packed (level, row) location.
_ROW_MASK: Final = (1 << 32) - 1
#: Rows per slice when levels merge (see :func:`_latest_parts`), and per record batch of a snapshot.
_MERGE_SLICE: Final = 4096


@functools.cache
def state_schema() -> pa.Schema:
    """Return the columns of a state snapshot, built on first use (pyarrow stays out of DAG parsing).

    ``entry`` is the whole entry (JSON, read only when a key is used); the others let a resume classify
    a settled key, and count its charge, without reading it.
    """
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("entry", pa.string(), nullable=False),
            pa.field("digest", pa.string()),
            #: ``done``, ``failed`` or ``moderated`` when nothing a try decides can change the key's fate.
            pa.field("settled", pa.string()),
            pa.field("charged", pa.int64(), nullable=False),
            #: The latest intent's time: a key whose attempts all predate a try was not paid in it.
            pa.field("attempted_max", pa.float64()),
        ]
    )


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

    def to_state(self) -> str:
        """Return this entry as one JSON object of its fields that differ from a fresh entry's."""
        fresh = _FRESH
        fields = {
            name: value for name, value in self.__dict__.items() if name != "key" and value != fresh[name]
        }
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_state(cls, key: str, state: str) -> JournalEntry:
        """Return the entry :meth:`to_state` wrote for ``key``."""
        entry = cls(key)
        entry.__dict__.update(json.loads(state))
        # JSON objects have string keys only: attempt ids are strings already, tuples came back as lists.
        return entry

    def settled(self) -> str | None:
        """Return the key's final category when no try's rules can change it, else ``None``.

        Ended and nothing left to do: completed and mirrored, moderated, failed or not found. Everything
        else (in flight, to mirror, unknown, rejected) depends on the try that reads it.
        """
        if not self.task_ids or self.unknown_submit:
            return None
        if self.status == "completed":
            return "done" if self.mirrored is not None else None
        if self.status == "failed":
            return "moderated" if self.error_code == 80006 else "failed"
        if self.status == "not_found":
            return "failed"
        return None


_FRESH: Final[dict[str, Any]] = {
    f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    for f in dataclasses.fields(JournalEntry)
}  # type: ignore[misc]


class JournalEntries(MutableMapping[str, JournalEntry]):
    """The journal folded: one entry per request key, read from its state snapshots only when used.

    Why lazy: a resume of a batch of 10^5 rows needs the entries of its window, not of every row. The
    rows of the state snapshots stay in Arrow arrays; an entry becomes a :class:`JournalEntry` when it
    is read (and stays one, so changes to it are kept). :meth:`settled` answers what a window index
    needs of every other key without building its entry.
    """

    def __init__(self) -> None:
        self._live: dict[str, JournalEntry] = {}
        #: Key → (level, row) in the state snapshots, packed as ``level << 32 | row``; a key's newest
        #: row comes first (see :class:`KeyIndex`: 16 bytes a row, the keys stay in the levels' columns).
        self._where: KeyIndex | None = None
        #: Keys deleted from the snapshots' rows (rare: a caller dropping an entry).
        self._deleted: set[str] = set()
        self._levels: list[pa.Table] = []
        #: Each level's key column, kept to confirm the index's matches.
        self._keys: list[pa.ChunkedArray] = []
        #: Columns of each level read into lists, each on first use (a stream's levels need none).
        self._columns: list[dict[str, list[Any]]] = []
        #: Entries built from the snapshots so far (tests count them: a resume builds O(window)).
        self.materialized = 0
        #: Entries :meth:`peek` read from the snapshots.
        self._peeked = 0

    def add_level(self, table: pa.Table) -> None:
        """Lay a state snapshot over the earlier ones: its rows replace theirs, key by key."""
        self._lay(table, forget_settled_only=False)

    def replace_levels(self, merged: int, table: pa.Table) -> None:
        """Put ``table`` in place of the newest ``merged`` levels it was merged from, then lay it over.

        Entries it holds as settled are dropped from memory (they are read again if ever used): a long
        stream keeps the entries of its window, not of every row it finished.
        """
        if merged:
            del self._levels[-merged:]
            del self._keys[-merged:]
            del self._columns[-merged:]
        self._lay(table, forget_settled_only=True)

    def _lay(self, table: pa.Table, *, forget_settled_only: bool) -> None:
        """Append ``table`` as the newest level and index its keys, a slice of them at a time."""
        import numpy as np

        from airflow_provider_imagen.batch.keyindex import SLICE, KeyIndex, key_hashes

        level = len(self._levels)
        self._levels.append(table)
        self._keys.append(table.column("key"))
        self._columns.append({})
        hashes = []
        for start in range(0, table.num_rows, SLICE):
            part = table.slice(start, SLICE)
            keys = part.column("key").to_pylist()
            hashes.append(key_hashes(keys, len(keys)))
            forget = (
                [k for k, v in zip(keys, part.column("settled").to_pylist(), strict=True) if v is not None]
                if forget_settled_only
                else keys
            )
            for key in forget:
                self._live.pop(key, None)
            if self._deleted:
                self._deleted.difference_update(keys)
        release_pages(table)  # the key and settled columns were read whole: give their pages back
        new = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.int64)
        values = np.arange(table.num_rows, dtype=np.int64) | (level << 32)
        if self._where is None:
            self._where = KeyIndex(new, values, self._key_at)
        else:
            old = self._where
            self._where = old.laid_over(new, values, (old.values >> 32) < level)

    def _key_at(self, packed: int) -> str:
        return str(self._keys[packed >> 32][packed & _ROW_MASK].as_py())

    def _locate(self, key: str) -> tuple[int, int] | None:
        """Return (level, row) of ``key``'s newest row in the snapshots, or ``None``."""
        if self._where is None or key in self._deleted:
            return None
        packed = self._where.get(key)
        return None if packed is None else (packed >> 32, packed & _ROW_MASK)

    def _located(self) -> Iterator[tuple[str, int, int]]:
        """Yield (key, level, row) of every key the snapshots hold (its newest row), level by level."""
        import numpy as np
        import pyarrow as pa

        from airflow_provider_imagen.batch.keyindex import SLICE

        index = self._where
        if index is None:
            return
        packed = index.values[index.first_values()]
        levels, rows = packed >> 32, packed & _ROW_MASK
        for level, column in enumerate(self._keys):
            chosen = np.sort(rows[levels == level])
            for start in range(0, len(chosen), SLICE):
                part = chosen[start : start + SLICE]
                keys = column.take(pa.array(part)).to_pylist()
                for key, row in zip(keys, part.tolist(), strict=True):
                    if key not in self._deleted:
                        yield key, level, row

    def _column(self, level: int, name: str) -> list[Any]:
        columns = self._columns[level]
        values = columns.get(name)
        if values is None:
            values = columns[name] = self._levels[level].column(name).to_pylist()
        return values

    def peek(self, key: str) -> JournalEntry | None:
        """Return the entry of ``key`` (``None`` if absent) without keeping it in memory when unread.

        For one look at every key (the manifest at a run's end): ``get`` would keep them all.
        """
        entry = self._live.get(key)
        if entry is not None:
            return entry
        where = self._locate(key)
        if where is None:
            return None
        self._peeked += 1
        if self._peeked % _RELEASE_EVERY == 0:
            # One look at every key reads every level's entries: pages read give way as it goes.
            for level in self._levels:
                release_pages(level)
        return JournalEntry.from_state(key, self._levels[where[0]].column("entry")[where[1]].as_py())

    def unsettled_items(self) -> Iterator[tuple[str, JournalEntry]]:
        """Yield the entries read so far and those a snapshot holds as not settled, reading only those.

        Settled keys (completed and mirrored, failed, moderated) owe nothing to a run's end: no
        override, nothing left to mirror.
        """
        yield from list(self._live.items())
        # Whether each row is settled, per level, without keeping the column (a run's end reads it once).
        unsettled = [
            [value is None for value in self._column(level, "settled")]
            if "settled" in self._columns[level]
            else self._levels[level].column("settled").is_null().to_pylist()
            for level in range(len(self._levels))
        ]
        for key, level, row in list(self._located()):
            if key not in self._live and unsettled[level][row]:
                yield key, self[key]

    def settled(self, key: str, digest: str | None) -> tuple[str, int] | None:
        """Return (category, charged submits) of a key settled in a snapshot and not read since.

        ``None`` when the key is read already, absent, not settled, or of another request than
        ``digest``: the caller then reads the entry and decides for itself.
        """
        if key in self._live:
            return None
        where = self._locate(key)
        if where is None:
            return None
        level, row = where
        category = self._column(level, "settled")[row]
        stored = self._column(level, "digest")[row]
        if category is None or (digest is not None and stored is not None and stored != digest):
            return None
        return category, int(self._column(level, "charged")[row])

    def charged_total(self) -> int:
        """Return the charged submits of every entry, reading only those already read."""
        total = sum(e.charged_submits for e in self._live.values())
        for key, level, row in self._located():
            if key not in self._live:
                total += int(self._column(level, "charged")[row])
        return total

    def attempted_since(self, since: float) -> Iterator[JournalEntry]:
        """Yield the entries with an intent written at or after ``since`` (the others cost nothing since)."""
        for entry in list(self._live.values()):
            if any(at >= since for at in entry.attempted_at.values()):
                yield entry
        for key, level, row in list(self._located()):
            if key in self._live:
                continue
            at = self._levels[level].column("attempted_max")[row].as_py()
            if at is not None and at >= since:
                yield self[key]

    def __getitem__(self, key: str) -> JournalEntry:
        entry = self._live.get(key)
        if entry is not None:
            return entry
        where = self._locate(key)
        if where is None:
            raise KeyError(key)
        state = self._levels[where[0]].column("entry")[where[1]].as_py()
        entry = self._live[key] = JournalEntry.from_state(key, state)
        self.materialized += 1
        return entry

    def __setitem__(self, key: str, entry: JournalEntry) -> None:
        self._live[key] = entry

    def __delitem__(self, key: str) -> None:
        found = self._live.pop(key, None) is not None
        stored = self._locate(key) is not None
        if stored:
            self._deleted.add(key)
        if not stored and not found:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._live or (isinstance(key, str) and self._locate(key) is not None)

    def __iter__(self) -> Iterator[str]:
        yield from self._live
        yield from (key for key, _, _ in list(self._located()) if key not in self._live)

    def __len__(self) -> int:
        return len(self._live) + sum(1 for key, _, _ in self._located() if key not in self._live)

    def state_table(self, keys: Iterable[str]) -> pa.Table:
        """Return a state snapshot of ``keys`` (each read, so it holds every record folded into it)."""
        return _state_table([self[key] for key in keys])


def _state_table(entries: list[JournalEntry]) -> pa.Table:
    import pyarrow as pa

    rows = {
        "key": [e.key for e in entries],
        "entry": [e.to_state() for e in entries],
        "digest": [e.digest for e in entries],
        "settled": [e.settled() for e in entries],
        "charged": [e.charged_submits for e in entries],
        "attempted_max": [max(e.attempted_at.values(), default=None) for e in entries],
    }
    return pa.Table.from_pydict(rows, schema=state_schema())


@dataclass
class _Folded:
    """What one read folded into ``entries`` and which files hold it, kept in step by compactions."""

    entries: JournalEntries
    #: The live state snapshots, oldest first, as laid into ``entries``.
    levels: list[tuple[ObjectStoragePath, pa.Table]]
    #: Segments folded into ``entries`` that no snapshot holds yet, and the keys they name.
    texts: list[ObjectStoragePath]
    changed: set[str]
    #: Files a snapshot holds that were still there (a compactor stopped before deleting them).
    stale: set[str]


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
        #: State-snapshot rows this object's compactions wrote (tests count them).
        self.compacted_rows = 0
        #: The next segment's sequence number; ``None`` until the journal's segments were listed.
        self._next_seq: int | None = None
        #: The try this object writes for; every paid POST checks it first (see :meth:`claim`).
        self.lease: Lease | None = None
        #: Each try's clock (started_at, deadline, budget…) by its lease epoch, as of the last read.
        self.tries: dict[int, dict[str, Any]] = {}
        #: What the last read folded and left as it is, so that this object's own later segments can
        #: be compacted without reading the journal again (see :meth:`compact_appended`).
        self._folded: _Folded | None = None
        #: Segments written by this object since its last read or compaction, with the keys they name.
        self._mine: list[tuple[ObjectStoragePath, set[str]]] = []
        self._lock = threading.Lock()
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

    def load(self) -> JournalEntries:
        """Fold the journal, oldest first, into one entry per request key.

        A resume reads the state snapshots (Arrow arrays; an entry is built only when it is used) and
        then folds the few segments written after them. An absent journal is empty; an unreadable
        segment raises :class:`JournalReadError`. A file that vanishes while we read (another pass
        compacted it) restarts the read, so no record is ever missed; what a later snapshot holds is
        skipped, so none counts twice.
        """
        import pyarrow as pa

        for _ in range(_LOAD_ATTEMPTS):
            files = self._segments()
            try:
                read = [(path, self._read_any(path)) for path in files]
            except FileNotFoundError:
                continue
            present = {path.name for path in files}
            held: set[str] = set()
            for _, content in read:
                held.update(_holds_of(content))
            live = [(path, content) for path, content in read if path.name not in held]
            entries = JournalEntries()
            tries: dict[int, dict[str, Any]] = {}
            levels = [(path, c) for path, c in live if isinstance(c, pa.Table)]
            texts = [(path, c) for path, c in live if isinstance(c, str)]
            for _, table in levels:
                entries.add_level(table)
                tries.update(_tries_of(table))
            changed: set[str] = set()
            for path, text in texts:
                changed.update(_fold_text(entries, tries, path, text))
            self.tries = tries
            self._next_seq = max(self._next_seq or 0, *(_seq(p.name) + 1 for p in files), 1)
            folded = _Folded(entries, levels, [p for p, _ in texts], changed, held & present)
            if len(files) > self.compact_over:
                self._compact_into(folded, texts)
            # A record snapshot of the older format names what it holds in its text: only a full read
            # (which folds it into a state snapshot) keeps those names.
            self._folded = None if any(_holds(text) for _, text in texts) else folded
            with self._lock:
                self._mine = []
                self.appended = 0
            return entries
        raise JournalReadError(f"{self.path}: segments kept vanishing while reading ({_LOAD_ATTEMPTS} tries)")

    def _read_any(self, path: ObjectStoragePath) -> str | pa.Table:
        """Return a segment's text, or a state snapshot's table."""
        import pyarrow as pa

        if not path.name.endswith(_STATE_SUFFIX):
            return self._read(path)
        name = local_file(path)
        if name is None:
            try:
                source = pa.BufferReader(read_bytes(path))
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise JournalReadError(f"cannot read journal snapshot {path}: {exc}") from exc
        try:
            # Mapped on local disk: a level's entries cost memory only once read (see _written_level).
            table = map_arrow_file(name) if name is not None else pa.ipc.open_file(source).read_all()
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise JournalReadError(f"journal snapshot {path} is not a readable Arrow file: {exc}") from exc
        if not set(state_schema().names) <= set(table.schema.names):
            raise JournalReadError(f"journal snapshot {path} lacks columns of {state_schema().names}")
        return table

    @staticmethod
    def _read(segment: ObjectStoragePath) -> str:
        try:
            return read_bytes(segment).decode("utf-8")
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise JournalReadError(f"cannot read journal segment {segment}: {exc}") from exc

    def compact_appended(self, entries: JournalEntries) -> bool:
        """Fold the segments this object wrote since its last read into a state snapshot, reading none.

        Why: a batch streaming on one worker writes a few segments per image; folding them with a full
        read every few hundred writes costs O(rows) each time, O(rows²) over a run. The records of its
        own segments are already in ``entries`` (the caller folded each one it wrote), so the snapshot
        is written from memory, exactly as :meth:`load` would write it from the files.

        Returns ``False``, doing nothing, unless ``entries`` is what the last read returned and the
        journal holds only files that read found or this object wrote since: any other file (another
        writer's, or a compaction by another reader) needs a full read, which compacts it all.
        """
        own = self._own_since_read(entries)
        if own is None:
            return False
        folded, mine, changed = own
        texts = [(p, "") for p in folded.texts] + [(p, "") for p, _ in mine]
        folded.texts = [p for p, _ in texts]
        folded.changed = changed
        self._compact_into(folded, texts)
        with self._lock:
            del self._mine[: len(mine)]
            self.appended = len(self._mine)
        return True

    def holds_only(self, entries: JournalEntries) -> bool:
        """Return whether ``entries`` holds the whole journal: its last read and this object's writes since.

        ``False`` when another writer's file is there (or ``entries`` is not what the last read
        returned): only a read of the journal then says everything.
        """
        return self._own_since_read(entries) is not None

    def _own_since_read(
        self, entries: JournalEntries
    ) -> tuple[_Folded, list[tuple[ObjectStoragePath, set[str]]], set[str]] | None:
        """Return what the last read folded, this object's segments since and the keys they name.

        ``None`` unless the folder holds exactly those files and ``entries`` has every key they name.
        """
        folded = self._folded
        if folded is None or folded.entries is not entries:
            return None
        with self._lock:
            mine = list(self._mine)
        changed = set(folded.changed)
        for _, keys in mine:
            changed.update(keys)
        if any(key not in entries for key in changed):
            return None  # a record the caller never folded in: only the files say what happened
        expected = {p.name for p, _ in folded.levels} | {p.name for p in folded.texts} | folded.stale
        expected |= {p.name for p, _ in mine}
        if {p.name for p in self._segments()} != expected:
            return None
        return folded, mine, changed

    def _compact_into(self, folded: _Folded, texts: list[tuple[ObjectStoragePath, str]]) -> None:
        """Compact what ``folded`` left as it is; keep ``folded`` and its entries in step with the files."""
        written = self._compact(
            folded.entries, self.tries, folded.levels, texts, folded.changed, folded.stale
        )
        if written is not None:
            path, table, merged = written
            folded.levels = [*folded.levels[: len(folded.levels) - merged], (path, table)]
            folded.entries.replace_levels(merged, table)
        folded.texts, folded.changed, folded.stale = [], set(), set()

    def _compact(
        self,
        entries: JournalEntries,
        tries: Mapping[int, Mapping[str, Any]],
        levels: list[tuple[ObjectStoragePath, pa.Table]],
        texts: list[tuple[ObjectStoragePath, str]],
        changed: set[str],
        stale: set[str],
    ) -> tuple[ObjectStoragePath, pa.Table, int] | None:
        """Fold the segments read into a state snapshot: a new level of the keys they changed.

        A new level holds, for each key the segments name, its whole entry as folded now; earlier
        levels stay as they are, so a compaction writes in proportion to what changed since the last
        one. Files a snapshot holds that are still there (a compactor stopped before deleting them)
        are deleted too. The newest levels merge into the new one (each key's latest row) when they
        are not at least twice its size, as in a log-structured merge tree: levels shrink
        geometrically from the oldest, a key's row is rewritten O(log(keys / changes)) times over a
        run, and a read meets a few levels, never more than :data:`MAX_LEVELS` plus the number of
        doublings.

        The snapshot is written (whole) before anything is deleted, sorts after the last file it holds
        (and, among snapshots after the same file, after those holding fewer), and names in its schema
        metadata everything it holds that is still there: a reader that finds both skips what it holds,
        and a key's row in a snapshot is its whole state, so two compactors writing the same level at
        once change nothing by it.
        """
        import pyarrow as pa

        folded = [path for path, _ in texts]
        table = entries.state_table(sorted(changed))
        merged = _levels_to_merge([t.num_rows for _, t in levels], table.num_rows)
        sources: list[pa.Table] = [table]
        files: list[str | None] = [None]
        if merged:
            sources = [*(t for _, t in levels[-merged:]), table]
            files = [*(local_file(path) for path, _ in levels[-merged:]), None]
            folded = [path for path, _ in levels[-merged:]] + folded
        if not folded:
            return None
        present = {path.name for path in folded} | stale
        holds = set(stale)
        for path in folded:
            holds.add(path.name)
        for _, content in [*texts, *levels]:
            holds.update(_holds_of(content))
        holds &= present
        meta = {
            _META_HOLDS: json.dumps(sorted(holds), separators=(",", ":")).encode(),
            _META_TRIES: json.dumps({str(k): v for k, v in tries.items()}, separators=(",", ":")).encode(),
            _META_VERSION: str(STATE_VERSION).encode(),
        }
        schema = state_schema().with_metadata(meta)
        last = max(path.name.split("~", 1)[0].removesuffix(_SEGMENT_SUFFIX) for path in folded)
        name = f"{last}~{len(holds):010d}-{uuid.uuid4().hex[:8]}{_STATE_SUFFIX}"
        dest = self.path / name
        on_disk = local_file(dest) is not None
        parts: list[pa.Table] = []

        def fill(handle: BinaryIO) -> None:
            # Written a slice at a time: the merged level is never held whole beside the levels it
            # comes from (on local disk; an object store gets one PUT of it from memory).
            parts.clear()
            with pa.ipc.new_file(handle, schema) as writer:
                for part in _latest_parts(sources, files):
                    writer.write_table(part, max_chunksize=_MERGE_SLICE)
                    if not on_disk:
                        parts.append(part)

        write_whole_from(dest, fill)
        table = self._written_level(dest, sources, parts, meta)
        self.compacted_rows += table.num_rows
        for path in [*folded, *(self.path / name for name in sorted(stale))]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return dest, table, merged

    @staticmethod
    def _written_level(
        dest: ObjectStoragePath, sources: list[pa.Table], parts: list[pa.Table], meta: dict[bytes, bytes]
    ) -> pa.Table:
        """Return the level just written to ``dest``: mapped from the file on local disk, else in memory.

        Mapped, a level's rows cost no memory of the process until they are read (a run's levels hold
        a whole entry per row, and a stream reads the entries of its window only).
        """
        import pyarrow as pa

        name = local_file(dest)
        if name is not None:
            try:
                return map_arrow_file(name)
            except FileNotFoundError:
                # Another reader compacted it away already: the rows are the same, built from memory.
                parts = list(_latest_parts(sources))
        if not parts:
            return state_schema().empty_table().replace_schema_metadata(meta)
        return pa.concat_tables(parts).replace_schema_metadata(meta)

    def _segments(self) -> list[ObjectStoragePath]:
        try:
            if not self.path.exists():
                return []
            found = [p for p in self.path.iterdir() if p.name.endswith((_SEGMENT_SUFFIX, _STATE_SUFFIX))]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda p: p.name)

    # -- writing -------------------------------------------------------------------------------

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write ``records`` as one new immutable segment, durable when this returns."""
        lines = []
        keys: set[str] = set()
        for record in records:
            if record.get("e") not in RECORD_KINDS:
                raise ValueError(f"unknown journal record kind {record.get('e')!r}")
            if record["e"] != "try":
                keys.add(record["k"])
            lines.append(json.dumps(dict(record), ensure_ascii=False, separators=(",", ":")))
        if not lines:
            return
        if self._next_seq is None:  # never listed: continue after what is there
            self._next_seq = max((_seq(p.name) + 1 for p in self._segments()), default=1)
        with self._lock:
            name = f"{self._next_seq:020d}-{_WRITER}-{uuid.uuid4().hex[:8]}{_SEGMENT_SUFFIX}"
            self._next_seq += 1
        path = self.path / name
        write_whole(path, ("\n".join(lines) + "\n").encode("utf-8"))
        with self._lock:
            self._mine.append((path, keys))
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
    """Return the names a record snapshot's first line says it holds (none for a plain segment).

    Record snapshots (a header, then the records of the segments they replaced) are what compaction
    wrote before state snapshots: they are still read, and folded into the next state snapshot.
    """
    if not text.startswith(_HOLDS_PREFIX):
        return []
    first = text.split("\n", 1)[0]
    try:
        return list(json.loads(first)["names"])
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalReadError(f"a journal snapshot's header is unreadable: {exc}") from exc


def _holds_of(content: str | pa.Table) -> list[str]:
    """Return the names a snapshot of either kind holds (none for a plain segment)."""
    if isinstance(content, str):
        return _holds(content)
    raw = (content.schema.metadata or {}).get(_META_HOLDS)
    try:
        return list(json.loads(raw)) if raw else []
    except ValueError as exc:
        raise JournalReadError(f"a journal snapshot's list of what it holds is unreadable: {exc}") from exc


def _tries_of(table: pa.Table) -> dict[int, dict[str, Any]]:
    raw = (table.schema.metadata or {}).get(_META_TRIES)
    return {int(k): dict(v) for k, v in json.loads(raw).items()} if raw else {}


def _levels_to_merge(sizes: list[int], new: int) -> int:
    """Return how many of the newest levels (rows per level, oldest first) merge into a new one.

    A level joins the merge unless it holds more than twice the rows merged so far, so sizes halve (at
    least) from the oldest level to the newest; past :data:`MAX_LEVELS` levels the newest pair merges
    as well, which keeps reads short when changes come in bursts of equal size.
    """
    merged, rows = 0, new
    while merged < len(sizes) and sizes[-1 - merged] <= 2 * rows:
        rows += sizes[-1 - merged]
        merged += 1
    if len(sizes) - merged + 1 > MAX_LEVELS:
        merged = len(sizes) - MAX_LEVELS + 1
    return merged


def _latest_parts(tables: list[pa.Table], files: list[str | None] | None = None) -> Iterator[pa.Table]:
    """Yield the rows of ``tables`` (oldest first) with, for each key, only its latest row, in order.

    The rows come in slices of at most :data:`_MERGE_SLICE`, so merging large levels holds one slice
    of the result at a time; the order is that of the rows in ``tables`` one after the other. A table
    mapped from a local file (``files``, one name or ``None`` per table) has its rows read from the
    file a batch at a time (see :func:`_batches_of`).
    """
    import numpy as np
    import pyarrow as pa

    # Which rows are their key's latest, found in Arrow (the keys dictionary-encoded, one small integer
    # a row) rather than in a set of every key as Python strings.
    chunks = [chunk for table in tables for chunk in table.column("key").chunks]
    codes = pa.chunked_array(chunks, type=pa.string()).combine_chunks().dictionary_encode().indices.to_numpy()
    del chunks
    total = len(codes)
    latest = np.zeros(total, dtype=bool)
    if total:
        _, first_from_end = np.unique(codes[::-1], return_index=True)
        latest[total - 1 - first_from_end] = True
    del codes
    keep: list[np.ndarray] = []
    start = 0
    for table in tables:
        keep.append(np.flatnonzero(latest[start : start + table.num_rows]))
        start += table.num_rows
    del latest
    schema = state_schema()
    for table, name, rows in zip(tables, files or [None] * len(tables), keep, strict=True):
        if not len(rows):
            continue
        # Batch by batch: ``take`` on a table of several batches first copies each column whole.
        offset, at = 0, 0
        for batch in _batches_of(table, name):
            end = offset + batch.num_rows
            stop = int(rows.searchsorted(end, side="left"))
            if stop > at:
                local = pa.array(rows[at:stop] - offset, type=pa.int64())
                part = pa.Table.from_batches([batch.take(local)])
                yield part.select(schema.names).cast(schema).replace_schema_metadata(None)
            offset, at = end, stop


def _batches_of(table: pa.Table, name: str | None) -> Iterator[pa.RecordBatch]:
    """Yield the rows of ``table`` a batch at a time, read from ``name`` when it is the file it maps.

    Why read the file again: rows read through the mapping stay in the process's resident memory
    until the level is dropped, so a merge would hold every level it reads at once; a batch read from
    the file is freed once taken from. A file gone meanwhile (another reader compacted it) is read
    through the mapping, which stays valid.
    """
    import pyarrow as pa

    if name is not None:
        try:
            reader = pa.ipc.open_file(pa.OSFile(name))
        except FileNotFoundError:
            pass
        else:
            # The same rows in the same order: a snapshot file is never changed once named.
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
    yield from table.to_batches(max_chunksize=_MERGE_SLICE)


def _clock_of(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("e", "k", "ts", "epoch")}


def _fold_text(
    entries: MutableMapping[str, JournalEntry],
    tries: dict[int, dict[str, Any]],
    segment: ObjectStoragePath,
    text: str,
) -> set[str]:
    """Fold a segment's records into ``entries``; return the keys they touched."""
    keys: set[str] = set()
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
            keys.add(key)
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalReadError(f"{segment} line {number} is not a journal record: {exc}") from exc
    return keys


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
