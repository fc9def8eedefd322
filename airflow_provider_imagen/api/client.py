"""The one place that speaks HTTP to reAPI: a sync and an async client with one shared core.

Every call is written once, as a *flow*: a generator that yields what to do next (a
:class:`~airflow_provider_imagen.api.wire.Call` to send, or a number of seconds to sleep) and receives
what happened (a :class:`~airflow_provider_imagen.api.wire.Reply` or a transport error).
:class:`ImagenClient` and :class:`AsyncImagenClient` only drive flows, the way httpx drives its auth flows,
so the request building, error mapping and the retry policy of :mod:`airflow_provider_imagen.api.retry`
exist once for both.

Secrets: the API key travels only in the ``Authorization`` header of requests to the API's own base
URL (never to the image CDN), is not in any ``repr``, and is never put in an exception. Signed image
URLs are redacted in errors and in httpx's own request log lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import IO, Any, Final, TypeGuard, TypeVar
from urllib.parse import quote, urlsplit

import httpx

from airflow_provider_imagen import __version__
from airflow_provider_imagen.api.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    DownloadError,
    ImageExpiredError,
    ImagenAPIError,
    ImagenError,
    ImagenTransportError,
    ImageRefusedError,
    InsufficientCreditsError,
    InvalidRequestError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.models import ImageRequest, Task
from airflow_provider_imagen.api.retry import NOT_SENT_ERRORS, RetryPolicy, parse_retry_after
from airflow_provider_imagen.api.wire import Call, Reply, json_call

#: Where reAPI lives when a connection names no host.
DEFAULT_BASE_URL: Final = "https://reapi.ai"
#: The versioned API root under the base URL.
API_PREFIX: Final = "/api/v1"
#: Largest image body we accept; Imagen 4 PNGs are 1-3 MB.
DEFAULT_MAX_IMAGE_BYTES: Final = 50 * 1024 * 1024
#: Bytes kept from the start of an image to read its pixel size.
_HEAD_BYTES: Final = 256 * 1024
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"

T = TypeVar("T")
#: What a flow yields (send this call / sleep this long) and what it is sent back.
Flow = Generator["Call | float", "Reply | httpx.TransportError | None", T]
#: An async sender: puts a call on the wire, answers a reply (``stream``: body left to read).
AsyncSend = Callable[..., Awaitable[Any]]


def normalize_base_url(host: str | None) -> str:
    """Return ``scheme://host[:port][/path]`` without a trailing slash or API prefix.

    Users paste ``reapi.ai``, ``https://reapi.ai/`` or ``https://reapi.ai/api/v1``; all mean the same.
    A host without a scheme gets ``https://`` (see :func:`scheme_assumed`). A path is kept as given
    (an API behind a proxy may live under one); a wrong one shows as a 404 that names the full URL.
    """
    url = (host or "").strip() or DEFAULT_BASE_URL
    if scheme_assumed(url):
        url = f"https://{url}"
    url = url.rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)]
    return url


def scheme_assumed(host: str | None) -> bool:
    """Return whether a connection's host names no scheme, so that ``https://`` is assumed for it."""
    text = (host or "").strip()
    return bool(text) and "://" not in text


def _without_userinfo(url: str) -> str:
    """Return ``url`` without ``user:password@`` and query: safe to show in an error."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}"


def redact_url(url: str | httpx.URL) -> str:
    """Return ``scheme://host/…/<last segment>``: enough to recognise a URL, useless to fetch it."""
    parts = urlsplit(str(url))
    last = parts.path.rstrip("/").rsplit("/", 1)[-1]
    return f"{parts.scheme}://{parts.netloc}/…/{last}" if last else f"{parts.scheme}://{parts.netloc}/"


