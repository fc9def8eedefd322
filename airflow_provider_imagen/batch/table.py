"""The prompt table: read it from Parquet (a file, or a folder of Hive partitions) or from records.

Why a module of its own: reading is the part that touches storage and formats; what a row *means*
(validation, one spec per requested image) is :mod:`airflow_provider_imagen.batch.specs`. Invariants:
- ``row`` is the 0-based position of the row in the table (after :func:`read_prompt_table`, the
  DataFrame's index), and every message names it;
- the batch operator reads tables with pyarrow alone: pandas costs a fraction of a second to import in
  every task process (each pass of a batch is one), so it is imported only for callers who ask for a
  DataFrame (:func:`read_prompt_table`) or pass one.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import ImagenInputError
from airflow_provider_imagen.batch.storage import as_path, read_bytes

if TYPE_CHECKING:
    import pandas as pd

    from airflow_provider_imagen.batch.specs import ImageSpec


class Columns(dict[str, list[Any]]):
    """A table read from a list of records: column name → the cells as given, in row order."""


#: What a table can be once read: an Arrow table (from Parquet), columns of Python values (from records),
#: or a caller's DataFrame.
Table: TypeAlias = "pa.Table | Columns | pd.DataFrame"

#: Default name of the column holding each row's stable id (file names and journal keys derive from it).
ID_COLUMN: Final = "prompt_id"
#: Default name of the column holding the prompt text.
PROMPT_COLUMN: Final = "prompt"
#: Default name of the optional column holding a ratio, or a list of ratios, per row.
SIZE_COLUMN: Final = "size"
#: Longest prompt id, in characters: it becomes part of file names and journal keys.
MAX_PROMPT_ID_CHARS: Final = 200
#: File names read from a folder; files and folders starting with ``.`` or ``_`` are skipped (as
#: Spark, Hive and pyarrow do: ``_SUCCESS``, ``.crc`` files, ``_temporary/``).
PARQUET_SUFFIXES: Final = (".parquet", ".parq", ".pq")
#: How many reasons :func:`summarize_invalid` shows before it counts the rest.
SUMMARY_LIMIT: Final = 10

_HIVE_NULL: Final = "__HIVE_DEFAULT_PARTITION__"
_PANDAS_INDEX: Final = re.compile(r"__index_level_\d+__")


def is_dataframe(value: object) -> bool:
    """Return whether ``value`` is a pandas DataFrame, without importing pandas (none exists before)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def _int_types() -> dict[pa.DataType, Any]:
    """Map integer Arrow types to pandas nullable integers, so one null does not turn 1 into 1.0."""
    import pandas as pd

    return {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.uint8(): pd.UInt8Dtype(),
        pa.uint16(): pd.UInt16Dtype(),
        pa.uint32(): pd.UInt32Dtype(),
        pa.uint64(): pd.UInt64Dtype(),
    }


class PromptTableError(ImagenInputError):
    """The prompt table as a whole cannot be used: missing, not Parquet, empty, or lacking a column."""


class InvalidRowsError(ImagenInputError):
    """Some rows are invalid and the policy is to fail before anything is submitted.

    :ivar invalid: the invalid specs, in table order.
    """

    def __init__(self, message: str, invalid: list[ImageSpec]) -> None:
        self.invalid = invalid
        super().__init__(message)


# -- reading ---------------------------------------------------------------------------------------


def read_prompt_table(
    source: ObjectStoragePath | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | pd.DataFrame,
    *,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
) -> pd.DataFrame:
    """Return the prompt table as a DataFrame with a 0-based ``RangeIndex`` (the row numbers).

    Everything :func:`load_prompt_table` reads; see there. Integer columns become pandas nullable
    integers, and text that is not valid UTF-8 stays as Arrow holds it until a column is read.
    """
    table = load_prompt_table(
        source, id_column=id_column, prompt_column=prompt_column, size_column=size_column
    )
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, Columns):
        return pd.DataFrame(
            {name: pd.Series(values, dtype=object) for name, values in table.items()},
            index=pd.RangeIndex(len(next(iter(table.values())))),
        )
    try:
        return table.to_pandas(types_mapper=_int_types().get, ignore_metadata=True)
    except (pa.ArrowException, ValueError) as exc:  # pragma: no cover - exotic types only
        raise PromptTableError(f"cannot convert the prompt table to pandas: {exc}") from exc


