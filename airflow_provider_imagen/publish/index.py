"""The incremental index: what was already generated, so the next run sends only what is new or changed.

Why: the batch operator's journal is keyed by ``dag_id / run_id / task_id``. It makes a *retry* of a
task re-attach to what an earlier try paid for, but tomorrow night's run, or a second backfill run of a
date, starts a journal of its own and would pay for everything again. The index is what carries
"already made" from one run to the next.

Invariants:
- an image's *content key* is a hash of (model, prompt, size, variation) (:func:`content_key`). The
  same ``prompt_id`` with another prompt or another size is another image and is generated again;
- the index has at most one entry per ``(prompt_id, size, variation)``: its latest outcome, either
  ``completed`` (with the mirrored image's URI) or ``moderated`` (refused by the content policy; the same
  prompt would be refused again, so it is not resent until the prompt changes, unless asked). Other
  outcomes (failed, timeout, unknown submit…) are not indexed, so the next run tries them again;
- entries come only from manifests, and absorbing is idempotent (the names of absorbed manifests, with
  the *version* of each that was read, are kept in the file's metadata) and order-independent (per key,
  the outcome with the latest time wins). A publish that failed half-way can be repeated, and the next
  plan can absorb a manifest that such a publish left behind instead of paying for its images again;
- a manifest can change under the same name: a rerun that reuses its run id (a cleared task, a
  reprocessed backfill) merges its rows into that run's manifest. A new version of an absorbed manifest
  is absorbed again, and an entry that came from it is replaced when the new version lists another task
  for the same key, so the index never points at a file that no longer lists its image;
- the file is written whole (:func:`~airflow_provider_imagen.batch.storage.write_whole`): readers see
  the old index or the new one, never half. Updating it is read-modify-write, so one index file has one
  writer at a time: the nightly DAG runs with ``max_active_runs=1`` and the backfill keeps one index
  per partition;
- planning is pure (:func:`plan_increment`): no I/O, so it is tested on plain DataFrames.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, DEFAULT_SIZE, MODEL, request_digest
from airflow_provider_imagen.batch.specs import ImageSpec, expand_specs
from airflow_provider_imagen.batch.storage import as_path, write_whole
from airflow_provider_imagen.batch.table import ID_COLUMN, PROMPT_COLUMN, SIZE_COLUMN

#: Version of :data:`INDEX_SCHEMA`; bump it with every change to the fields.
INDEX_SCHEMA_VERSION: Final = 1
_VERSION_KEY: Final = b"imagen_index_schema_version"
_ABSORBED_KEY: Final = b"imagen_index_absorbed_manifests"
#: ``{manifest name: version}`` of what was absorbed (an index written without it re-absorbs once).
_VERSIONS_KEY: Final = b"imagen_index_absorbed_versions"
#: Manifest statuses that make an index entry.
INDEXED_STATUSES: Final = ("completed", "moderated")
#: The index's key: one entry per requested image.
KEY_COLUMNS: Final = ("prompt_id", "size", "variation")
_TIMESTAMP: Final = pa.timestamp("us", tz="UTC")

INDEX_SCHEMA: Final = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("size", pa.string(), nullable=False),
        pa.field("variation", pa.int32(), nullable=False),
        #: :func:`content_key` of (model, prompt, size, variation).
        pa.field("content_key", pa.string(), nullable=False),
        #: ``completed`` or ``moderated``.
        pa.field("status", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("model", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("bytes", pa.int64()),
        #: The reAPI task id that made it.
        pa.field("task_id", pa.string()),
        #: When the outcome happened (completion time, else submit time, else absorption time).
        pa.field("generated_at", _TIMESTAMP, nullable=False),
        #: The manifest it came from: the link from an image back to the run that paid for it.
        pa.field("manifest_uri", pa.string()),
        pa.field("dag_id", pa.string()),
        pa.field("run_id", pa.string()),
    ]
)
INDEX_COLUMNS: Final[tuple[str, ...]] = tuple(INDEX_SCHEMA.names)


def content_key(prompt: str, size: str, variation: int = 0, model: str = MODEL) -> str:
    """Return the content key of one image: the :func:`request_digest` the batch journal keeps too.

    The plan of a run and the operator's re-attach decision must agree on "the same image", so both use
    the one digest.
    """
    return request_digest(prompt, size, variation, model)


@dataclass(frozen=True)
class IndexState:
    """The index in memory: its entries and the manifests already absorbed into it.

    ``versions`` maps an absorbed manifest's name to the version that was read (see
    :func:`~airflow_provider_imagen.publish.runs.manifest_version`); a name absorbed without a version
    has none.
    """

    entries: pd.DataFrame
    absorbed: frozenset[str] = frozenset()
    versions: Mapping[str, str] = field(default_factory=dict)

    def has_absorbed(self, manifest_uri: str, version: str | None = None) -> bool:
        """Return whether ``manifest_uri`` (at ``version``, when given) is already in the index."""
        if manifest_uri not in self.absorbed:
            return False
        return version is None or self.versions.get(manifest_uri) == version

    @classmethod
    def empty(cls) -> IndexState:
        """Return an index with no entries."""
        return cls(_frame([]))

    def __len__(self) -> int:
        """Return the number of entries."""
        return len(self.entries)

    def lookup(self) -> dict[tuple[str, str, int], tuple[str, str]]:
        """Return ``{(prompt_id, size, variation): (content_key, status)}``."""
        frame = self.entries
        return {
            (pid, size, int(var)): (key, status)
            for pid, size, var, key, status in zip(
                frame["prompt_id"],
                frame["size"],
                frame["variation"],
                frame["content_key"],
                frame["status"],
                strict=True,
            )
        }


def read_index(path: ObjectStoragePath | str) -> IndexState:
    """Return the index stored at ``path``, or an empty one if there is no file yet."""
    path = as_path(path)
    try:
        with path.open("rb") as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        return IndexState.empty()
    meta = table.schema.metadata or {}
    absorbed = json.loads(meta.get(_ABSORBED_KEY, b"[]").decode())
    versions = json.loads(meta.get(_VERSIONS_KEY, b"{}").decode())
    return IndexState(
        _frame(table.select(list(INDEX_COLUMNS)).to_pylist()), frozenset(absorbed), dict(versions)
    )


def write_index(state: IndexState, path: ObjectStoragePath | str) -> str:
    """Write the index whole to ``path`` and return its URI."""
    records = state.entries.astype(object).where(state.entries.notna(), None).to_dict("records")
    arrays = [pa.array([r[f.name] for r in records], type=f.type) for f in INDEX_SCHEMA]
    metadata = {
        _VERSION_KEY: str(INDEX_SCHEMA_VERSION).encode(),
        _ABSORBED_KEY: json.dumps(sorted(state.absorbed)).encode(),
        _VERSIONS_KEY: json.dumps(dict(sorted(state.versions.items()))).encode(),
    }
    table = pa.Table.from_arrays(arrays, schema=INDEX_SCHEMA.with_metadata(metadata))
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    dest = as_path(path)
    write_whole(dest, buffer.getvalue().to_pybytes())
    return str(dest)


def absorb_manifest(
    state: IndexState,
    manifest: pd.DataFrame,
    manifest_uri: str,
    *,
    version: str | None = None,
    model: str = MODEL,
    now: dt.datetime | None = None,
) -> IndexState:
    """Return ``state`` with the ``completed`` and ``moderated`` rows of one manifest folded in.

    A manifest already absorbed (at the same ``version``, when one is given) changes nothing. Per key,
    the entry with the latest ``generated_at`` wins (a tie keeps the newcomer), so absorbing manifests
    in any order gives the same index. Absorbing a new version of a manifest first drops the entries
    that came from it and that the new version gives to another task: a rerun under the same run id
    replaced them, so the file no longer lists their image. Entries whose key the new version does not
    list at all are kept (dropping them would make the next plan pay for images that exist).
    """
    if state.has_absorbed(manifest_uri, version):
        return state
    entries = state.entries
    if manifest_uri in state.absorbed and len(entries):
        listed = {
            (row["prompt_id"], row["size"], int(row["variation"])): _value(row.get("task_id"))
            for row in manifest.to_dict("records")
        }

        def superseded(entry: Mapping[str, Any]) -> bool:
            key = (entry["prompt_id"], entry["size"], int(entry["variation"]))
            return (
                entry["manifest_uri"] == manifest_uri
                and key in listed
                and listed[key] != _value(entry["task_id"])
            )

        keep = [not superseded(entry) for entry in entries.to_dict("records")]
        if not all(keep):
            entries = _frame(entries[keep].to_dict("records"))
    versions = dict(state.versions)
    if version is None:
        versions.pop(manifest_uri, None)
    else:
        versions[manifest_uri] = version
    stamp_default = now or dt.datetime.now(dt.timezone.utc)
    new_rows: list[dict[str, Any]] = []
    for row in manifest.to_dict("records"):
        status = row.get("status")
        if status not in INDEXED_STATUSES or not isinstance(row.get("prompt"), str):
            continue
        if status == "completed" and not row.get("image_uri"):
            continue
        stamp = _first_time(row.get("completed_at"), row.get("submitted_at")) or stamp_default
        new_rows.append(
            {
                "prompt_id": row["prompt_id"],
                "size": row["size"],
                "variation": int(row["variation"]),
                "content_key": content_key(row["prompt"], row["size"], int(row["variation"]), model),
                "status": status,
                "prompt": row["prompt"],
                "model": model,
                "image_uri": _value(row.get("image_uri")),
                "sha256": _value(row.get("sha256")),
                "width": _value(row.get("width")),
                "height": _value(row.get("height")),
                "bytes": _value(row.get("bytes")),
                "task_id": _value(row.get("task_id")),
                "generated_at": stamp,
                "manifest_uri": manifest_uri,
                "dag_id": _value(row.get("dag_id")),
                "run_id": _value(row.get("run_id")),
            }
        )
    merged = pd.concat([entries, _frame(new_rows)], ignore_index=True) if new_rows else entries
    if new_rows:
        merged = _frame(
            merged.sort_values("generated_at", kind="stable")
            .drop_duplicates(list(KEY_COLUMNS), keep="last")
            .sort_values(list(KEY_COLUMNS), kind="stable")
            .to_dict("records")
        )
    return IndexState(merged, state.absorbed | {manifest_uri}, versions)


def _frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Return index rows as a DataFrame with the same dtypes however they were built or read.

    Text columns are plain ``object`` columns holding ``str`` or ``None``; integers are nullable
    integers; ``generated_at`` is a UTC timestamp.
    """
    rows = list(rows)
    frame = pd.DataFrame(
        {name: pd.Series([_value(r.get(name)) for r in rows], dtype=object) for name in INDEX_COLUMNS}
    )
    frame["variation"] = frame["variation"].astype(pd.Int32Dtype())
    for name in ("width", "height"):
        frame[name] = pd.array([_value(v) for v in frame[name]], dtype=pd.Int32Dtype())
    frame["bytes"] = pd.array([_value(v) for v in frame["bytes"]], dtype=pd.Int64Dtype())
    frame["generated_at"] = pd.to_datetime(frame["generated_at"], utc=True).astype("datetime64[us, UTC]")
    return frame