class _RedactURLs(logging.Filter):
    """Rewrite the URL in httpx's ``HTTP Request: GET <url> …`` lines: signed image URLs must not leak."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 2:
            record.args = tuple(redact_url(arg) if isinstance(arg, httpx.URL) else arg for arg in record.args)
        return True


_httpx_logger = logging.getLogger("httpx")
if not any(isinstance(f, _RedactURLs) for f in _httpx_logger.filters):
    _httpx_logger.addFilter(_RedactURLs())


@dataclass(frozen=True)
class ClientSettings:
    """Everything a client needs; built by the hook from an Airflow connection, or by hand."""

    #: Bearer key. Excluded from ``repr`` so a logged settings object cannot leak it.
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    #: Seconds to wait for one HTTP answer.
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    #: The host as given had no scheme and ``https://`` was put in front (errors then say so).
    https_assumed: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.api_key or not self.api_key.strip():
            raise ImagenError("no API key: set the connection's password (API key) field")
        object.__setattr__(self, "https_assumed", scheme_assumed(self.base_url))
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))


@dataclass(frozen=True)
class DownloadedImage:
    """What a download produced. ``content`` is set only when no sink was given."""

    content_type: str
    size_bytes: int
    sha256: str
    width: int | None
    height: int | None
    content: bytes | None = field(default=None, repr=False)


class _BaseClient:
    """Builds requests and defines every flow; knows nothing of how requests are sent."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._api_root = settings.base_url + API_PREFIX
        self._headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
            "User-Agent": f"airflow-provider-imagen/{__version__}",
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.settings.base_url!r})"

    # -- flows ---------------------------------------------------------------------------------

    def _submit_flow(self, request: ImageRequest, idempotency_key: str | None) -> Flow[Task]:
        headers = {**self._headers, "Idempotency-Key": idempotency_key} if idempotency_key else self._headers
        call = json_call("POST", self._api_root + "/images/generations", headers, request.to_json())
        response = yield from self._exchange(call, submit=True)
        try:
            return Task.from_json(response.json())
        except ValueError as exc:
            # A 2xx means the server took the order; without an id we cannot find the paid task.
            raise AmbiguousSubmitError(
                f"HTTP {response.status_code} answer without a usable task id: {exc}",
                status_code=response.status_code,
            ) from None

    def _get_task_flow(self, task_id: str) -> Flow[Task]:
        if not isinstance(task_id, str) or not task_id.strip():
            raise ValueError(f"task_id={task_id!r}: must be a non-empty string")
        call = Call("GET", f"{self._api_root}/tasks/{quote(task_id, safe='')}", self._headers)
        response = yield from self._exchange(call, submit=False)
        return self._parse(call, response, Task.from_json)

    def _balance_flow(self) -> Flow[int]:
        call = Call("GET", self._api_root + "/balance", self._headers)
        response = yield from self._exchange(call, submit=False)
        return self._parse(call, response, lambda body: int(body["balance"]))

    def _download_flow(self, url: str) -> Flow[Any]:
        """Yield until the image's headers arrive; return the open, successful streaming response."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise ImageRefusedError(f"refusing to download {redact_url(url)}: not an http(s) URL")
        # No Authorization header: the key belongs to the API, not to whatever host serves images.
        call = Call("GET", url, {"User-Agent": self._headers["User-Agent"]})
        policy = self.settings.retry
        attempt = 0
        while True:
            attempt += 1
            outcome = yield call
            if _is_reply(outcome) and outcome.is_success:
                return outcome
            if policy.retry_safe_call(attempt, outcome):  # type: ignore[arg-type]
                yield policy.delay_for(attempt, _retry_after(outcome))
                continue
            raise _download_error(url, outcome)  # type: ignore[arg-type]

    # -- shared steps --------------------------------------------------------------------------

    def _exchange(self, call: Call, *, submit: bool) -> Flow[Reply]:
        """Send with the retry policy; return a 2xx response or raise the mapped error."""
        policy = self.settings.retry
        decide = policy.retry_submit if submit else policy.retry_safe_call
        attempt = 0
        while True:
            attempt += 1
            outcome = yield call
            if _is_reply(outcome) and outcome.is_success:
                return outcome
            if decide(attempt, outcome):  # type: ignore[arg-type]
                yield policy.delay_for(attempt, _retry_after(outcome))
                continue
            raise self._explained(_api_error(call, outcome, submit=submit))  # type: ignore[arg-type]

    def _explained(self, error: ImagenError) -> ImagenError:
        """Add what the connection's settings tell about an error that the answer alone does not."""
        base = self.settings.base_url
        if isinstance(error, ImagenTransportError) and self.settings.https_assumed:
            host = base.removeprefix("https://")
            return ImagenTransportError(
                f"{error} (the connection's host {host!r} has no scheme, so https:// was assumed; "
                f"if the server speaks plain HTTP, set the host to http://{host})"
            )
        if type(error) is ImagenAPIError and error.status_code == 404:
            # A route of the contract answered 404: the base URL does not point at the API's root.
            path = urlsplit(base).path
            hint = f"; its path {path!r} is kept as given" if path else ""
            return ImagenAPIError(
                f"{error.api_message}. No such route: check the connection's Base URL "
                f"({_without_userinfo(base)}{hint}). It must be the API's root, such as "
                f"{DEFAULT_BASE_URL}; the provider adds {API_PREFIX}/… itself",
                status_code=404,
                code=error.code,
                request_id=error.request_id,
                method=error.method,
                path=error.path,
                url=error.url,
            )
        return error

    @staticmethod
    def _parse(call: Call, response: Reply, read: Any) -> Any:
        try:
            return read(response.json())
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerError(
                f"unreadable answer: {exc}",
                status_code=response.status_code,
                method=call.method,
                path=_api_path(call.url),
            ) from None


