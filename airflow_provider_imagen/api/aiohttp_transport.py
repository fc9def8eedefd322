"""An httpx transport that sends through aiohttp: the async client's requests at a fraction of the CPU.

Why: a trigger watching 2,000 renders polls ~2,500 times in ~15 s. Through httpx's own transport
(httpcore) each GET costs ~0.9–1.8 ms of CPU, most of it in its connection-pool bookkeeping; through aiohttp
the same GET costs ~0.15 ms (measured against the emulator, docs/benchmarks.md, scenario 3). The flows,
retries and error types of :mod:`airflow_provider_imagen.api.client` stay exactly as they are: this only
moves bytes, and reports failures as the httpx exceptions the retry policy already classifies.

Failure mapping (what the retry policy needs to know: was the request possibly sent?):
- could not connect (refused, DNS, connect timeout) → ``httpx.ConnectError`` / ``httpx.ConnectTimeout``:
  nothing was sent;
- anything after the connection was made (read timeout, reset, a broken body) → ``httpx.ReadTimeout`` /
  ``httpx.ReadError``: the request may have been received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

#: Read size when streaming a body back to httpx.
_CHUNK = 64 * 1024


class _Body(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; closing it releases the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk
        except asyncio.TimeoutError as exc:
            raise httpx.ReadTimeout(f"reading the body timed out: {type(exc).__name__}") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(f"reading the body failed: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests with one aiohttp session (a pool of at most ``max_connections``).

    The session is opened on first use, inside the event loop that uses it (a trigger's). Bodies are
    passed through undecoded: httpx decodes them, as with its own transport.
    """

    def __init__(self, *, max_connections: int = 100) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("pool"),
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        body = await request.aread()
        try:
            response = await self._open().request(
                request.method,
                str(request.url),
                headers=list(request.headers.multi_items()),
                data=body or None,
                allow_redirects=False,
                timeout=timeout,
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
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response),
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
