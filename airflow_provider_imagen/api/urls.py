"""The API's URLs: where the API lives, and how a URL is shown in errors and logs without leaking.

Signed image URLs grant access to a paid image for 24 hours, and a base URL may carry ``user:password@``:
neither may reach a log line or an exception whole. :func:`redact_url` keeps enough to recognise a URL
(scheme, host, last path segment) and nothing that fetches it; importing this module installs a filter
that applies it to httpx's own request log lines.
"""

from __future__ import annotations

import logging
from typing import Final
from urllib.parse import urlsplit

import httpx

#: Where reAPI lives when a connection names no host.
DEFAULT_BASE_URL: Final = "https://reapi.ai"
#: The versioned API root under the base URL.
API_PREFIX: Final = "/api/v1"


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


def without_userinfo(url: str) -> str:
    """Return ``url`` without ``user:password@`` and query: safe to show in an error."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}"


def api_path(url: str) -> str:
    """Return the part of an API URL after :data:`API_PREFIX` (``/tasks/…``), as errors name a route."""
    path = urlsplit(url).path
    return path[path.find(API_PREFIX) + len(API_PREFIX) :] if API_PREFIX in path else path


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