def _value(value: Any) -> Any:
    """Return ``value`` with pandas' and numpy's missing markers as ``None`` and numpy scalars as Python."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and value != value:
        return None
    return value.item() if hasattr(value, "item") else value


def _first_time(*values: Any) -> dt.datetime | None:
    for value in values:
        value = _value(value)
        if value is not None:
            return pd.Timestamp(value).to_pydatetime()
    return None


# -- planning ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IncrementPlan:
    """What a run must generate, after the index said what already exists.

    ``to_generate`` holds the input rows that still need at least one image, with their size column
    replaced by the list of the sizes still needed (so the batch operator, given the same
    ``size_column``, sends exactly those); ``source_row`` gives each row's position in the input.
    """

    to_generate: pd.DataFrame
    #: Specs the table itself makes invalid (never sent; listed so a person can fix them).
    invalid: list[ImageSpec] = field(default_factory=list)
    #: Rows in the input table.
    rows: int = 0
    #: Valid images the table asks for.
    requested: int = 0
    #: Valid images already in the index with the same content key.
    unchanged: int = 0
    #: Valid images whose same content was refused by the content policy before (not resent).
    known_moderated: int = 0
    #: Images to generate in this run.
    images: int = 0
    #: Images that are new or changed but left for the next run by the budget.
    deferred: int = 0

    @property
    def credits(self) -> int:
        """Return the credits this run will cost at most (46 per image)."""
        return self.images * CREDITS_PER_IMAGE

    def counts(self) -> dict[str, int]:
        """Return the plan's numbers as a JSON-safe dict (for XCom and logs)."""
        return {
            "rows": self.rows,
            "requested": self.requested,
            "unchanged": self.unchanged,
            "known_moderated": self.known_moderated,
            "invalid": len(self.invalid),
            "images": self.images,
            "to_generate_rows": len(self.to_generate),
            "deferred": self.deferred,
            "estimated_credits": self.credits,
        }


