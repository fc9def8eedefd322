"""Send the async client's requests through aiohttp, without httpx's client machinery around them.

Why: a trigger watching 2,000 renders polls ~5,000 times in ~10 s, and the triggerer shares its core with
every other trigger. Through ``httpx.AsyncClient`` and its own pool (httpcore) one GET costs ~0.9–1.8 ms
of CPU; through ``httpx.AsyncClient`` over an aiohttp transport ~0.27 ms, half of it the client's
per-request steps (auth, redirects, cookies, hooks, stream wrappers) that these calls never use; sent
straight through aiohttp ~0.17 ms (docs/benchmarks.md, scenario 3). The flows, retries and error types of
:mod:`airflow_provider_imagen.api.client` stay as they are: a flow still yields an ``httpx.Request`` and
reads an ``httpx.Response``; this only moves the bytes.

Failure mapping (what the retry policy needs to know: was the request possibly sent?):
- could not connect (refused, DNS, connect timeout) → ``httpx.ConnectError`` / ``httpx.ConnectTimeout``:
  nothing was sent;
- anything after the connection was made (read timeout, reset, a broken body) → ``httpx.ReadTimeout`` /
  ``httpx.ReadError``: the request may have been received.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import httpx
from yarl import URL

from airflow_provider_imagen.api.client import redact_url

#: Read size when streaming a body back to httpx.
_CHUNK = 64 * 1024

_log = logging.getLogger(__name__)


class _Body(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; closing it releases the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise _body_error(exc) from exc

    async def aclose(self) -> None:
        self._response.release()


class AiohttpSender:
    """Send ``httpx.Request`` objects with one aiohttp session; answer ``httpx.Response`` objects.

    The session (a pool of at most ``max_connections``) is opened on first use, inside the event loop
    that uses it (a trigger's). Like httpx it honours the proxy variables of the environment, follows no
    redirect and keeps no cookies. Bodies are passed through undecoded: ``httpx.Response`` decodes them.
    A request line is logged at DEBUG with its URL redacted (httpx logs its own at INFO).

    :param timeout: seconds to connect (including waiting for a pooled connection) and between reads.
    :param max_connections: connection pool size.
    """

    def __init__(self, *, timeout: float, max_connections: int = 100) -> None:
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send ``request``; with ``stream`` the body is left to read (close the response)."""
        try:
            response = await self._open().request(
                request.method,
                URL(str(request.url), encoded=True),  # httpx already percent-encoded it
                headers=list(request.headers.multi_items()),
                data=request.content or None,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except (aiohttp.ClientConnectorError, aiohttp.ClientProxyConnectionError) as exc:
            raise httpx.ConnectError(f"could not connect: {type(exc).__name__}", request=request) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout("connecting timed out", request=request) from exc
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout("waiting for the answer timed out", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(f"the exchange broke off: {type(exc).__name__}", request=request) from exc
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug('HTTP Request: %s %s "%d"', request.method, redact_url(request.url), response.status)
        headers = list(response.raw_headers)
        if stream:
            return httpx.Response(response.status, headers=headers, stream=_Body(response), request=request)
        try:
            content = await response.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise _body_error(exc, request) from exc
        finally:
            response.release()
        return httpx.Response(response.status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _body_error(exc: BaseException, request: httpx.Request | None = None) -> httpx.TransportError:
    if isinstance(exc, asyncio.TimeoutError):
        return httpx.ReadTimeout(f"reading the body timed out: {type(exc).__name__}", request=request)
    return httpx.ReadError(f"reading the body failed: {type(exc).__name__}", request=request)
