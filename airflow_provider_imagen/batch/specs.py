"""Turn every row of a prompt table into one validated spec per requested image.

Why a module of its own: every image costs money, so bad input must be found before the first POST
named by row and field, and recorded, never sent and never charged. The batch operator
submits only the specs this module calls valid; the rest go to the manifest as ``invalid``.

Invariants:
- a spec's ``key`` is the journal key of its paid request: ``f"{prompt_id}|{size}|v{variation}"``, with
  ``variation`` counted from 0. It depends only on the row's own values, never on its position, so a
  rerun over the same table (or the same rows in another order) re-attaches to what was already paid.
  Valid keys are unique because prompt ids are unique, and a valid key parses from the right
  (``key.rsplit("|", 2)``) since sizes and variations never contain ``|``;
- an invalid spec's key is ``f"invalid/row{row}|{size}|v{variation}"``. A valid prompt id never contains
  ``/``, so an invalid key never equals a valid one and is never journalled;
- the rules for a prompt and a size live in :mod:`airflow_provider_imagen.api.models` (``ImageRequest``);
  this module adds only the rules of a *table* (prompt ids, duplicates, size lists);
- ``row`` is the 0-based position of the row in the table, and every message names it;
- validation never sends anything and reads each column once as a Python list (no per-row ``.loc``).
"""

from __future__ import annotations

import numbers
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import pyarrow as pa
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import ImagenInputError, RequestValidationError
from airflow_provider_imagen.api.models import DEFAULT_SIZE, ImageRequest, validate_prompt, validate_size
from airflow_provider_imagen.batch.table import (
    ID_COLUMN,
    MAX_PROMPT_ID_CHARS,
    PROMPT_COLUMN,
    SIZE_COLUMN,
    SUMMARY_LIMIT,
    Columns,
    InvalidRowsError,
    PromptTableError,
    Table,
    check_columns,
    column_names,
    is_dataframe,
    load_prompt_table,
)

if TYPE_CHECKING:
    import pandas as pd


#: Characters a prompt id may not hold: they would hide in logs or break file names.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Lone surrogates: text that is not valid Unicode (Parquet cannot store it as given).
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One requested image: a row of the table, at one size, one variation.

    A valid spec carries the :class:`ImageRequest` to send; an invalid one carries the reason instead,
    so it can still be reported (as ``invalid``, 0 credits) next to the rows that were sent.
    """

    #: Journal key: ``prompt_id|size|vN`` when valid, ``invalid/row<row>|size|vN`` otherwise.
    key: str
    #: 0-based position of the row in the input table.
    row: int
    #: The row's id as text; ``""`` when the cell was null. Escaped if it was not valid UTF-8.
    prompt_id: str
    #: The prompt text; ``None`` when the cell was null or not a string.
    prompt: str | None
    #: One of the five ratios, or the raw value (as text) of a size that is not one.
    size: str
    #: 0-based variation number; each variation is a separate paid request (the API's ``n`` is 1).
    variation: int
    #: What to send; ``None`` when the spec is invalid.
    request: ImageRequest | None
    #: Why the spec is invalid, naming the row, the prompt id, the field and the rule; ``None`` if valid.
    invalid_reason: str | None = None

    @property
    def valid(self) -> bool:
        """Return whether this spec may be submitted."""
        return self.invalid_reason is None

    @property
    def digest(self) -> str | None:
        """Return the request's digest (what the journal checks before re-attaching); ``None`` if invalid."""
        return self.request.digest(self.variation) if self.request is not None else None


# -- expanding and validating ----------------------------------------------------------------------