def load_prompt_table(
    source: ObjectStoragePath | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | pd.DataFrame,
    *,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
) -> Table:
    """Return the prompt table without pandas: an Arrow table, columns of values, or the DataFrame given.

    :param source: a Parquet file, or a folder read recursively in sorted order (hive partition
        folders such as ``ds=2026-01-01/`` add a string column ``ds`` unless the files already have it),
        on any ``ObjectStoragePath`` (``file://``, ``s3://``…) or local path; or a list of dict records;
        or a DataFrame.
    :param id_column: the column holding each row's stable id.
    :param prompt_column: the column holding the prompt.
    :param size_column: the optional column holding a ratio or a list of ratios per row.
    :raises PromptTableError: the source is missing, not Parquet, has no rows, or lacks a column.

    Read through ``ObjectStoragePath`` file objects (not pyarrow's own file systems) so the connection
    configured for ``s3://`` or ``gs://`` in Airflow is the one used.
    """
    table: Table
    if is_dataframe(source):
        table = source.reset_index(drop=True)  # type: ignore[union-attr]
        where = "the DataFrame"
    elif isinstance(source, (list, tuple)):
        table = _from_records(source)
        where = "the list of records"
    elif isinstance(source, (ObjectStoragePath, str, os.PathLike)):
        if isinstance(source, str) and not source.strip():
            # ObjectStoragePath("") is "." : the working directory would be read, and any Parquet in it
            # (an earlier run's manifest has prompt_id and prompt columns) paid for.
            raise PromptTableError(
                f"prompts={source!r}: the path of the prompt table is empty; give a Parquet file or folder"
            )
        path = as_path(os.fspath(source) if not isinstance(source, (ObjectStoragePath, str)) else source)
        table = _read_parquet(path)
        where = str(path)
    else:
        raise PromptTableError(
            f"cannot read a prompt table from a {type(source).__name__}: pass a Parquet file or folder "
            "(path, URI or ObjectStoragePath), a list of dict records, or a pandas DataFrame"
        )
    if _row_count(table) == 0:
        raise PromptTableError(f"the prompt table {where} has no rows; there is nothing to generate")
    check_columns(table, id_column=id_column, prompt_column=prompt_column, size_column=size_column)
    return table


def _row_count(table: Table) -> int:
    if isinstance(table, Columns):
        return len(next(iter(table.values()), []))
    return len(table)


def column_names(table: Table) -> list[str]:
    """Return the column names of a table however it was read."""
    if isinstance(table, pa.Table):
        return list(table.column_names)
    if isinstance(table, Columns):
        return list(table)
    return [str(c) for c in table.columns]


def check_columns(
    table: Table,
    *,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
) -> None:
    """Raise :class:`PromptTableError` unless the id and prompt columns exist (once each).

    The size column is optional under its default name (rows then take the table-wide sizes); a size
    column named explicitly must exist, since a typo there would silently buy the wrong ratio.
    """
    columns = column_names(table)
    missing = [
        f"{name!r} (set with {param}=…)"
        for name, param in ((id_column, "id_column"), (prompt_column, "prompt_column"))
        if name not in columns
    ]
    if size_column != SIZE_COLUMN and size_column not in columns:
        missing.append(f"{size_column!r} (set with size_column=…)")
    if missing:
        raise PromptTableError(
            f"the prompt table lacks the column(s) {', '.join(missing)}; columns found: {columns}. "
            "Map your own column names with the id_column=, prompt_column= and size_column= parameters "
            "of read_prompt_table/expand_specs (and of the batch operator)"
        )
    for name in (id_column, prompt_column, size_column):
        if columns.count(name) > 1:
            raise PromptTableError(f"the prompt table has {columns.count(name)} columns named {name!r}")


