"""The expanded specs of a try, kept beside its journal so a resume does not expand the table again.

Why: every resume after a deferral is a new process, and expanding a table of 10^5 rows (validating
each row, building a request per image) costs most of a second of CPU, every pass. The first pass of a
try expands the table and writes the specs as an Arrow IPC file; a resume reads that file and builds a
spec only for the rows its window touches (:class:`SpecTable`), while the window index reads keys,
digests and validity straight from the file's columns.

Invariants:
- the file's name is a fingerprint of everything the expansion depends on: the content of the id,
  prompt and size columns (their Arrow types and values, serialised losslessly), every expansion
  argument, the spec format and the provider's version. An edited table, another argument or another
  release is another name: a resume then finds no file and expands afresh, so specs are never stale
  (the journal's request digests and generations depend on them);
- the specs read are exactly those the first pass computed: same order, keys, rows, digests (the
  :func:`~airflow_provider_imagen.api.models.request_digest` of each valid request, stored as the first
  pass computed it), validity and invalid reasons;
- the file is written whole (a rename on local disk, one PUT on object stores), and two tries writing
  at once write the same bytes under the same name. A file that cannot be read, lacks a column or
  names another fingerprint is ignored and written again; the cache only ever saves work;
- only Arrow tables (Parquet sources) are cached: a list of records or a DataFrame is expanded as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, Final, overload

import pyarrow as pa
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen import __version__
from airflow_provider_imagen.api.models import DEFAULT_SIZE, ImageRequest
from airflow_provider_imagen.batch.specs import ImageSpec, expand_specs
from airflow_provider_imagen.batch.storage import (
    local_file,
    map_arrow_file,
    read_bytes,
    release_pages,
    write_whole_from,
)
from airflow_provider_imagen.batch.table import ID_COLUMN, PROMPT_COLUMN, SIZE_COLUMN, Table

log = logging.getLogger(__name__)

#: Version of the cached specs' layout and meaning; a change makes every older file a miss.
SPEC_FORMAT_VERSION: Final = 1
#: Folder of the cache inside a journal's folder (the journal reads only its own files' suffixes).
CACHE_FOLDER: Final = "_specs"
_SUFFIX: Final = ".arrow"
_META_FINGERPRINT: Final = b"imagen_specs_fingerprint"
_META_VERSION: Final = b"imagen_specs_version"
#: One row per spec, in table order.
SPEC_SCHEMA: Final = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("size", pa.string(), nullable=False),
        pa.field("variation", pa.int32(), nullable=False),
        #: The request's digest; null for an invalid spec.
        pa.field("digest", pa.string()),
        #: Why the spec is invalid; null for a valid one.
        pa.field("invalid_reason", pa.string()),
    ]
)


#: Specs a :class:`SpecTable` keeps built, the latest used (a window's worth, for most windows).
KEPT_SPECS: Final = 4096
#: Rows read into Python objects at a time when every spec is built in order.
_ITER_SLICE: Final = 8192


class SpecTable(Sequence[ImageSpec]):
    """The specs of a try read from the cache: an :class:`ImageSpec` is built only when a row is used.

    Why lazy: a pass needs the specs of its window, not of every row; the window index takes
    :attr:`keys`, :attr:`digests` and :attr:`valid` as plain lists instead. The specs built last stay
    built (up to :data:`KEPT_SPECS`), so a row used twice in a pass is built once; a long stream does not
    keep every row it sent. Iterating builds every spec (the end of a run writes them all to the
    manifest) from a slice of the columns at a time.
    """

    def __init__(self, table: pa.Table) -> None:
        self._table = table
        self._built: OrderedDict[int, ImageSpec] = OrderedDict()
        self._keys: list[str] | None = None
        self._digests: list[str | None] | None = None
        self._valid: list[bool] | None = None
        #: Specs built one at a time so far (tests count them: a resume builds O(window)).
        self.materialized = 0

    def __len__(self) -> int:
        return int(self._table.num_rows)

    def key_at(self, index: int) -> str:
        """Return the key of spec ``index`` (read from its column: nothing is kept)."""
        spec = self._built.get(index)
        return spec.key if spec is not None else str(self._table.column("key")[index].as_py())

    def digest_at(self, index: int) -> str | None:
        """Return the request digest of spec ``index`` (``None`` for an invalid spec).

        Read from the column even for a spec built already: a spec computes its digest on each ask.
        """
        digest: str | None = self._table.column("digest")[index].as_py()
        return digest

    def column_slices(self, size: int) -> Iterator[tuple[int, list[str], list[str | None], list[bool]]]:
        """Yield ``(start, keys, digests, validity)`` of ``size`` specs at a time, in order.

        For a pass over every row (the window index) that keeps none of them: a slice's strings are
        dropped before the next is read.
        """
        for start in range(0, len(self), size):
            part = self._table.slice(start, size)
            valid = [reason is None for reason in part.column("invalid_reason").to_pylist()]
            yield start, part.column("key").to_pylist(), part.column("digest").to_pylist(), valid
            release_pages(self._table)  # what a pass over every row read is not kept resident

    @property
    def keys(self) -> list[str]:
        """Return every spec's key, in order."""
        if self._keys is None:
            self._keys = self._table.column("key").to_pylist()
        return self._keys

    @property
    def digests(self) -> list[str | None]:
        """Return every spec's request digest (``None`` for invalid specs), in order."""
        if self._digests is None:
            self._digests = self._table.column("digest").to_pylist()
        return self._digests

    @property
    def valid(self) -> list[bool]:
        """Return whether each spec is valid, in order."""
        if self._valid is None:
            # Not ``is_null()``: that imports pyarrow.compute, which costs more than the column.
            self._valid = [reason is None for reason in self._table.column("invalid_reason").to_pylist()]
        return self._valid

    @property
    def invalid_count(self) -> int:
        """Return how many specs are invalid (without building any)."""
        return len(self) - int(self._table.column("invalid_reason").null_count)

    def invalid(self) -> list[ImageSpec]:
        """Return the invalid specs, in order (building only those)."""
        if not self.invalid_count:
            return []
        return [self[i] for i, ok in enumerate(self.valid) if not ok]

    @overload
    def __getitem__(self, index: int) -> ImageSpec: ...

    @overload
    def __getitem__(self, index: slice) -> list[ImageSpec]: ...

    def __getitem__(self, index: int | slice) -> ImageSpec | list[ImageSpec]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        spec = self._built.get(index)
        if spec is None:
            if not 0 <= index < len(self):
                raise IndexError(index)
            row = {name: self._table.column(name)[index].as_py() for name in SPEC_SCHEMA.names}
            spec = self._built[index] = _spec(row)
            self.materialized += 1
            if len(self._built) > KEPT_SPECS:
                self._built.popitem(last=False)
        return spec

    def __iter__(self) -> Iterator[ImageSpec]:
        for start in range(0, len(self), _ITER_SLICE):
            part = self._table.slice(start, _ITER_SLICE)
            columns = [part.column(name).to_pylist() for name in SPEC_SCHEMA.names]
            release_pages(self._table)
            for offset, values in enumerate(zip(*columns, strict=True)):
                spec = self._built.get(start + offset)
                if spec is None:
                    spec = _spec(dict(zip(SPEC_SCHEMA.names, values, strict=True)))
                yield spec


