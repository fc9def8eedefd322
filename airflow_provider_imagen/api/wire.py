"""What a flow asks to send (:class:`Call`) and what it reads back (:class:`Reply`): plain data, no client.

Why not ``httpx.Request`` and ``httpx.Response``: building them parses and validates the URL and every
header on each request, ~40 µs of CPU per poll; a trigger watching 2,000 renders polls ~5,000 times in ten
seconds, in a triggerer shared with every other trigger. A flow needs none of that: it names a method, a
URL, headers and a body, and reads a status, headers and a JSON body. Each sender turns a :class:`Call`
into what its library sends (the blocking client into an ``httpx.Request``; the async client straight
into aiohttp) and answers with anything shaped like :class:`Reply` (``httpx.Response`` is one).

Transport failures stay ``httpx.TransportError`` subclasses whichever library moved the bytes: they are
what the retry policy classifies (sent or not sent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request as a flow asks for it."""

    method: str
    #: Absolute and already percent-encoded.
    url: str
    #: May carry the API key: left out of ``repr``.
    headers: Mapping[str, str] = field(repr=False)
    #: The request body, if any (JSON requests: see :func:`json_call`).
    content: bytes | None = field(default=None, repr=False)
    #: Answer as soon as the headers arrive and leave the body open (image downloads).
    stream: bool = False


def json_call(method: str, url: str, headers: Mapping[str, str], body: Any) -> Call:
    """Return a :class:`Call` with ``body`` as UTF-8 JSON (encoded as httpx encodes ``json=``)."""
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    return Call(method, url, {**headers, "Content-Type": "application/json"}, content)


class Headers(Protocol):
    """Case-insensitive header lookup (``httpx.Headers``, aiohttp's ``CIMultiDictProxy``)."""

    def get(self, key: str, default: Any = None) -> Any: ...


class Reply(Protocol):
    """An HTTP answer as a flow reads it."""

    @property
    def status_code(self) -> int: ...

    @property
    def reason_phrase(self) -> str: ...

    @property
    def headers(self) -> Headers: ...

    @property
    def is_success(self) -> bool: ...

    def json(self) -> Any: ...
