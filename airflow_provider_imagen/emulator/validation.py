"""Request checks of the emulated API: the ``Authorization`` header and the Imagen 4 submit body.

Kept apart from the task bookkeeping so each rule of the contract (who may call, what a valid body is, which
code a bad one earns) can be read and unit-tested on its own, with no server and no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from airflow_provider_imagen.emulator.config import (
    DEFAULT_SIZE,
    MAX_PROMPT_CHARS,
    MODEL,
    SIZES,
    EmulatorConfig,
)
from airflow_provider_imagen.emulator.errors import (
    AUTH_INVALID,
    AUTH_MALFORMED,
    AUTH_MISSING,
    AUTH_REVOKED,
    INVALID_PARAMETER,
    MISSING_PARAMETER,
    ApiError,
)


@dataclass(frozen=True)
class Submission:
    """A valid submit body, reduced to what the emulator uses."""

    prompt: str
    size: str


def authenticate(header: str | None, config: EmulatorConfig) -> str:
    """Return the API key of a valid ``Authorization`` header, or raise the contract's 401 ``ApiError``."""
    if header is None:
        raise ApiError(401, AUTH_MISSING, "Missing Authorization header")
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or any(ch.isspace() for ch in key):
        raise ApiError(401, AUTH_MALFORMED, "Authorization header must be 'Bearer <api key>'")
    if key in config.revoked_keys:
        raise ApiError(401, AUTH_REVOKED, "API key has been revoked")
    if key not in config.api_keys:
        raise ApiError(401, AUTH_INVALID, "Invalid API key")
    return key


def _invalid(message: str) -> ApiError:
    return ApiError(400, INVALID_PARAMETER, message)


def is_json_media_type(content_type: str | None) -> bool:
    """Return whether a ``Content-Type`` announces JSON; none at all is taken as JSON, as web frameworks do.

    A ``text/plain`` or form body is not JSON even when its bytes parse as JSON: the real API refuses it,
    so the emulator must not create (and charge) a task for it.
    """
    if content_type is None or not content_type.strip():
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_json(raw: bytes) -> Any:
    """Return the JSON value of a body, or raise a 400 ``ApiError`` (20001); ``None`` for an empty body.

    Nesting deep enough to exhaust the parser's recursion is a bad body (400), not a server error (500).
    """
    try:
        return json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _invalid("Request body is not valid JSON: nested too deeply") from None


def parse_submission(raw: bytes, content_type: str | None = None) -> Submission:
    """Validate a ``POST /images/generations`` body; raise a 400 ``ApiError`` (20001 or 20002) if invalid."""
    if not is_json_media_type(content_type):
        raise _invalid(f"Content-Type must be application/json; got {content_type.strip()!r}")  # type: ignore[union-attr]
    body = parse_json(raw)
    if body is None:
        raise ApiError(400, MISSING_PARAMETER, "Missing required parameter: model")
    if not isinstance(body, dict):
        raise _invalid("Request body must be a JSON object")

    for name in ("model", "prompt"):
        if body.get(name) is None:
            raise ApiError(400, MISSING_PARAMETER, f"Missing required parameter: {name}")

    model = body["model"]
    if model != MODEL:
        raise _invalid(f"Unsupported model {model!r}; this endpoint serves {MODEL!r}")

    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise _invalid("prompt must be a string")
    if not prompt.strip():
        raise _invalid("prompt must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _invalid(f"prompt is {len(prompt)} characters; the maximum is {MAX_PROMPT_CHARS}")

    size = body.get("size")
    if size is None:
        size = DEFAULT_SIZE
    if not isinstance(size, str) or size not in SIZES:
        raise _invalid(f"size must be one of {', '.join(SIZES)}; got {size!r}")

    if "n" in body and body["n"] is not None:
        n = body["n"]
        if isinstance(n, bool) or n != 1:
            raise _invalid("n must be 1 for imagen-4-0; send multiple requests for variations")

    return Submission(prompt=prompt, size=size)