def _spec(row: dict[str, Any]) -> ImageSpec:
    reason = row["invalid_reason"]
    request = ImageRequest(row["prompt"], row["size"]) if reason is None else None
    return ImageSpec(
        key=row["key"],
        row=row["row"],
        prompt_id=row["prompt_id"],
        prompt=row["prompt"],
        size=row["size"],
        variation=row["variation"],
        request=request,
        invalid_reason=reason,
    )


def spec_slices(
    specs: Sequence[ImageSpec], size: int
) -> Iterator[tuple[int, list[str], list[str | None], list[bool]]]:
    """Yield ``(start, keys, digests, validity)`` of ``size`` specs at a time (from the cache's columns)."""
    if isinstance(specs, SpecTable):
        yield from specs.column_slices(size)
        return
    for start in range(0, len(specs), size):
        part = specs[start : start + size]
        yield start, [s.key for s in part], [s.digest for s in part], [s.valid for s in part]


def invalid_specs(specs: Sequence[ImageSpec]) -> list[ImageSpec]:
    """Return the invalid specs, in order, building from the cache only those."""
    if isinstance(specs, SpecTable):
        return specs.invalid()
    return [s for s in specs if not s.valid]


def fingerprint(
    table: pa.Table,
    *,
    id_column: str,
    prompt_column: str,
    size_column: str,
    sizes: Sequence[str] | str | None,
    default_size: str,
    variations: int,
) -> str:
    """Return the sha256 of what an expansion of ``table`` depends on (the cache file's name).

    The id, prompt and size columns are serialised as an Arrow IPC stream (types and values, nothing
    lost), so any edit of a cell, a type or the row order changes it; other columns do not count.
    """
    arguments = {
        "format": SPEC_FORMAT_VERSION,
        "provider": __version__,
        "id_column": id_column,
        "prompt_column": prompt_column,
        "size_column": size_column,
        "sizes": [sizes] if isinstance(sizes, str) else (list(sizes) if sizes is not None else None),
        "default_size": default_size,
        "variations": variations,
    }
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=repr).encode())
    names = [c for c in dict.fromkeys((id_column, prompt_column, size_column)) if c in table.column_names]
    digest.update(json.dumps(names).encode())
    columns = table.select(names).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, columns.schema) as writer:
        writer.write_table(columns)
    digest.update(sink.getvalue())
    return digest.hexdigest()


