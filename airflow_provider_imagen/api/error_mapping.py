"""How the last outcome of a call becomes one of :mod:`~airflow_provider_imagen.api.errors`' exceptions.

Most specific first, as httpx maps foreign errors onto its own: a transport failure, then the statuses
the contract documents, then a generic :class:`~airflow_provider_imagen.api.errors.ImagenAPIError`.
A submit maps apart from every other call: whatever may have created a paid task (a 5xx, a failure after
the request left) is an :class:`~airflow_provider_imagen.api.errors.AmbiguousSubmitError`, never a
retryable error. Messages name URLs only through :mod:`~airflow_provider_imagen.api.urls`' redaction.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from airflow_provider_imagen.api.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    DownloadError,
    ImageExpiredError,
    ImagenAPIError,
    ImagenError,
    ImagenTransportError,
    InsufficientCreditsError,
    InvalidRequestError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.retry import NOT_SENT_ERRORS, parse_retry_after
from airflow_provider_imagen.api.urls import (
    API_PREFIX,
    DEFAULT_BASE_URL,
    api_path,
    redact_url,
    without_userinfo,
)
from airflow_provider_imagen.api.wire import Call, Reply

#: The contract's error statuses that have an exception of their own (429 and 5xx are mapped apart).
STATUS_ERRORS: Final[dict[int, type[ImagenAPIError]]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    404: TaskNotFoundError,
    422: InvalidRequestError,
}


def api_error(call: Call, outcome: Reply | httpx.TransportError, *, submit: bool) -> ImagenError:
    """Map the last outcome of an API call to our hierarchy, most specific first."""
    method, path = call.method, api_path(call.url)
    if isinstance(outcome, httpx.TransportError):
        kind = type(outcome).__name__
        if submit and not isinstance(outcome, NOT_SENT_ERRORS):
            return AmbiguousSubmitError(f"{kind} after the request was sent")
        return ImagenTransportError(f"{method} {path}: {kind}: {outcome}")
    code, message, request_id = envelope(outcome)
    status = outcome.status_code
    if submit and status >= 500:
        return AmbiguousSubmitError(
            f"HTTP {status}, code {code}: {message}", status_code=status, request_id=request_id
        )
    info: dict[str, Any] = {
        "status_code": status,
        "code": code,
        "request_id": request_id,
        "method": method,
        "path": path,
    }
    if status == 429:
        return RateLimitedError(
            message, retry_after=parse_retry_after(outcome.headers.get("retry-after")), **info
        )
    if status >= 500:
        return ServerError(message, **info)
    if status == 404 and not path.startswith("/tasks/"):
        # Only a task can be "not found" in the contract; a 404 anywhere else is a route that does not
        # exist at this base URL. Name the full URL: the API path alone hides the mistake.
        return ImagenAPIError(message, url=without_userinfo(call.url), **info)
    return STATUS_ERRORS.get(status, ImagenAPIError)(message, **info)


def explained(error: ImagenError, *, base_url: str, https_assumed: bool) -> ImagenError:
    """Add what the connection's settings tell about an error that the answer alone does not."""
    if isinstance(error, ImagenTransportError) and https_assumed:
        host = base_url.removeprefix("https://")
        return ImagenTransportError(
            f"{error} (the connection's host {host!r} has no scheme, so https:// was assumed; "
            f"if the server speaks plain HTTP, set the host to http://{host})"
        )
    if type(error) is ImagenAPIError and error.status_code == 404:
        # A route of the contract answered 404: the base URL does not point at the API's root.
        path = urlsplit(base_url).path
        hint = f"; its path {path!r} is kept as given" if path else ""
        return ImagenAPIError(
            f"{error.api_message}. No such route: check the connection's Base URL "
            f"({without_userinfo(base_url)}{hint}). It must be the API's root, such as "
            f"{DEFAULT_BASE_URL}; the provider adds {API_PREFIX}/… itself",
            status_code=404,
            code=error.code,
            request_id=error.request_id,
            method=error.method,
            path=error.path,
            url=error.url,
        )
    return error


def download_error(url: str, outcome: Reply | httpx.TransportError) -> DownloadError:
    """Map the last outcome of an image download; a signed URL that is gone is said to be expired."""
    where = redact_url(url)
    if isinstance(outcome, httpx.TransportError):
        return DownloadError(f"download of {where} failed: {type(outcome).__name__}")
    if outcome.status_code in (403, 404, 410):
        return ImageExpiredError(
            f"image at {where} is gone (HTTP {outcome.status_code}): signed URLs live 24 h; "
            "regenerating it would be paid again"
        )
    return DownloadError(f"download of {where} failed: HTTP {outcome.status_code}")


def envelope(response: Reply) -> tuple[int | None, str, str | None]:
    """Return (code, message, request_id) from an error body, tolerating bodies that are not envelopes."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return None, (response.reason_phrase or "error").strip(), None
    code = error.get("code")
    request_id = error.get("request_id")
    return (
        int(code) if isinstance(code, (int, str)) and str(code).isdigit() else None,
        str(error.get("message") or response.reason_phrase or "error"),
        request_id if isinstance(request_id, str) else None,
    )
