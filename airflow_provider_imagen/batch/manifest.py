"""The manifest: one Parquet row per requested image, saying what became of it and what it cost.

Why: a batch run's result is too big for XCom, and users need one table to join back
to their prompts, to find the images, and to reconcile the bill. XCom and the Asset event carry only the
manifest's URI, its counts and its credits.

Invariants:
- the schema lives here and only here (:data:`MANIFEST_SCHEMA`, version :data:`SCHEMA_VERSION` in the
  Parquet metadata); changing a field is a deliberate, versioned act, and a test pins it;
- every row's ``status`` is one of :data:`~airflow_provider_imagen.batch.status.STATUSES` (the one
  vocabulary, in :mod:`airflow_provider_imagen.batch.status`); the writer refuses anything else;
- a row's ``credits`` are 46 × the POSTs of its request that may have been charged and not refunded
  (:attr:`~airflow_provider_imagen.batch.journal.JournalEntry.charged_submits`), whenever they were
  paid: so the manifest's total is what the API charged, including images paid for and lost, and is
  higher, never lower, only where a POST's fate is unknown. Without such extra POSTs a row's credits
  are :func:`credits_for` its status;
- a manifest is written whole or not at all (:func:`write_whole`): readers never see half a file;
- its path depends only on the task instance's identity, never on the try. A later try, or a rerun
  that reuses the run id, *merges* into it (:func:`merge_rows`): its rows replace those of the same
  image, and the others stay, so a manifest never loses a row that names a paid image.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.parquet as pq
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import MODERATION_CODE
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.batch.journal import JournalEntry
from airflow_provider_imagen.batch.specs import ImageSpec
from airflow_provider_imagen.batch.status import (  # noqa: F401 - the vocabulary, where users found it
    CHARGED_STATUSES,
    COMPLETED,
    DOWNLOAD_FAILED,
    EXPIRED,
    FAILED,
    INVALID,
    MODERATED,
    NOT_FOUND,
    NOT_SUBMITTED,
    REJECTED,
    SKIPPED_BUDGET,
    STATUSES,
    TIMEOUT,
    UNKNOWN_SUBMIT,
    WRONG_SIZE,
    ManifestStatus,
    check_status,
    credits_for,
)
from airflow_provider_imagen.batch.storage import as_path, path_part, read_bytes, write_whole
from airflow_provider_imagen.batch.table import is_dataframe

if TYPE_CHECKING:
    import pandas as pd

#: Version of :data:`MANIFEST_SCHEMA`; bump it with every change to the fields.
SCHEMA_VERSION: Final = 1
#: Parquet schema-metadata key holding :data:`SCHEMA_VERSION`.
SCHEMA_VERSION_KEY: Final = b"imagen_manifest_schema_version"

_UTC: Final = dt.timezone.utc
_TIMESTAMP: Final = pa.timestamp("us", tz="UTC")

#: One row per requested image. Nullable unless marked ``nullable=False``.
MANIFEST_SCHEMA: Final = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("variation", pa.int32(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("size", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.int64()),
        pa.field("error_message", pa.string()),
        #: The reAPI task id (``task_…``), not Airflow's.
        pa.field("task_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("bytes", pa.int64()),
        pa.field("credits", pa.int64(), nullable=False),
        pa.field("submitted_at", _TIMESTAMP),
        pa.field("completed_at", _TIMESTAMP),
        #: 0-based position of the row in the input table.
        pa.field("row", pa.int64()),
        pa.field("dag_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("airflow_task_id", pa.string()),
        pa.field("map_index", pa.int32()),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
#: The column names, in schema order.
MANIFEST_COLUMNS: Final[tuple[str, ...]] = tuple(MANIFEST_SCHEMA.names)


@dataclass(frozen=True)
class RunIdentity:
    """The task instance a manifest belongs to: it names the file and fills four columns."""

    dag_id: str
    run_id: str
    airflow_task_id: str
    #: ``-1`` for a task that is not mapped.
    map_index: int = -1

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> RunIdentity:
        """Return the identity of the task instance running in ``context``."""
        ti = context["ti"]
        map_index = getattr(ti, "map_index", None)
        return cls(
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            airflow_task_id=ti.task_id,
            map_index=-1 if map_index is None else int(map_index),
        )


# -- rows --------------------------------------------------------------------------------------------


def manifest_row(
    spec: ImageSpec,
    entry: JournalEntry | None,
    *,
    identity: RunIdentity,
    override_status: str | None = None,
    override_reason: str | None = None,
) -> dict[str, Any]:
    """Return the manifest row of one requested image, from its spec and its folded journal entry.

    The status, first rule that applies wins:

    1. the spec is invalid → ``invalid`` (the reason as ``error_message``);
    2. ``override_status`` → that status: the caller knows what the journal cannot say
       (``skipped_budget``, ``expired``, ``download_failed``…);
    3. the last POST's outcome is unknown → ``unknown_submit``;
    4. ``completed`` and mirrored → ``completed``; completed but not mirrored → ``download_failed``
       (paid, and a later try may still mirror it while the URL lives);
    5. ``failed`` with code 80006 → ``moderated``; other ``failed`` → ``failed``;
    6. ``not_found`` → ``not_found``;
    7. a task id with no outcome (deadline passed, or the run ended first) → ``timeout``.

    :raises ValueError: the spec is valid but was never submitted (no entry, or an entry whose submit
        was provably rejected) and no ``override_status`` says why. Guessing would put a wrong status
        and a wrong price in the user's bill, so the caller must decide.
    """
    mirrored: Mapping[str, Any] = {}
    error_code: int | None = None
    error_message: str | None = None
    earlier = entry if entry is not None and not entry.matches(spec.digest) else None
    if earlier is not None:
        entry = None  # the journal's request is not this spec's: nothing of it describes this row
    if not spec.valid:
        status: str = INVALID
        error_message = spec.invalid_reason
        entry = earlier = None
    elif override_status is not None:
        check_status(override_status)
        status = override_status
        if entry is not None:
            error_code, error_message = entry.error_code, entry.error_message
            mirrored = entry.mirrored or {}
        error_message = override_reason or error_message
    elif entry is None or (not entry.unknown_submit and entry.task_id is None):
        raise ValueError(
            f"request {spec.key!r} (row {spec.row}) was never submitted and no override_status says why "
            "(e.g. 'skipped_budget'); refusing to guess its status and cost"
        )
    elif entry.unknown_submit:
        status = UNKNOWN_SUBMIT
        error_message = entry.ambiguous_reason or "the submit's outcome is unknown; assumed charged"
    elif entry.status == "completed":
        if entry.mirrored and entry.mismatch:
            status, mirrored, error_message = WRONG_SIZE, entry.mirrored, entry.mismatch
        elif entry.mirrored:
            status, mirrored = COMPLETED, entry.mirrored
        else:
            status = DOWNLOAD_FAILED
            error_message = entry.mirror_error or "completed but not mirrored to storage yet"
    elif entry.status == "failed":
        status = MODERATED if entry.error_code == MODERATION_CODE else FAILED
        error_code, error_message = entry.error_code, entry.error_message
    elif entry.status == "not_found":
        status = NOT_FOUND
        error_code, error_message = entry.error_code, entry.error_message
    else:
        status = TIMEOUT
        error_message = "still processing when the run ended"
        if entry.timed_out_at is not None:
            when = _timestamp(entry.timed_out_at)
            error_message = f"still processing when the deadline passed ({when:%Y-%m-%d %H:%M:%S} UTC)"
    source = entry or earlier
    credits = CREDITS_PER_IMAGE * source.charged_submits if source is not None else credits_for(status)
    replaced = source.replaced if source is not None else []
    if earlier is not None:
        replaced = [*replaced, {"task_id": earlier.task_id, "image_uri": (earlier.mirrored or {}).get("uri")}]
    extra = credits - credits_for(status)
    if extra > 0 and not replaced:
        # A POST whose fate is unknown (a crash, or a resubmit by consent) is billed beside this row's own.
        paid = (
            f"{extra // CREDITS_PER_IMAGE} other POST(s) of this request may have been paid ({extra} credits)"
        )
        error_message = f"{error_message}; {paid}" if error_message else paid
    if replaced:
        old = replaced[-1]
        where = f", its image stays at {old['image_uri']}" if old.get("image_uri") else ""
        note = f"the request changed since task {old.get('task_id') or '(unknown)'} was paid for{where}"
        error_message = f"{error_message}; {note}" if error_message else note
    return {
        "prompt_id": spec.prompt_id,
        "variation": spec.variation,
        "prompt": spec.prompt,
        "size": spec.size,
        "status": status,
        "error_code": error_code,
        "error_message": error_message,
        "task_id": entry.task_id if entry is not None else None,
        "image_uri": mirrored.get("uri"),
        "sha256": mirrored.get("sha256"),
        "width": mirrored.get("width"),
        "height": mirrored.get("height"),
        "bytes": mirrored.get("size_bytes"),
        "credits": credits,
        "submitted_at": _timestamp(entry.submitted_at) if entry is not None else None,
        "completed_at": _timestamp(entry.completed_at) if entry is not None else None,
        "row": spec.row,
        "dag_id": identity.dag_id,
        "run_id": identity.run_id,
        "airflow_task_id": identity.airflow_task_id,
        "map_index": identity.map_index,
    }


def _timestamp(epoch: float | None) -> dt.datetime | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, tz=_UTC)


# -- writing and reading -----------------------------------------------------------------------------


def merge_rows(rows: Iterable[Mapping[str, Any]], dest: ObjectStoragePath | str) -> list[Mapping[str, Any]]:
    """Return ``rows`` plus every row of the manifest already at ``dest`` that they do not replace.

    A row replaces the earlier row of the same image (prompt id, size, variation). A later try of the
    task, or a rerun that reuses the run id with a smaller table (only the rows that changed), so never
    writes a manifest that forgets an image an earlier one listed and paid for.
    """
    rows = list(rows)
    try:
        data = read_bytes(as_path(dest))
    except FileNotFoundError:
        return rows
    earlier = pq.ParquetFile(pa.BufferReader(data)).read().to_pylist()
    mine = {(row["prompt_id"], row["size"], row["variation"]) for row in rows}
    known = set(MANIFEST_COLUMNS)
    kept = [
        {k: v for k, v in row.items() if k in known}
        for row in earlier
        if (row.get("prompt_id"), row.get("size"), row.get("variation")) not in mine
    ]
    return [*rows, *kept]


def manifest_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Return ``rows`` as an Arrow table with :data:`MANIFEST_SCHEMA`, after checking them.

    A missing nullable field is null; an unknown field, an unknown status or a null in a required
    field raises :class:`ValueError`.
    """
    rows = list(rows)
    known = set(MANIFEST_COLUMNS)
    for number, row in enumerate(rows):
        if not row.keys() <= known:
            raise ValueError(f"manifest row {number} has unknown field(s) {sorted(set(row) - known)}")
    statuses = [row.get("status") for row in rows]
    for number, status in enumerate(statuses):
        if status not in STATUSES:
            raise ValueError(
                f"manifest row {number} has unknown status {status!r}; expected one of {', '.join(STATUSES)}"
            )
    arrays = []
    for field in MANIFEST_SCHEMA:
        values = statuses if field.name == "status" else [row.get(field.name) for row in rows]
        try:
            array = pa.array(values, type=field.type)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ValueError(f"manifest column {field.name!r} ({field.type}): {exc}") from exc
        if not field.nullable and array.null_count:
            raise ValueError(f"manifest column {field.name!r} must not be null ({array.null_count} nulls)")
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def write_manifest(rows: Iterable[Mapping[str, Any]], dest: ObjectStoragePath | str) -> str:
    """Write the manifest to ``dest`` whole (never half a file) and return its URI.

    The file is built in memory first: a manifest row is ~200 bytes, so even a million rows fit, and
    one whole write is what makes it atomic on object stores.
    """
    table = manifest_table(rows)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    path = as_path(dest)
    write_whole(path, buffer.getvalue().to_pybytes())
    return str(path)