def read_cache(folder: ObjectStoragePath, key: str) -> SpecTable | None:
    """Return the specs cached under ``key``, or ``None`` when absent or not usable (never raises)."""
    path = folder / f"{key}{_SUFFIX}"
    try:
        name = local_file(path)
        if name is not None:
            table = map_arrow_file(name)
        else:
            table = pa.ipc.open_file(pa.BufferReader(read_bytes(path))).read_all()
    except FileNotFoundError:
        return None
    except Exception as exc:  # a partial or foreign file only costs an expansion
        log.warning("Ignoring the cached specs at %s (they will be expanded again): %s", path, exc)
        return None
    meta = table.schema.metadata or {}
    if (
        meta.get(_META_FINGERPRINT) != key.encode()
        or meta.get(_META_VERSION) != str(SPEC_FORMAT_VERSION).encode()
        or not table.schema.remove_metadata().equals(SPEC_SCHEMA)
    ):
        log.warning("Ignoring the cached specs at %s: not the specs of this table and arguments", path)
        return None
    return SpecTable(table)


def write_cache(folder: ObjectStoragePath, key: str, specs: Sequence[ImageSpec]) -> bool:
    """Write ``specs`` under ``key`` and drop the folder's other files; return whether it was written.

    A failure is logged and ignored: without the file a resume expands the table, as it did before.
    """
    path = folder / f"{key}{_SUFFIX}"
    schema = SPEC_SCHEMA.with_metadata(
        {_META_FINGERPRINT: key.encode(), _META_VERSION: str(SPEC_FORMAT_VERSION).encode()}
    )

    def fill(handle: BinaryIO) -> None:
        # A slice of rows at a time: the columns of 10^5 specs are never all in memory at once.
        with pa.ipc.new_file(handle, schema) as writer:
            for start in range(0, len(specs), _ITER_SLICE):
                writer.write_batch(_batch(specs[start : start + _ITER_SLICE]))

    try:
        write_whole_from(path, fill)
    except Exception as exc:
        log.warning("Could not cache the expanded specs at %s (resumes will expand again): %s", path, exc)
        return False
    with contextlib.suppress(Exception):
        for other in folder.iterdir():
            if other.name.endswith(_SUFFIX) and other.name != path.name:
                with contextlib.suppress(FileNotFoundError):
                    other.unlink()
    return True


