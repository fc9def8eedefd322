"""The aiohttp sender's own duties: proxies from the environment, encoded bodies, and what it never shows.

The flows it carries are tested in test_client.py (every test there runs through it as "async").
"""

from __future__ import annotations

import gzip
import socket
import zlib
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from airflow_provider_imagen.api.aiohttp_sender import AiohttpSender, _Reply
from airflow_provider_imagen.api.client import AsyncImagenClient, ClientSettings
from airflow_provider_imagen.api.errors import ImagenTransportError
from airflow_provider_imagen.api.retry import RetryPolicy
from airflow_provider_imagen.api.wire import json_call

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY")


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_proxy_comes_from_the_environment_once_per_host(clean_proxy_env: pytest.MonkeyPatch) -> None:
    clean_proxy_env.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    clean_proxy_env.setenv("NO_PROXY", "internal.corp")
    sender = AiohttpSender(timeout=1)
    assert sender.proxy_for(URL("https://reapi.ai/api/v1/tasks/x")) == "http://proxy.corp:3128"
    assert sender.proxy_for(URL("https://cdn.internal.corp/a.png")) is None  # NO_PROXY
    assert sender.proxy_for(URL("http://reapi.ai/")) is None  # no HTTP_PROXY
    clean_proxy_env.setenv("HTTP_PROXY", "http://other:1")
    assert sender.proxy_for(URL("http://reapi.ai/")) is None  # remembered: looked up once per host


async def test_requests_go_through_the_proxy_unless_no_proxy(
    clean_proxy_env: pytest.MonkeyPatch, emulator: Any
) -> None:
    """A proxy that is down proves the request went to it; NO_PROXY sends the same call direct."""
    settings = ClientSettings(
        api_key=emulator.api_key, base_url=emulator.base_url, timeout=2, retry=RetryPolicy(max_attempts=1)
    )
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    async with AsyncImagenClient(settings) as client:
        with pytest.raises(ImagenTransportError, match="ConnectError"):
            await client.get_balance()
    clean_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    async with AsyncImagenClient(settings) as client:
        assert await client.get_balance() >= 0


@pytest.mark.parametrize(
    ("encoding", "encode"), [("gzip", gzip.compress), ("deflate", zlib.compress), ("identity", bytes)]
)
def test_a_body_encoded_anyway_is_decoded(encoding: str, encode: Any) -> None:
    """It asks for no encoding; a server (or a proxy) that encodes anyway is still understood."""
    headers = CIMultiDictProxy(CIMultiDict({"content-encoding": encoding}))
    reply = _Reply(200, "OK", headers, encode(b'{"balance": 7}'))
    assert reply.json() == {"balance": 7} and reply.is_success
    broken = _Reply(200, "OK", headers, b"not compressed")
    with pytest.raises(ValueError):
        broken.json()


def test_a_call_keeps_its_headers_and_body_out_of_repr() -> None:
    call = json_call("POST", "https://reapi.ai/api/v1/x", {"Authorization": "Bearer rk_secret"}, {"p": 1})
    assert "rk_secret" not in repr(call) and "Bearer" not in repr(call)
    assert call.content == b'{"p":1}' and call.headers["Content-Type"] == "application/json"
