"""Checks of the operators' arguments: when the DAG file is parsed, and again once templates are rendered.

Why a module of its own: every image costs money, so a wrong argument must stop the task before the first
POST with a message that names the parameter, the value and the rule (a ``TypeError`` from deep inside the
engine names none of them). An argument that is not templated is checked when the operator is built, so
the DAG shows an import error; a templated one is checked once Airflow has rendered it, before ``execute``.

Rules that are not obvious:
- a rendered template is text unless the DAG sets ``render_template_as_native_obj=True``, so the
  templated ``max_credits`` accepts a string of digits (``"4600"``). ``"None"`` or ``""`` is refused:
  a misspelt ``dag_run.conf`` key must not turn a budget into no budget;
- paths must be absolute: a relative path resolves against the worker's working directory, which differs
  between workers and between tries, so the images and the journal would land somewhere else each time;
- ``prompts`` given as records or a DataFrame is never rendered (see :func:`render_without_records`).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from airflow_provider_imagen.api.errors import ImagenInputError, shorten
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, SIZES

#: What marks a string as a Jinja template (an expression, a statement or a comment).
TEMPLATE_MARKERS: Final = ("{{", "{%", "{#")
#: Most images one prompt may ask for at one size: each variation is a separate paid request, and the
#: specs of every row are built before the first POST (a typo of 10**6 must not build a million).
MAX_VARIATIONS: Final = 100
#: Protocols that are the local disk, where a path must be absolute.
_LOCAL_SCHEMES: Final = ("file", "local")


def is_template(value: object) -> bool:
    """Return whether ``value`` is a string Airflow will render (it holds Jinja markers)."""
    return isinstance(value, str) and any(marker in value for marker in TEMPLATE_MARKERS)


def argument_error(name: str, value: object, rule: str) -> ImagenInputError:
    """Return the error for argument ``name``: ``name=<value>: <rule>``."""
    return ImagenInputError(f"{name}={shorten(value)}: {rule}")


# -- scalars ---------------------------------------------------------------------------------------


def whole_number(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as an int in [minimum, maximum]; booleans and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise argument_error(name, value, f"must be an integer, not {type(value).__name__}")
    number = int(value)
    if number < minimum:
        raise argument_error(name, value, f"must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise argument_error(name, value, f"must be at most {maximum}")
    return number


def real_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    optional: bool = False,
) -> float | None:
    """Return ``value`` as a float within its bounds (``None`` passes when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        rule = f"must be a number, not {type(value).__name__}" + (" (or None)" if optional else "")
        raise argument_error(name, value, rule)
    number = float(value)
    if number != number:
        raise argument_error(name, value, "must be a number, not NaN")
    if positive and number <= 0:
        raise argument_error(name, value, "must be positive")
    if minimum is not None and number < minimum:
        raise argument_error(name, value, f"must be at least {minimum:g}")
    if maximum is not None and number > maximum:
        raise argument_error(name, value, f"must be at most {maximum:g}")
    return number


def flag(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool: ``"false"`` is a non-empty string, hence true, in Python."""
    if not isinstance(value, bool):
        raise argument_error(name, value, f"must be True or False, not {type(value).__name__}")
    return value


def column_name(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise argument_error(name, value, "must be a non-empty column name")
    return value


def ratio(name: str, value: object) -> str:
    if not isinstance(value, str) or value not in SIZES:
        raise argument_error(name, value, f"must be one of {', '.join(SIZES)}")
    return value


def ratios(name: str, value: object) -> list[str] | None:
    """Return the table-wide sizes: ``None``, one ratio, or a non-empty list of ratios."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or isinstance(items, (bytes, Mapping)) or not items:
        raise argument_error(name, value, f"must list at least one of {', '.join(SIZES)}, or be None")
    for item in items:
        ratio(name, item)
    return list(items)


def budget(value: object) -> int | None:
    """Return ``max_credits`` as credits, or ``None`` for no budget.

    A rendered template arrives as text; digits are the only text accepted. A budget that does not pay
    for one image would end the run "successfully" with nothing made.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit():
            raise argument_error(
                "max_credits",
                value,
                "must be a whole number of credits (a template must render to digits only), "
                "or None for no budget",
            )
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise argument_error(
            "max_credits", value, f"must be a whole number of credits or None, not {type(value).__name__}"
        )
    credits = int(value)
    if credits <= 0:
        raise argument_error(
            "max_credits",
            value,
            f"must be a positive number of credits ({CREDITS_PER_IMAGE} per image), or None for no budget",
        )
    if credits < CREDITS_PER_IMAGE:
        raise argument_error(
            "max_credits",
            value,
            f"is less than one image ({CREDITS_PER_IMAGE} credits): nothing could be made. "
            f"Give at least {CREDITS_PER_IMAGE}, or None for no budget",
        )
    return credits


# -- locations -------------------------------------------------------------------------------------


def _text_of(value: object) -> str | None:
    """Return a path-like value as text, or ``None`` if it is not path-like."""
    from airflow.sdk import ObjectStoragePath

    if isinstance(value, ObjectStoragePath):
        return None  # already resolved by its constructor: nothing left to check
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[return-value]
    return value if isinstance(value, str) else None


def location(name: str, value: object, *, optional: bool = False) -> None:
    """Check a path or URI argument: text, not empty, and absolute if it is on the local disk.

    ``optional`` arguments may be ``None`` (and ``""``, which Airflow renders an unset param to).
    """
    from airflow.sdk import ObjectStoragePath

    if value is None and optional:
        return
    if isinstance(value, ObjectStoragePath):
        return
    text = _text_of(value)
    if text is None:
        raise argument_error(
            name, value, f"must be a path or URI (str or ObjectStoragePath), not {type(value).__name__}"
        )
    if not text.strip():
        if optional:
            return
        raise argument_error(
            name,
            value,
            "must not be empty: an empty path means the worker's working directory. Check the template "
            "or the param/conf key it reads",
        )
    relative = _relative_local(text)
    if relative:
        raise argument_error(name, value, relative)


def _relative_local(text: str) -> str | None:
    """Return why ``text`` is a relative local path, or ``None`` when it is absolute or remote."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() not in _LOCAL_SCHEMES:
        return None  # s3://, gs://…: object keys have no working directory
    if sep:
        if not rest.startswith("/"):
            return (
                f"a {scheme}:// URI needs an absolute path after it ({scheme}:///abs/path); "
                f"{rest.split('/', 1)[0]!r} would be read as a host and the path made relative to the "
                "worker's working directory"
            )
        return None
    if text.startswith("~"):
        return "'~' is not expanded: give the absolute path (or a URI such as s3://bucket/prefix)"
    if not os.path.isabs(text):
        return (
            "must be absolute (or a URI such as s3://bucket/prefix): a relative path resolves against "
            "each worker's working directory, which differs between workers and between tries"
        )
    return None


def prompts_source(value: object) -> None:
    """Check ``prompts``: a path or URI (checked as a location), a list of records, or a DataFrame."""
    from airflow_provider_imagen.batch.table import is_dataframe

    if is_dataframe(value):
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise argument_error("prompts", value, "the list of records is empty: nothing to generate")
        return  # each record is checked, and named by its number, when the table is read
    location("prompts", value)


# -- the operators ---------------------------------------------------------------------------------


def check_static(checks: Mapping[str, tuple[object, Callable[[str, object], object]]]) -> None:
    """Run ``check(name, value)`` for every argument whose value is not a template.

    Templates are checked after rendering instead: their text says nothing about what they render to.
    """
    for name, (value, check) in checks.items():
        if not is_template(value):
            check(name, value)


def check_batch_arguments(args: Mapping[str, Any]) -> None:
    """Check every argument of :class:`ImagenBatchGenerateOperator` that can be checked at parse time."""
    check_static(
        {
            "prompts": (args["prompts"], lambda _n, v: prompts_source(v)),
            "output_path": (args["output_path"], location),
            "journal_path": (args["journal_path"], lambda n, v: location(n, v, optional=True)),
            "imagen_conn_id": (args["imagen_conn_id"], column_name_like_conn_id),
            "max_credits": (args["max_credits"], lambda _n, v: budget(v)),
        }
    )
    for name in ("id_column", "prompt_column", "size_column"):
        column_name(name, args[name])
    ratios("sizes", args["sizes"])
    ratio("default_size", args["default_size"])
    whole_number("variations", args["variations"], minimum=1, maximum=MAX_VARIATIONS)
    if args["on_invalid"] not in ("record", "fail"):
        raise argument_error("on_invalid", args["on_invalid"], "must be 'record' or 'fail'")
    flags = ("check_balance", "resubmit_unknown", "deferrable", "fail_when_all_invalid", "adaptive_window")
    for name in flags:
        flag(name, args[name])
    whole_number("max_in_flight", args["max_in_flight"], minimum=1)
    whole_number("mirror_concurrency", args["mirror_concurrency"], minimum=1)
    real_number("refill_fraction", args["refill_fraction"], positive=True, maximum=1)
    real_number("max_submit_rate", args["max_submit_rate"], positive=True, optional=True)
    real_number("timeout", args["timeout"], positive=True)
    real_number("expected_render", args["expected_render"], minimum=0)
    real_number("poll_interval", args["poll_interval"], positive=True)
    real_number("progress_interval", args["progress_interval"], minimum=0)
    real_number("linger", args["linger"], minimum=0)
    real_number("min_deferral", args["min_deferral"], minimum=0, optional=True)
    if args["refill_on_worker"] is not None:
        flag("refill_on_worker", args["refill_on_worker"])
    for name in ("fail_on_error_rate", "fail_on_moderation_rate"):
        real_number(name, args[name], minimum=0, maximum=1, optional=True)


def check_generate_arguments(args: Mapping[str, Any]) -> None:
    """Check every argument of :class:`ImagenGenerateOperator` that can be checked at parse time."""
    check_static(
        {
            "prompt": (args["prompt"], prompt_text),
            "size": (args["size"], ratio),
            "output_path": (args["output_path"], image_location),
            "journal_path": (args["journal_path"], lambda n, v: location(n, v, optional=True)),
            "imagen_conn_id": (args["imagen_conn_id"], column_name_like_conn_id),
        }
    )
    for name in ("deferrable", "resubmit_unknown"):
        flag(name, args[name])
    real_number("timeout", args["timeout"], positive=True)
    real_number("expected_render", args["expected_render"], minimum=0)
    real_number("poll_interval", args["poll_interval"], positive=True)
    real_number("poll_backoff", args["poll_backoff"], minimum=1)


def column_name_like_conn_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise argument_error(name, value, "must be the id of an 'imagen' connection")


def prompt_text(name: str, value: object) -> None:
    """Check a prompt with the contract's rules (the same ``ImageRequest`` applies before the POST)."""
    from airflow_provider_imagen.api.errors import RequestValidationError
    from airflow_provider_imagen.api.models import validate_prompt

    try:
        validate_prompt(value)
    except RequestValidationError as exc:
        raise argument_error(name, value, exc.rule) from None


#: File suffixes that name an image file rather than a folder; only PNG is what the API renders.
_IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def image_location(name: str, value: object) -> None:
    """Check the single-image ``output_path``: ``None`` or ``""`` (no mirror), a ``.png`` file or a folder.

    ``""`` means "no output" like ``None``, so that ``"{{ params.output_path }}"`` with an empty default
    keeps the documented choice of not mirroring.
    """
    location(name, value, optional=True)
    text = _text_of(value)
    if text and text.rstrip("/").lower().endswith(_IMAGE_SUFFIXES):
        raise argument_error(
            name,
            value,
            "the API renders PNG: name the file *.png, or give a folder (the image would otherwise be "
            "written as a file inside a folder of that name)",
        )


# -- after rendering -------------------------------------------------------------------------------


def without_records(operator: Any, template_fields: Sequence[str]) -> list[str]:
    """Return the fields to render: ``prompts`` only when it is a path or URI string.

    Airflow renders every string nested in a list or dict. Prompt records are data, not templates:
    ``"{{ name }}"`` or ``"{# note #}"`` in a prompt must reach the API as written, and rendering them
    would change (or fail on) the text that is paid for.
    """
    from airflow.sdk import ObjectStoragePath

    prompts = getattr(operator, "prompts", None)
    if isinstance(prompts, (str, os.PathLike, ObjectStoragePath)):  # its path part is rendered
        return list(template_fields)
    return [name for name in template_fields if name != "prompts"]


def _checked(name: str, value: object, template: object, check: Callable[[str, object], object]) -> object:
    """Run ``check``; name the template too when the bad value came from one."""
    try:
        return check(name, value)
    except ImagenInputError as exc:
        if is_template(template) and template != value:
            raise ImagenInputError(f"{exc} (rendered from {shorten(template, 120)})") from None
        raise


def check_batch_rendered(operator: Any, templates: Mapping[str, object]) -> int | None:
    """Check the batch operator's templated arguments as rendered; return ``max_credits`` as credits."""
    for name, check in (
        ("prompts", lambda _n, v: prompts_source(v)),
        ("output_path", location),
        ("journal_path", lambda n, v: location(n, v, optional=True)),
        ("imagen_conn_id", column_name_like_conn_id),
    ):
        value = getattr(operator, name)
        _checked(name, value, templates.get(name, value), check)
    value = operator.max_credits
    return _checked("max_credits", value, templates.get("max_credits", value), lambda _n, v: budget(v))  # type: ignore[return-value]


def check_generate_rendered(operator: Any, templates: Mapping[str, object]) -> None:
    """Check the single-image operator's templated paths and connection as rendered.

    ``prompt`` and ``size`` are checked by the request itself, right before the POST.
    """
    for name, check in (
        ("output_path", image_location),
        ("journal_path", lambda n, v: location(n, v, optional=True)),
        ("imagen_conn_id", column_name_like_conn_id),
    ):
        value = getattr(operator, name)
        _checked(name, value, templates.get(name, value), check)