def _batch(specs: Sequence[ImageSpec]) -> pa.RecordBatch:
    """Return ``specs`` as one record batch of :data:`SPEC_SCHEMA`."""
    columns = {
        "key": [s.key for s in specs],
        "row": [s.row for s in specs],
        "prompt_id": [s.prompt_id for s in specs],
        "prompt": [s.prompt for s in specs],
        "size": [s.size for s in specs],
        "variation": [s.variation for s in specs],
        "digest": [s.digest for s in specs],
        "invalid_reason": [s.invalid_reason for s in specs],
    }
    # ``from_arrays``, not ``from_pydict``: the latter imports pandas (a third of a second).
    return pa.RecordBatch.from_arrays(
        [pa.array(columns[f.name], f.type) for f in SPEC_SCHEMA], schema=SPEC_SCHEMA
    )


def load_specs(
    table: Table,
    folder: ObjectStoragePath | None,
    *,
    reuse: bool,
    write: bool = True,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
    sizes: Sequence[str] | None = None,
    default_size: str = DEFAULT_SIZE,
    variations: int = 1,
) -> Sequence[ImageSpec]:
    """Return the specs of ``table``: read from the cache in ``folder`` when ``reuse``, else expanded.

    The first pass of a try passes ``reuse=False``: it expands the table with the code that runs now,
    and writes the cache (or leaves that to :func:`cache_specs` with ``write=False``, once it knows it
    will pay: a try that fails its checks leaves no folder behind). A resume passes ``reuse=True`` and
    reads the cache, expanding (and writing) again only when the file is missing, unusable, or of
    another table or other arguments.

    :param folder: where the cache lives (see :data:`CACHE_FOLDER`); ``None`` never caches.
    :raises PromptTableError, ImagenInputError: as :func:`expand_specs`.
    """
    arguments: dict[str, Any] = {
        "id_column": id_column,
        "prompt_column": prompt_column,
        "size_column": size_column,
        "sizes": sizes,
        "default_size": default_size,
        "variations": variations,
    }
    key = None
    if folder is not None and isinstance(table, pa.Table) and (reuse or write):
        key = fingerprint(table, **arguments)
    if key is not None and reuse:
        cached = read_cache(folder, key)  # type: ignore[arg-type]  # set whenever key is
        if cached is not None:
            return cached
    specs = expand_specs(table, **arguments)
    if key is not None and write:
        write_cache(folder, key, specs)  # type: ignore[arg-type]
    return specs


def cached_specs(
    table: Table,
    folder: ObjectStoragePath,
    specs: Sequence[ImageSpec],
    **arguments: Any,
) -> Sequence[ImageSpec]:
    """Write the cache of ``specs`` (as :func:`cache_specs`) and return them as read back from it.

    Why: the specs of a first pass, held as Python objects for a whole stream, cost several hundred
    bytes per row; read back from the cache (mapped on local disk) they cost their columns, and a
    spec is built only for the rows a pass uses, as on a resume. ``specs`` is returned unchanged when
    nothing could be written or read back.
    """
    if not cache_specs(table, folder, specs, **arguments) or not isinstance(table, pa.Table):
        return specs
    cached = read_cache(folder, fingerprint(table, **_expansion_arguments(arguments)))
    if cached is None or len(cached) != len(specs):
        return specs
    return cached


def _expansion_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Return ``arguments`` with the defaults :func:`cache_specs` applies to those not given."""
    return {
        "id_column": ID_COLUMN,
        "prompt_column": PROMPT_COLUMN,
        "size_column": SIZE_COLUMN,
        "sizes": None,
        "default_size": DEFAULT_SIZE,
        "variations": 1,
        **arguments,
    }


def cache_specs(
    table: Table,
    folder: ObjectStoragePath,
    specs: Sequence[ImageSpec],
    *,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
    sizes: Sequence[str] | None = None,
    default_size: str = DEFAULT_SIZE,
    variations: int = 1,
) -> bool:
    """Write the cache of ``specs``, expanded from ``table`` with these arguments; return whether written.

    Only Arrow tables are cached; nothing is written for records or a DataFrame.
    """
    if not isinstance(table, pa.Table):
        return False
    key = fingerprint(
        table,
        id_column=id_column,
        prompt_column=prompt_column,
        size_column=size_column,
        sizes=sizes,
        default_size=default_size,
        variations=variations,
    )
    return write_cache(folder, key, specs)
