"""The exactly-once journal: what was about to be paid for, what was paid for, and what came of it.

Why storage and not XCom: XCom is wiped when a task retries, and ``execute`` and ``execute_complete``
may run on different workers. The journal lives on an :class:`ObjectStoragePath` (local disk, S3, GCS…)
keyed by ``dag_id / run_id / task_id / map_index`` — never ``try_number``, so every try of a task
instance reads the same journal and re-attaches to the tasks an earlier try paid for.

Invariants:
- an ``intent`` record for a request is durable BEFORE its paid POST is sent; its ``submitted`` record
  (the task id) is written right after. An intent with no id after it is an *unknown submit*: the POST
  may or may not have created a paid task. It is reported, and resubmitted only by explicit policy;
- records are only ever appended, in *segments*: one immutable file per write, named by time and a
  random suffix, written whole (a rename on local disk, one PUT on object stores). Two writers (a zombie
  try and its retry) cannot overwrite each other; reading folds every segment in name order;
- a request that was provably not created (401, 400, 402, a 429 or a refused connection after retries)
  gets a ``rejected`` record, which clears its intent so a later try may submit it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import quote

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch.storage import as_path, read_bytes, write_whole

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
#: Key of the records that describe a try of the task instance, not a request (no request key has a
#: ``/``: prompt ids with one are invalid).
TRY_KEY: Final = "/try"
_SEGMENT_SUFFIX: Final = ".jsonl"
#: Reads restarted when a segment vanishes mid-read (a concurrent compaction).
_LOAD_ATTEMPTS: Final = 5
#: Compact the journal into one snapshot when a read finds more segments than this.
DEFAULT_COMPACT_OVER: Final = 200


@dataclass
class JournalEntry:
    """Everything the journal knows about one request, folded from its records."""

    key: str
    #: Task ids received for this request; more than one only after an explicit resubmit.
    task_ids: list[str] = field(default_factory=list)
    #: True while the last intent has neither a task id nor a rejection after it.
    pending_intent: bool = False
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
    #: Set when a deadline passed while the task was still processing.
    timed_out_at: float | None = None
    #: POSTs whose outcome was unknown: each may have been charged.
    ambiguous_count: int = 0
    #: Why the last submit was rejected, and when (a rejection clears the intent).
    rejected_reason: str | None = None
    rejected_at: float | None = None
    #: Why mirroring the latest task's image failed after retries, when, and whether its URL expired.
    mirror_error: str | None = None
    mirror_failed_at: float | None = None
    expired: bool = False
    #: The failure cannot improve by asking again (expired URL, not an image): never retried.
    mirror_final: bool = False
    #: For :data:`TRY_KEY` only: the latest try's clock (started_at, deadline, budget).
    clock: dict[str, Any] | None = None

    @property
    def task_id(self) -> str | None:
        """Return the task id to follow: the latest one received."""
        return self.task_ids[-1] if self.task_ids else None

    @property
    def charged_submits(self) -> int:
        """Return how many POSTs for this request may have been charged and not refunded.

        Every task id counts, but the latest one not if it ended ``failed``/``not_found`` (refunded);
        every ambiguous POST counts; so does an intent a crash left without any answer.
        """
        refunded = 1 if self.status in ("failed", "not_found") else 0
        crashed = 1 if self.pending_intent and self.ambiguous_reason is None else 0
        return len(self.task_ids) - refunded + self.ambiguous_count + crashed

    @property
    def unknown_submit(self) -> bool:
        """Return whether a POST may have been paid for without our knowing its task id."""
        return self.pending_intent

    def apply(self, record: Mapping[str, Any]) -> None:
        """Fold one record into this entry."""
        kind = record["e"]
        if kind == "intent":
            self.pending_intent = True
            self.ambiguous_reason = None
            self.rejected_reason = self.rejected_at = None
        elif kind == "submitted":
            self.pending_intent = False
            if record["task_id"] not in self.task_ids:
                self.task_ids.append(record["task_id"])
            self.submitted_at = record.get("ts")
            # A new task starts with no outcome of its own.
            self.status = self.error_code = self.error_message = self.completed_at = self.mirrored = None
            self.timed_out_at = self.mirror_error = self.mirror_failed_at = None
            self.expired = self.mirror_final = False
        elif kind == "rejected":
            self.pending_intent = False
            self.rejected_reason = record.get("reason")
            self.rejected_at = record.get("ts")
        elif kind == "ambiguous":
            self.ambiguous_reason = record.get("reason")
            self.ambiguous_count += 1
        elif kind == "terminal":
            if record.get("task_id") == self.task_id:
                self.status = record["status"]
                self.error_code = record.get("error_code")
                self.error_message = record.get("error_message")
                self.completed_at = record.get("ts")
        elif kind == "mirrored":
            if record.get("task_id") == self.task_id:
                self.mirrored = record["image"]
                self.mirror_error = self.mirror_failed_at = None
        elif kind == "mirror_failed":
            if record.get("task_id") == self.task_id:
                self.mirror_error = record.get("reason")
                self.mirror_failed_at = record.get("ts")
                self.expired = bool(record.get("expired"))
                self.mirror_final = self.expired or bool(record.get("final"))
        elif kind == "try":
            self.clock = {k: v for k, v in record.items() if k not in ("e", "k", "ts")}
        elif kind == "timeout" and record.get("task_id") == self.task_id:
            self.timed_out_at = record.get("ts")


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
        self.path = as_path(root) / _part(dag_id) / _part(run_id) / _part(task_id) / f"map_{map_index}"

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

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> dict[str, JournalEntry]:
        """Fold every segment, oldest first, into one entry per request key.

        An absent journal is empty; an unreadable segment raises :class:`JournalReadError`. A segment
        that vanishes while we read (another pass compacted it into a snapshot) restarts the read, so
        no record is ever missed.
        """
        for _ in range(_LOAD_ATTEMPTS):
            segments = self._segments()
            try:
                texts = [(segment, self._read(segment)) for segment in segments]
            except FileNotFoundError:
                continue
            entries: dict[str, JournalEntry] = {}
            for segment, text in texts:
                _fold_text(entries, segment, text)
            if len(segments) > self.compact_over:
                self._compact(texts)
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

        The snapshot is written (whole) before any segment is deleted, and sorts right after the last
        segment it holds and before any later one, so the fold is unchanged for every reader.
        """
        last = texts[-1][0].name.removesuffix(_SEGMENT_SUFFIX)
        body = "".join(text if text.endswith("\n") else text + "\n" for _, text in texts)
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
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{_SEGMENT_SUFFIX}"
        write_whole(self.path / name, ("\n".join(lines) + "\n").encode("utf-8"))
        self.appended += 1


def record(kind: RecordKind, key: str, **fields: Any) -> dict[str, Any]:
    """Return one journal record of ``kind`` for request ``key``, stamped with the wall-clock time."""
    return {"e": kind, "k": key, "ts": time.time(), **fields}


def _part(value: str) -> str:
    """Return ``value`` as one safe path segment (no ``/``, no ``..``)."""
    quoted = quote(str(value), safe="-_.+=@,")
    return quoted if quoted not in (".", "..", "") else quoted.replace(".", "%2E") or "%00"


def _fold_text(entries: dict[str, JournalEntry], segment: ObjectStoragePath, text: str) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
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