def plan_increment(
    table: pd.DataFrame,
    index: IndexState,
    *,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
    sizes: Sequence[str] | None = None,
    default_size: str = DEFAULT_SIZE,
    variations: int = 1,
    model: str = MODEL,
    retry_moderated: bool = False,
    max_images: int | None = None,
) -> IncrementPlan:
    """Return the rows and sizes of ``table`` that the index does not hold yet.

    Rows are expanded exactly as the batch operator expands them (same function, same defaults), so the
    keys compared here are the keys it will generate. A size is needed when any of its ``variations`` is
    missing or has another content key; all variations of a needed size are then generated again.

    :param retry_moderated: send again prompts the content policy refused before (they cost nothing
        when refused again, but each is a request).
    :param max_images: images this run may generate at most (the budget); the rest, in table order,
        are ``deferred`` to the next run. ``None``: no limit.
    """
    specs = expand_specs(
        table,
        id_column=id_column,
        prompt_column=prompt_column,
        size_column=size_column,
        sizes=sizes,
        default_size=default_size,
        variations=variations,
    )
    known = index.lookup()
    invalid = [spec for spec in specs if not spec.valid]
    needed: dict[int, dict[str, None]] = {}
    requested = unchanged = known_moderated = 0
    for spec in specs:
        if not spec.valid:
            continue
        requested += 1
        assert spec.prompt is not None  # a valid spec has its prompt
        entry = known.get((spec.prompt_id, spec.size, spec.variation))
        if entry is not None and entry[0] == content_key(spec.prompt, spec.size, spec.variation, model):
            if entry[1] == "completed":
                unchanged += 1
                continue
            if not retry_moderated:
                known_moderated += 1
                continue
        needed.setdefault(spec.row, {})[spec.size] = None

    chosen: dict[int, list[str]] = {}
    images = deferred = 0
    for row, row_sizes in needed.items():
        for size in row_sizes:
            if max_images is not None and images + variations > max_images:
                deferred += variations
                continue
            chosen.setdefault(row, []).append(size)
            images += variations

    rows = sorted(chosen)
    to_generate = table.iloc[rows].copy().reset_index(drop=True)
    to_generate[size_column] = pd.Series([chosen[row] for row in rows], dtype=object)
    if "source_row" not in to_generate.columns:
        to_generate["source_row"] = pd.Series(rows, dtype="int64")
    return IncrementPlan(
        to_generate=to_generate,
        invalid=invalid,
        rows=len(table),
        requested=requested,
        unchanged=unchanged,
        known_moderated=known_moderated,
        images=images,
        deferred=deferred,
    )


def write_plan_table(frame: pd.DataFrame, dest: ObjectStoragePath | str, *, size_column: str) -> str:
    """Write a to-generate table whole as Parquet (its size column as ``list<string>``); return its URI."""
    columns = {}
    for name in frame.columns:
        if name == size_column:
            columns[name] = pa.array([list(v) for v in frame[name]], type=pa.list_(pa.string()))
        else:
            columns[str(name)] = pa.Array.from_pandas(frame[name])
    table = pa.table(columns)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    path = as_path(dest)
    write_whole(path, buffer.getvalue().to_pybytes())
    return str(path)
