"""Send the async client's calls straight through aiohttp: a trigger's polls at a fraction of the CPU.

Why: a trigger watching 2,000 renders polls ~5,000 times in ~10 s, and the triggerer shares its core with
every other trigger. Through ``httpx.AsyncClient`` and its own pool (httpcore) one GET cost ~0.9–1.8 ms of
CPU; through ``httpx.AsyncClient`` over an aiohttp transport ~0.27 ms, half of it request/response objects
and client steps (auth, redirects, cookies, hooks) these calls never use. Here a
:class:`~airflow_provider_imagen.api.wire.Call` goes to aiohttp as it is and the answer comes back as a
small :class:`_Reply` (docs/benchmarks.md, scenario 3). Streams (image downloads) come back as
``httpx.Response`` objects over the aiohttp body, for the client's streaming code.

Failure mapping (what the retry policy needs to know: was the request possibly sent?):
- could not connect (refused, DNS, connect timeout) → ``httpx.ConnectError`` / ``httpx.ConnectTimeout``:
  nothing was sent;
- anything after the connection was made (read timeout, reset, a broken body) → ``httpx.ReadTimeout`` /
  ``httpx.ReadError``: the request may have been received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDictProxy
from yarl import URL

from airflow_provider_imagen.api.urls import redact_url
from airflow_provider_imagen.api.wire import Call

#: Read size when streaming a body back to httpx.
_CHUNK = 64 * 1024
#: Never set by aiohttp: the client decodes bodies itself (httpx for streams, :class:`_Reply` for JSON).
_SKIP_AUTO_HEADERS = ("Accept-Encoding", "User-Agent", "Content-Type")

_log = logging.getLogger(__name__)


class _Reply:
    """A whole, small answer (API JSON) as the flows read it: see ``wire.Reply``."""

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(self, status_code: int, reason: str | None, headers: CIMultiDictProxy[str], content: bytes):
        self.status_code = status_code
        self.reason_phrase = reason or ""
        self.headers = headers
        self.content = content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        content = self.content
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):  # not asked for, but a server may send it anyway
            try:
                content = zlib.decompress(content, wbits=47)  # gzip or zlib, told apart by the header
            except zlib.error as exc:
                raise ValueError(f"body is not valid {encoding}: {exc}") from None
        return json.loads(content)


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
    """Send :class:`~airflow_provider_imagen.api.wire.Call` objects with one aiohttp session.

    The session (a pool of at most ``max_connections``) is opened on first use, inside the event loop
    that uses it (a trigger's). Like httpx it follows no redirect and keeps no cookies. Proxies follow
    aiohttp's own ``trust_env`` rules (``HTTP(S)_PROXY``, ``NO_PROXY``, proxy credentials from
    ``.netrc``), looked up once per scheme and host: ``trust_env`` itself looks them up on every request,
    which tripled the CPU of a poll. A request line is logged at DEBUG with its URL redacted.

    :param timeout: seconds to connect (including waiting for a pooled connection) and between reads.
    :param max_connections: connection pool size.
    """

    def __init__(self, *, timeout: float, max_connections: int = 100) -> None:
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], tuple[URL | None, aiohttp.BasicAuth | None]] = {}

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def proxy_for(self, url: URL) -> str | None:
        """Return the environment's proxy for ``url`` (``None``: direct), remembered per scheme and host."""
        proxy, _ = self._proxy(url)
        return None if proxy is None else str(proxy)

    def _proxy(self, url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        key = (url.scheme, url.host or "")
        if key not in self._proxies:
            # httpx keeps its own matcher private (httpx._utils), so the rules are aiohttp's, which
            # differ from httpx's in two places: ALL_PROXY and CIDR ranges in NO_PROXY are not honoured.
            try:
                self._proxies[key] = get_env_proxy_for_url(url)
            except LookupError:  # no proxy for this scheme, or NO_PROXY names the host
                self._proxies[key] = (None, None)
        return self._proxies[key]

    async def send(self, call: Call, *, stream: bool = False) -> Any:
        """Send ``call``; answer a ``_Reply``, or with ``stream`` an ``httpx.Response`` to read and close."""
        url = URL(call.url)
        proxy, proxy_auth = self._proxy(url)
        try:
            response = await self._open().request(
                call.method,
                url,
                headers=call.headers,
                data=call.content,
                allow_redirects=False,
                proxy=proxy,
                proxy_auth=proxy_auth,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ClientProxyConnectionError) as exc:
            raise httpx.ConnectError(f"could not connect: {type(exc).__name__}") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout("connecting timed out") from exc
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout("waiting for the answer timed out") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(f"the exchange broke off: {type(exc).__name__}") from exc
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug('HTTP Request: %s %s "%d"', call.method, redact_url(call.url), response.status)
        if stream:
            headers = list(response.raw_headers)
            return httpx.Response(response.status, headers=headers, stream=_Body(response))
        try:
            content = await response.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise _body_error(exc) from exc
        finally:
            response.release()
        return _Reply(response.status, response.reason, response.headers, content)

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _body_error(exc: BaseException) -> httpx.TransportError:
    if isinstance(exc, asyncio.TimeoutError):
        return httpx.ReadTimeout(f"reading the body timed out: {type(exc).__name__}")
    return httpx.ReadError(f"reading the body failed: {type(exc).__name__}")
