"""reAPI error codes and the exception that carries one to the HTTP layer.

The contract fixes some codes (auth 1000x, 20002, 50001, 60099, 80006) and leaves others to the server; the
emulator's choices are collected here so tests, docs and the provider see a single table. Pure logic raises
:class:`ApiError`; only the FastAPI layer turns it into a response, so the logic stays testable without HTTP.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

# Documented by reAPI.
AUTH_MISSING = 10001
AUTH_MALFORMED = 10002
AUTH_INVALID = 10003
AUTH_REVOKED = 10004
MISSING_PARAMETER = 20002
RATE_LIMITED = 50001
SERVER_ERROR = 60099
CONTENT_POLICY = 80006

# Undocumented by reAPI: the emulator's own choices.
INVALID_PARAMETER = 20001
INSUFFICIENT_CREDITS = 30001
NOT_FOUND = 40401
ROUTE_NOT_FOUND = 40400
BAD_GATEWAY = 60502
GENERATION_FAILED = 60001

CONTENT_POLICY_MESSAGE = "Request violates content policy"
GENERATION_FAILED_MESSAGE = "Generation failed"


def new_request_id() -> str:
    """Return a fresh ``req_<hex>`` identifier for an error body."""
    return f"req_{secrets.token_hex(12)}"


def error_body(code: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    """Build the contract's error envelope ``{"error": {"code", "message", "request_id"}}``."""
    return {"error": {"code": code, "message": message, "request_id": request_id or new_request_id()}}


@dataclass
class ApiError(Exception):
    """An ``/api/v1`` failure: HTTP status, reAPI code, message and any extra headers (``Retry-After``)."""

    status: int
    code: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Make ``str(error)`` readable in logs and test failures."""
        super().__init__(f"HTTP {self.status} code {self.code}: {self.message}")

    def body(self) -> dict[str, Any]:
        """Return the JSON error envelope for this error."""
        return error_body(self.code, self.message)


class MediaError(Exception):
    """A media download refused: 403 for a bad or expired signature, 404 for an unknown task."""

    def __init__(self, status: int, message: str) -> None:
        """Remember the HTTP status and the short text body to send."""
        super().__init__(message)
        self.status = status
        self.message = message