def expand_specs(
    table: pd.DataFrame | pa.Table | ObjectStoragePath | str | Sequence[Mapping[str, Any]],
    *,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
    sizes: Sequence[str] | None = None,
    default_size: str = DEFAULT_SIZE,
    variations: int = 1,
) -> list[ImageSpec]:
    """Return one spec per (row × size × variation), in table order; invalid rows included.

    A row's sizes come from, in order: its own size cell (one ratio, or a list of ratios; a null or
    blank cell means "not given"), else the table-wide ``sizes``, else ``default_size``. A ratio listed
    twice for one row is requested once (use ``variations`` for more images of the same ratio).

    Prompt ids: a non-empty string, or an integer (converted with ``str``, so the id ``7`` and the id
    ``"7"`` are the same and duplicates). Floats are refused, even ``3.0``: they usually come from an
    integer column with nulls, and ``"3.0"`` would silently become a new id.

    :param table: a DataFrame or an Arrow table, or anything :func:`read_prompt_table` reads.
    :param sizes: ratios for rows without their own; ``None`` means ``[default_size]``.
    :param variations: images per (row, size), each its own paid request; at least 1.
    :raises PromptTableError: a required column is missing.
    :raises ImagenInputError: ``sizes``, ``default_size`` or ``variations`` is not acceptable (these are
        the caller's settings, not data: no row can be right if they are wrong).
    """
    if not isinstance(table, (pa.Table, Columns)) and not is_dataframe(table):
        table = load_prompt_table(
            table, id_column=id_column, prompt_column=prompt_column, size_column=size_column
        )
    check_columns(table, id_column=id_column, prompt_column=prompt_column, size_column=size_column)
    fallback = _fallback_sizes(sizes, default_size)
    if isinstance(variations, bool) or not isinstance(variations, numbers.Integral) or variations < 1:
        raise ImagenInputError(f"variations={variations!r}: must be an integer of at least 1")
    variation_range = range(int(variations))

    ids = _column_values(table, id_column)
    prompts = _column_values(table, prompt_column)
    has_sizes = size_column in column_names(table)
    size_cells = _column_values(table, size_column) if has_sizes else [None] * len(ids)

    specs: list[ImageSpec] = []
    first_row: dict[str, int] = {}
    for row, (raw_id, raw_prompt, raw_size) in enumerate(zip(ids, prompts, size_cells, strict=True)):
        prompt_id, id_error = _check_prompt_id(raw_id)
        errors = [id_error] if id_error else []
        if id_error is None:
            first = first_row.setdefault(prompt_id, row)
            if first != row:
                errors.append(
                    f"prompt_id={prompt_id!r}: duplicates row {first}; every prompt_id must be unique"
                )
        prompt, prompt_error = _check_prompt(raw_prompt)
        if prompt_error:
            errors.append(prompt_error)
        if errors:
            prompt_id, prompt = _escaped(prompt_id), _escaped(prompt)
        label = f"row {row} (prompt_id {prompt_id!r})" if id_error is None else f"row {row}"
        for size, size_error in _row_sizes(raw_size, fallback):
            if errors or size_error:
                reason = f"{label}: {'; '.join([*errors, size_error] if size_error else errors)}"
                for variation in variation_range:
                    specs.append(
                        ImageSpec(
                            key=f"invalid/row{row}|{size}|v{variation}",
                            row=row,
                            prompt_id=prompt_id,
                            prompt=prompt,
                            size=size,
                            variation=variation,
                            request=None,
                            invalid_reason=reason,
                        )
                    )
                continue
            request = ImageRequest(prompt, size)  # type: ignore[arg-type]  # prompt checked above
            for variation in variation_range:
                specs.append(
                    ImageSpec(
                        key=f"{prompt_id}|{size}|v{variation}",
                        row=row,
                        prompt_id=prompt_id,
                        prompt=prompt,
                        size=size,
                        variation=variation,
                        request=request,
                    )
                )
    return specs


def _column_values(table: Table, column: str) -> list[Any]:
    """Return a column as Python values; name the row whose text is not valid UTF-8.

    Arrow refuses to turn such bytes into ``str`` for the whole column at once, with a message that
    names neither the row nor the column; find the row, so the user can fix the data.
    """
    if isinstance(table, Columns):
        return table[column]
    values = table.column(column) if isinstance(table, pa.Table) else table[column]
    try:
        return _to_list(values)
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        for row in range(len(values)):
            try:
                _to_list(values[row : row + 1])
            except (pa.ArrowException, UnicodeDecodeError):
                raise PromptTableError(
                    f"row {row}: column {column!r} holds bytes that are not valid UTF-8 text; "
                    "re-encode the table as UTF-8"
                ) from exc
        raise PromptTableError(f"column {column!r} cannot be read as text: {exc}") from exc


def _to_list(values: Any) -> list[Any]:
    """Return an Arrow column (``to_pylist``) or a pandas Series (``tolist``) as Python values."""
    cells: list[Any] = values.to_pylist() if isinstance(values, pa.ChunkedArray) else values.tolist()
    return cells


def _fallback_sizes(sizes: Sequence[str] | None, default_size: str) -> list[str]:
    try:
        validate_size(default_size)
    except RequestValidationError as exc:
        raise ImagenInputError(f"default_size: {exc}") from None
    if sizes is None:
        return [default_size]
    if isinstance(sizes, str):
        sizes = [sizes]
    chosen = list(dict.fromkeys(sizes))
    if not chosen:
        raise ImagenInputError("sizes=[]: list at least one ratio, or pass None to use default_size")
    for size in chosen:
        try:
            validate_size(size)
        except RequestValidationError as exc:
            raise ImagenInputError(f"sizes: {exc}") from None
    return chosen


def _is_null(value: object) -> bool:
    if value is None or (isinstance(value, float) and value != value):  # NaN, numpy floats included
        return True
    pandas = sys.modules.get("pandas")  # pandas' own nulls can only come from pandas
    return pandas is not None and (value is pandas.NA or value is pandas.NaT)


