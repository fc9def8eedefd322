"""The two clients: a blocking one for workers and an async one for triggers, both thin drivers of flows.

Everything a call means (its request, its retries, its errors) is written once in
:mod:`~airflow_provider_imagen.api.flows`; a client only moves bytes and sleeps, which is all that differs
between blocking and async code. The API key travels only in the ``Authorization`` header of requests to
the API's own base URL (never to the image CDN), is not in any ``repr``, and is never put in an exception.

The names this module exported before the split (URL helpers, :class:`ClientSettings`,
:class:`DownloadedImage`, :func:`image_dimensions`) stay importable from here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

import httpx

from airflow_provider_imagen.api.flows import BaseClient, Drain, Flow, Outcome
from airflow_provider_imagen.api.images import DEFAULT_MAX_IMAGE_BYTES, DownloadedImage, image_dimensions
from airflow_provider_imagen.api.models import ImageRequest, Task
from airflow_provider_imagen.api.settings import ClientSettings
from airflow_provider_imagen.api.urls import (
    API_PREFIX,
    DEFAULT_BASE_URL,
    normalize_base_url,
    redact_url,
    scheme_assumed,
)
from airflow_provider_imagen.api.wire import Call

__all__ = [
    "API_PREFIX",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_IMAGE_BYTES",
    "AsyncImagenClient",
    "ClientSettings",
    "DownloadedImage",
    "ImagenClient",
    "image_dimensions",
    "normalize_base_url",
    "redact_url",
    "scheme_assumed",
    "to_httpx",
]

T = TypeVar("T")
#: An async sender: puts a call on the wire and answers its reply (``stream``: body left to read).
AsyncSend = Callable[..., Awaitable[Any]]


class ImagenClient(BaseClient):
    """Blocking client for workers: submit, poll, read the balance, download images.

    :param settings: key, base URL, timeout and retry policy.
    :param transport: an httpx transport to use instead of the network (tests, proxies).
    """

    def __init__(self, settings: ClientSettings, *, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(settings)
        self._http = httpx.Client(timeout=settings.timeout, transport=transport)

    def submit(
        self, request: ImageRequest, *, idempotency_key: str | None = None, retry_rate_limited: bool = True
    ) -> Task:
        """POST one paid request; never retried once it may have created a task.

        :param retry_rate_limited: wait out a 429 (``Retry-After``) and send again, as the retry policy
            allows; ``False`` raises :class:`~airflow_provider_imagen.api.errors.RateLimitedError` at
            once, for a caller that paces its submits on the API's 429s.
        """
        return self._run(self._submit_flow(request, idempotency_key, retry_rate_limited=retry_rate_limited))

    def get_task(self, task_id: str) -> Task:
        """Return the task's current state (free; retried on transient errors)."""
        return self._run(self._get_task_flow(task_id))

    def get_balance(self) -> int:
        """Return the account's credits (free)."""
        return self._run(self._balance_flow())

    def download_image(self, url: str, sink: IO[bytes] | None = None) -> DownloadedImage:
        """Stream the image at ``url`` into ``sink`` (or memory), checking its type and size."""
        return self._run(self._download_flow(url, sink))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ImagenClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, flow: Flow[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = flow.send(outcome)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Call):
                outcome = self._send(step)
            elif isinstance(step, Drain):
                outcome = _drain(step)
            else:
                time.sleep(step)
                outcome = None

    def _send(self, call: Call) -> httpx.Response | httpx.TransportError:
        try:
            response = self._http.send(to_httpx(call), stream=call.stream)
        except httpx.TransportError as exc:
            return exc
        if call.stream and not response.is_success:
            response.read()
            response.close()
        return response


class AsyncImagenClient(BaseClient):
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

    async def submit(
        self, request: ImageRequest, *, idempotency_key: str | None = None, retry_rate_limited: bool = True
    ) -> Task:
        """POST one paid request; never retried once it may have created a task.

        :param retry_rate_limited: as :meth:`ImagenClient.submit`'s.
        """
        flow = self._submit_flow(request, idempotency_key, retry_rate_limited=retry_rate_limited)
        return await self._run(flow)

    async def get_task(self, task_id: str) -> Task:
        """Return the task's current state (free; retried on transient errors)."""
        return await self._run(self._get_task_flow(task_id))

    async def get_balance(self) -> int:
        """Return the account's credits (free)."""
        return await self._run(self._balance_flow())

    async def download_image(self, url: str, sink: IO[bytes] | None = None) -> DownloadedImage:
        """Stream the image at ``url`` into ``sink`` (or memory), checking its type and size."""
        return await self._run(self._download_flow(url, sink))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._close()

    async def __aenter__(self) -> AsyncImagenClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, flow: Flow[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = flow.send(outcome)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Call):
                outcome = await self._send_call(step)
            elif isinstance(step, Drain):
                outcome = await _adrain(step)
            else:
                await asyncio.sleep(step)
                outcome = None

    async def _send_call(self, call: Call) -> Any:
        try:
            response = await self._send(call, stream=call.stream)
        except httpx.TransportError as exc:
            return exc
        if call.stream and not response.is_success:
            await response.aread()
            await response.aclose()
        return response


def to_httpx(call: Call) -> httpx.Request:
    """Return ``call`` as an ``httpx.Request`` (the blocking client, or an httpx transport)."""
    return httpx.Request(call.method, call.url, headers=call.headers, content=call.content)


def _drain(step: Drain) -> httpx.TransportError | None:
    response = step.response
    try:
        step.receiver.start(response.headers)
        for chunk in response.iter_bytes():
            step.receiver.feed(chunk)
    except httpx.TransportError as exc:
        return exc
    finally:
        response.close()
    return None


async def _adrain(step: Drain) -> httpx.TransportError | None:
    response = step.response
    try:
        step.receiver.start(response.headers)
        async for chunk in response.aiter_bytes():
            step.receiver.feed(chunk)
    except httpx.TransportError as exc:
        return exc
    finally:
        await response.aclose()
    return None