class ImagenClient(_BaseClient):
    """Blocking client for workers: submit, poll, read the balance, download images.

    :param settings: key, base URL, timeout and retry policy.
    :param transport: an httpx transport to use instead of the network (tests, proxies).
    """

    def __init__(self, settings: ClientSettings, *, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(settings)
        self._http = httpx.Client(timeout=settings.timeout, transport=transport)

    def submit(self, request: ImageRequest, *, idempotency_key: str | None = None) -> Task:
        """POST one paid request; never retried once it may have created a task."""
        return self._run(self._submit_flow(request, idempotency_key))

    def get_task(self, task_id: str) -> Task:
        """Return the task's current state (free; retried on transient errors)."""
        return self._run(self._get_task_flow(task_id))

    def get_balance(self) -> int:
        """Return the account's credits (free)."""
        return self._run(self._balance_flow())

    def download_image(self, url: str, sink: IO[bytes] | None = None) -> DownloadedImage:
        """Stream the image at ``url`` into ``sink`` (or memory), checking its type and size."""
        response = self._run(self._download_flow(url), stream=True)
        try:
            receiver = _ImageReceiver(url, response.headers, self.settings.max_image_bytes, sink)
            for chunk in response.iter_bytes():
                receiver.feed(chunk)
        except httpx.TransportError as exc:
            raise DownloadError(f"download of {redact_url(url)} broke off: {type(exc).__name__}") from exc
        finally:
            response.close()
        return receiver.finish()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ImagenClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, flow: Flow[T], *, stream: bool = False) -> T:
        step = next(flow)
        while True:
            outcome: httpx.Response | httpx.TransportError | None = None
            if isinstance(step, float):
                time.sleep(step)
            else:
                try:
                    outcome = self._http.send(to_httpx(step), stream=stream)
                except httpx.TransportError as exc:
                    outcome = exc
                else:
                    if stream and not outcome.is_success:
                        outcome.read()
                        outcome.close()
            try:
                step = flow.send(outcome)
            except StopIteration as done:
                return done.value


class AsyncImagenClient(_BaseClient):
    """The async twin of :class:`ImagenClient`, for triggers: same flows, same errors, same retries.

    By default requests go straight through aiohttp (:mod:`airflow_provider_imagen.api.aiohttp_sender`):
    a trigger polling thousands of renders pays the client's CPU on every poll, and aiohttp costs a third
    of httpx's. Given an httpx ``transport``, they go through ``httpx.AsyncClient`` over it instead.

    :param settings: key, base URL, timeout and retry policy.
    :param transport: an httpx async transport (tests, a custom proxy setup, httpx's own network stack).
    :param max_connections: connection pool size, which bounds concurrent polls.
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(settings)
        self._send: AsyncSend
        self._close: Callable[[], Awaitable[None]]
        if transport is None:
            # Imported here: workers use the blocking client and need not load aiohttp (~0.2 s of CPU).
            from airflow_provider_imagen.api.aiohttp_sender import AiohttpSender

            sender = AiohttpSender(timeout=settings.timeout, max_connections=max_connections)
            self._send, self._close = sender.send, sender.aclose
        else:
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            http = httpx.AsyncClient(timeout=settings.timeout, transport=transport, limits=limits)

            async def send(call: Call, *, stream: bool = False) -> httpx.Response:
                return await http.send(to_httpx(call), stream=stream)

            self._send, self._close = send, http.aclose

    async def submit(self, request: ImageRequest, *, idempotency_key: str | None = None) -> Task:
        """POST one paid request; never retried once it may have created a task."""
        return await self._run(self._submit_flow(request, idempotency_key))

    async def get_task(self, task_id: str) -> Task:
        """Return the task's current state (free; retried on transient errors)."""
        return await self._run(self._get_task_flow(task_id))

    async def get_balance(self) -> int:
        """Return the account's credits (free)."""
        return await self._run(self._balance_flow())

    async def download_image(self, url: str, sink: IO[bytes] | None = None) -> DownloadedImage:
        """Stream the image at ``url`` into ``sink`` (or memory), checking its type and size."""
        response = await self._run(self._download_flow(url), stream=True)
        try:
            receiver = _ImageReceiver(url, response.headers, self.settings.max_image_bytes, sink)
            async for chunk in response.aiter_bytes():
                receiver.feed(chunk)
        except httpx.TransportError as exc:
            raise DownloadError(f"download of {redact_url(url)} broke off: {type(exc).__name__}") from exc
        finally:
            await response.aclose()
        return receiver.finish()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._close()

    async def __aenter__(self) -> AsyncImagenClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, flow: Flow[T], *, stream: bool = False) -> T:
        step = next(flow)
        while True:
            outcome: Any = None
            if isinstance(step, float):
                await asyncio.sleep(step)
            else:
                try:
                    outcome = await self._send(step, stream=stream)
                except httpx.TransportError as exc:
                    outcome = exc
                else:
                    if stream and not outcome.is_success:
                        await outcome.aread()
                        await outcome.aclose()
            try:
                step = flow.send(outcome)
            except StopIteration as done:
                return done.value