def _check_prompt_id(value: object) -> tuple[str, str | None]:
    """Return (the id as text, the broken rule or ``None``)."""
    if _is_null(value):
        return "", str(RequestValidationError("prompt_id", value, "is missing (null)"))
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy integers too
        return str(int(value)), None
    if not isinstance(value, str):
        wrong = f"must be a string or an integer, not {type(value).__name__}"
        return str(value), str(RequestValidationError("prompt_id", value, wrong))
    rule: str | None = None
    if not value.strip():
        rule = "must not be empty or only whitespace"
    elif len(value) > MAX_PROMPT_ID_CHARS:
        rule = f"is {len(value)} characters; at most {MAX_PROMPT_ID_CHARS} are allowed"
    elif "/" in value or "\\" in value or ".." in value:
        rule = "must not contain '/', '\\' or '..' (it becomes part of file names and journal keys)"
    elif (bad := _CONTROL.search(value)) is not None:
        rule = f"must not contain control characters (found {bad.group()!r} at position {bad.start()})"
    elif (bad := _SURROGATE.search(value)) is not None:
        rule = f"is not valid UTF-8 text (character at position {bad.start()})"
    return value, str(RequestValidationError("prompt_id", value, rule)) if rule else None


def _check_prompt(value: object) -> tuple[str | None, str | None]:
    """Return (the prompt if it is text, the broken rule or ``None``), with ImageRequest's rules."""
    if _is_null(value):
        return None, str(RequestValidationError("prompt", value, "is missing (null)"))
    try:
        validate_prompt(value)
    except RequestValidationError as exc:
        return (value if isinstance(value, str) else None), str(exc)
    return value, None  # type: ignore[return-value]  # validate_prompt proved it is a str


def _row_sizes(cell: object, fallback: list[str]) -> list[tuple[str, str | None]]:
    """Return the row's sizes as (size, broken rule or ``None``), deduplicated in order."""
    if isinstance(cell, (list, tuple)) or _is_array(cell):
        if len(cell) == 0:
            return [("", str(RequestValidationError("size", list(cell), "must list at least one ratio")))]
        return _checked_sizes(cell, indexed=True)
    if _is_null(cell) or (isinstance(cell, str) and not cell.strip()):
        return [(size, None) for size in fallback]
    return _checked_sizes([cell], indexed=False)


def _is_array(value: object) -> TypeGuard[Sequence[object]]:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _checked_sizes(values: Iterable[object], *, indexed: bool) -> list[tuple[str, str | None]]:
    out: dict[str, str | None] = {}
    for index, value in enumerate(values):
        text = _escaped(value if isinstance(value, str) else str(value)) or ""
        if text in out:
            continue
        try:
            # Only text can be a ratio; anything else (arrays, dicts) must not reach ``in SIZES``.
            validate_size(value if isinstance(value, str) else None)
            out[text] = None
        except RequestValidationError as exc:
            out[text] = str(RequestValidationError(f"size[{index}]" if indexed else "size", value, exc.rule))
    return list(out.items())


def _escaped(text: str | None) -> str | None:
    """Return ``text`` with anything UTF-8 cannot encode (lone surrogates) as backslash escapes.

    Invalid rows are still written to the manifest, and Parquet strings must be valid UTF-8.
    """
    if text is None or _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- reporting -------------------------------------------------------------------------------------


def summarize_invalid(specs: Iterable[ImageSpec], *, limit: int = SUMMARY_LIMIT) -> str:
    """Return a short account of the invalid specs: counts, then the first ``limit`` distinct reasons.

    One bad row fanned out over five sizes and two variations is one reason, not ten.
    """
    invalid = [spec for spec in specs if not spec.valid]
    if not invalid:
        return "no invalid rows"
    reasons = list(dict.fromkeys(spec.invalid_reason for spec in invalid))
    rows = len({spec.row for spec in invalid})
    lines = [
        f"{rows} invalid row(s) ({len(invalid)} requested image(s)) will not be sent; "
        f"first {min(limit, len(reasons))} of {len(reasons)} reason(s):"
    ]
    lines.extend(f"  - {reason}" for reason in reasons[:limit])
    if len(reasons) > limit:
        lines.append(f"  … and {len(reasons) - limit} more")
    return "\n".join(lines)


def raise_if_invalid(specs: Iterable[ImageSpec], *, limit: int = SUMMARY_LIMIT) -> None:
    """Raise :class:`InvalidRowsError` if any spec is invalid: the "fail before paying" policy."""
    specs = list(specs)
    invalid = [spec for spec in specs if not spec.valid]
    if invalid:
        raise InvalidRowsError(
            "the prompt table has invalid rows; nothing was submitted and nothing was charged.\n"
            + summarize_invalid(invalid, limit=limit),
            invalid,
        )


def raise_if_none_valid(specs: Iterable[ImageSpec], *, limit: int = SUMMARY_LIMIT) -> None:
    """Raise :class:`InvalidRowsError` if no spec is valid.

    A run that can make none of the images asked for is a failure, not a success with an empty result.
    """
    specs = list(specs)
    if specs and not any(spec.valid for spec in specs):
        raise InvalidRowsError(
            f"none of the {len(specs)} requested image(s) is valid; nothing was submitted and nothing was "
            "charged. Fix the rows, or set fail_when_all_invalid=False to record them in a manifest and "
            "succeed.\n" + summarize_invalid(specs, limit=limit),
            specs,
        )