@dataclass(frozen=True)
class WrittenManifest:
    """What :func:`write_manifest_stream` wrote: where, and the counts a caller reports."""

    uri: str
    #: Every status with its number of rows (zeros included), plus ``total``.
    counts: dict[str, int]
    credits: int
    #: Rows given to the writer; the rest of ``counts["total"]`` was kept from an earlier manifest.
    written: int


#: Rows per Parquet row group when a manifest is streamed: the rows in memory at once, at most.
STREAM_ROWS: Final = 2_000


def write_manifest_stream(
    rows: Iterable[Mapping[str, Any]], dest: ObjectStoragePath | str, *, chunk: int = STREAM_ROWS
) -> WrittenManifest:
    """Write ``rows``, then the rows of the manifest at ``dest`` they do not replace, as one file.

    The same file :func:`merge_rows` and :func:`write_manifest` would write, built a row group at a
    time: a run of 10^5 rows holds ``chunk`` row dicts at once, not all of them. The compressed file is
    still assembled in memory and written whole (one PUT), so no reader sees half a manifest.
    """
    import pyarrow.compute as pc

    path = as_path(dest)
    try:
        earlier_bytes: bytes | None = read_bytes(path)
    except FileNotFoundError:
        earlier_bytes = None
    counts = dict.fromkeys(STATUSES, 0)
    credits = written = 0
    mine: set[tuple[Any, Any, Any]] = set()
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, MANIFEST_SCHEMA, compression="zstd") as writer:

        def flush(part: list[Mapping[str, Any]]) -> None:
            nonlocal credits, written
            table = manifest_table(part)
            for row in part:
                counts[row["status"]] += 1
                credits += int(row["credits"])
                if earlier_bytes is not None:  # only to tell which earlier rows these replace
                    mine.add((row["prompt_id"], row["size"], row["variation"]))
            written += len(part)
            writer.write_table(table)

        part: list[Mapping[str, Any]] = []
        for row in rows:
            part.append(row)
            if len(part) >= chunk:
                flush(part)
                part = []
        if part or not written:
            flush(part)
        if earlier_bytes is not None:
            earlier = pq.ParquetFile(pa.BufferReader(earlier_bytes)).read()
            keys = zip(
                earlier.column("prompt_id").to_pylist(),
                earlier.column("size").to_pylist(),
                earlier.column("variation").to_pylist(),
                strict=True,
            )
            kept = earlier.filter(pa.array([k not in mine for k in keys], type=pa.bool_()))
            if kept.num_rows:
                kept = pa.Table.from_arrays(
                    [
                        kept.column(f.name)
                        if f.name in kept.schema.names
                        else pa.nulls(kept.num_rows, f.type)
                        for f in MANIFEST_SCHEMA
                    ],
                    schema=MANIFEST_SCHEMA,
                )
                for status in kept.column("status").to_pylist():
                    check_status(status)
                    counts[status] += 1
                credits += int(pc.sum(kept.column("credits")).as_py() or 0)
                writer.write_table(kept)
    counts["total"] = sum(counts.values())
    write_whole(path, sink.getvalue().to_pybytes())
    return WrittenManifest(uri=str(path), counts=counts, credits=credits, written=written)