def _from_records(records: Sequence[Any]) -> Columns:
    """Build columns of Python values, so every cell keeps its exact value.

    Going through an inference (pandas', Arrow's) would turn ``[1, None]`` into ``[1.0, nan]`` (and the
    id ``1`` into an invalid float) or reject text that is not valid UTF-8 before we could name its row.
    """
    names: dict[str, None] = {}
    for number, item in enumerate(records):
        if not isinstance(item, Mapping):
            raise PromptTableError(
                f"record {number} of the prompt list is a {type(item).__name__}, not a mapping of "
                "column name to value"
            )
        names.update(dict.fromkeys(item))
    return Columns({name: [r.get(name) for r in records] for name in names})


def _read_parquet(path: ObjectStoragePath) -> pa.Table:
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except FileNotFoundError:
        exists = is_dir = False
    if not exists:
        raise PromptTableError(f"the prompt table {path} does not exist")
    if is_dir:
        files = _parquet_files(path)
        tables = [_read_one(f, partitions=_hive_partitions(path, f)) for f in files]
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowException, ValueError) as exc:
            raise PromptTableError(
                f"the Parquet files under {path} have incompatible schemas ({exc}); "
                "give every file the same column types"
            ) from exc
    else:
        table = _read_one(path, partitions={})
    # pandas' own metadata is ignored: a named index written by pandas (say ``prompt_id``) comes back
    # as an ordinary column, and an unnamed one (``__index_level_0__``) is dropped.
    return table.drop_columns([name for name in table.column_names if _PANDAS_INDEX.fullmatch(name)])


def _parquet_files(folder: ObjectStoragePath) -> list[ObjectStoragePath]:
    found: list[tuple[tuple[str, ...], ObjectStoragePath]] = []
    seen: list[str] = []
    for candidate in folder.rglob("*"):
        parts = _relative_parts(folder, candidate)
        if any(part.startswith((".", "_")) for part in parts) or not candidate.is_file():
            continue
        seen.append("/".join(parts))
        if candidate.name.lower().endswith(PARQUET_SUFFIXES):
            found.append((parts, candidate))
    if not found:
        shown = f"; found only {sorted(seen)[:5]}" if seen else " (the folder is empty)"
        raise PromptTableError(
            f"no Parquet files ({', '.join('*' + s for s in PARQUET_SUFFIXES)}) under {folder}{shown}"
        )
    return [path for _, path in sorted(found, key=lambda item: item[0])]


def _relative_parts(folder: ObjectStoragePath, path: ObjectStoragePath) -> tuple[str, ...]:
    try:
        return tuple(path.relative_to(folder).parts)
    except ValueError:  # pragma: no cover - rglob always yields paths under the folder
        return (path.name,)


def _hive_partitions(folder: ObjectStoragePath, path: ObjectStoragePath) -> dict[str, str | None]:
    """Return ``{key: value}`` from the ``key=value`` folders between ``folder`` and ``path``.

    Not ``pyarrow.dataset``'s Hive discovery: it infers types from the values (``ds=2026-01-01`` becomes
    a date, ``shard=007`` the integer 7), and prompt ids and journal keys need the text as written.
    """
    partitions: dict[str, str | None] = {}
    for part in _relative_parts(folder, path)[:-1]:
        key, sep, value = part.partition("=")
        if sep and key:
            text = unquote(value)
            partitions[unquote(key)] = None if text == _HIVE_NULL else text
    return partitions


def _read_one(path: ObjectStoragePath, *, partitions: Mapping[str, str | None]) -> pa.Table:
    try:
        # One file, read whole: ``pq.read_table`` would build a dataset (importing pyarrow.dataset and
        # pandas) for a file handle too.
        table = pq.ParquetFile(pa.BufferReader(read_bytes(path))).read()
    except FileNotFoundError as exc:
        raise PromptTableError(f"the prompt table {path} does not exist") from exc
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PromptTableError(f"{path} is not a readable Parquet file: {exc}") from exc
    for key, value in partitions.items():
        if key not in table.column_names:
            table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
    return table


def __getattr__(name: str) -> Any:
    """Keep the names that moved to :mod:`airflow_provider_imagen.batch.specs` importable from here."""
    if name in _MOVED:
        from airflow_provider_imagen.batch import specs

        return getattr(specs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED: Final = frozenset(
    {"ImageSpec", "expand_specs", "summarize_invalid", "raise_if_invalid", "raise_if_none_valid"}
)