class _ImageReceiver:
    """Checks an image body as it streams in: type, size cap, sha256, and pixel size from its head."""

    def __init__(self, url: str, headers: httpx.Headers, max_bytes: int, sink: IO[bytes] | None) -> None:
        self._url = url
        self._max = max_bytes
        self._sink = sink if sink is not None else io.BytesIO()
        self._keep = sink is None
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._size = 0
        self.content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if not self.content_type.startswith("image/"):
            raise ImageRefusedError(
                f"refusing {redact_url(url)}: content type {self.content_type or 'missing'!r} is not an image"
            )
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ImageRefusedError(
                f"refusing {redact_url(url)}: {declared} bytes is over the {max_bytes} cap"
            )

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max:
            raise ImageRefusedError(
                f"refusing {redact_url(self._url)}: body is over the {self._max} byte cap"
            )
        self._hash.update(chunk)
        if len(self._head) < _HEAD_BYTES:
            self._head.extend(chunk[: _HEAD_BYTES - len(self._head)])
        self._sink.write(chunk)

    def finish(self) -> DownloadedImage:
        if self._size == 0:
            raise ImageRefusedError(f"refusing {redact_url(self._url)}: empty body")
        width, height = image_dimensions(bytes(self._head))
        content = self._sink.getvalue() if self._keep else None  # type: ignore[attr-defined]
        return DownloadedImage(self.content_type, self._size, self._hash.hexdigest(), width, height, content)


def to_httpx(call: Call) -> httpx.Request:
    """Return ``call`` as an ``httpx.Request`` (the blocking client, or an httpx transport)."""
    return httpx.Request(call.method, call.url, headers=call.headers, content=call.content)


def image_dimensions(head: bytes) -> tuple[int | None, int | None]:
    """Return (width, height) from the first bytes of an image; PNG directly, others through Pillow."""
    if head[:8] == _PNG_MAGIC and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    try:
        from PIL import Image

        with Image.open(io.BytesIO(head)) as image:
            return image.size
    except Exception:
        return None, None


def _is_reply(outcome: Reply | httpx.TransportError | None) -> TypeGuard[Reply]:
    """Return whether a flow was sent an answer (not a transport failure, not a wake-up from sleep)."""
    return outcome is not None and not isinstance(outcome, httpx.TransportError)


def _retry_after(outcome: Reply | httpx.TransportError | None) -> float | None:
    if _is_reply(outcome) and outcome.status_code == 429:
        return parse_retry_after(outcome.headers.get("retry-after"))
    return None


def _api_path(url: str) -> str:
    path = urlsplit(url).path
    return path[path.find(API_PREFIX) + len(API_PREFIX) :] if API_PREFIX in path else path


def _envelope(response: Reply) -> tuple[int | None, str, str | None]:
    """Return (code, message, request_id) from an error body, tolerating bodies that are not envelopes."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return None, (response.reason_phrase or "error").strip(), None
    code = error.get("code")
    return (
        int(code) if isinstance(code, (int, str)) and str(code).isdigit() else None,
        str(error.get("message") or response.reason_phrase or "error"),
        error.get("request_id") if isinstance(error.get("request_id"), str) else None,
    )


_STATUS_ERRORS: Final[dict[int, type[ImagenAPIError]]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    404: TaskNotFoundError,
    422: InvalidRequestError,
}


def _api_error(call: Call, outcome: Reply | httpx.TransportError, *, submit: bool) -> ImagenError:
    """Map the last outcome of an API call to our hierarchy, most specific first."""
    method, path = call.method, _api_path(call.url)
    if isinstance(outcome, httpx.TransportError):
        kind = type(outcome).__name__
        if submit and not isinstance(outcome, NOT_SENT_ERRORS):
            return AmbiguousSubmitError(f"{kind} after the request was sent")
        return ImagenTransportError(f"{method} {path}: {kind}: {outcome}")
    code, message, request_id = _envelope(outcome)
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
        return ImagenAPIError(message, url=_without_userinfo(call.url), **info)
    return _STATUS_ERRORS.get(status, ImagenAPIError)(message, **info)


def _download_error(url: str, outcome: Reply | httpx.TransportError) -> DownloadError:
    where = redact_url(url)
    if isinstance(outcome, httpx.TransportError):
        return DownloadError(f"download of {where} failed: {type(outcome).__name__}")
    if outcome.status_code in (403, 404, 410):
        return ImageExpiredError(
            f"image at {where} is gone (HTTP {outcome.status_code}): signed URLs live 24 h; "
            "regenerating it would be paid again"
        )
    return DownloadError(f"download of {where} failed: HTTP {outcome.status_code}")