def read_manifest(path: ObjectStoragePath | str) -> pd.DataFrame:
    """Return a manifest as a DataFrame; integer columns keep nulls as ``<NA>`` instead of becoming floats.

    ``df.attrs["schema_version"]`` holds the version it was written with (``None`` if absent).
    """
    from airflow_provider_imagen._extras import require_extra

    require_extra("publish", feature="reading a manifest as a DataFrame")
    import pandas as pd  # only here: the batch operator writes manifests without pandas

    table = pq.ParquetFile(pa.BufferReader(read_bytes(as_path(path)))).read()
    frame = table.to_pandas(
        types_mapper={pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}.get, ignore_metadata=True
    )
    version = (table.schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    frame.attrs["schema_version"] = int(version) if version is not None else None
    return frame


# -- summaries ---------------------------------------------------------------------------------------


def manifest_counts(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> dict[str, int]:
    """Return how many rows have each status (every status listed, zeros included), plus ``total``.

    Small and JSON-safe: this is what goes to XCom and the Asset event.
    """
    statuses = rows["status"].tolist() if is_dataframe(rows) else [row["status"] for row in rows]  # type: ignore[index, call-overload]
    counts = dict.fromkeys(STATUSES, 0)
    for status in statuses:
        if status not in counts:
            check_status(status)
        counts[status] += 1
    counts["total"] = len(statuses)
    return counts


def manifest_credits(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> int:
    """Return the credits the manifest's rows cost in total (46 per charged image)."""
    if is_dataframe(rows):
        return int(rows["credits"].sum())  # type: ignore[index, call-overload]
    return sum(int(row["credits"]) for row in rows)


# -- where -------------------------------------------------------------------------------------------


def manifest_path(output_root: ObjectStoragePath | str, *, identity: RunIdentity) -> ObjectStoragePath:
    """Return ``<output_root>/manifests/dag_id=<dag>/run_id=<run>/<task>[__<map_index>].parquet``.

    Each part is percent-quoted (``/`` → ``%2F``, ``:`` → ``%3A``, ``+`` → ``%2B``; a leading ``.`` or
    ``_`` is quoted too, which covers ``.`` and ``..``), so no id can leave the folder, and no file hides
    from readers that skip names starting with ``.`` or ``_``. The map index is appended only for mapped
    tasks. The path ignores the try number: a retry replaces its predecessor's manifest.
    """
    name = path_part(identity.airflow_task_id, partition=True)
    if identity.map_index is not None and identity.map_index >= 0:
        name += f"__{int(identity.map_index)}"
    return (
        as_path(output_root)
        / "manifests"
        / f"dag_id={path_part(identity.dag_id, partition=True)}"
        / f"run_id={path_part(identity.run_id, partition=True)}"
        / f"{name}.parquet"
    )
