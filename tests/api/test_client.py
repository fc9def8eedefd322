"""The sync and async clients against the emulator over loopback: every documented path, both twins.

Each scenario runs twice, once per client, through ``client``: an adapter that gives the sync client
the async client's awaitable surface, so both must behave the same to pass the same test.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from PIL import Image

from airflow_provider_imagen.api import (
    PIXEL_SIZES,
    AmbiguousSubmitError,
    AsyncImagenClient,
    AuthenticationError,
    ClientSettings,
    ContentModeratedError,
    DownloadError,
    ImageExpiredError,
    ImagenAPIError,
    ImagenClient,
    ImagenTransportError,
    ImageRequest,
    InsufficientCreditsError,
    InvalidRequestError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    Task,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.errors import task_failure

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.2)


class SyncAdapter:
    """The blocking client behind ``await``: it blocks the test's loop, which only waits on it anyway."""

    def __init__(self, client: ImagenClient) -> None:
        self.inner = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return call


def settings_for(emulator: Any, **changes: Any) -> ClientSettings:
    base = ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url, timeout=5.0, retry=FAST_RETRY)
    return replace(base, **changes)


@pytest.fixture(params=["sync", "async", "async-httpx"])
async def make_client(request: pytest.FixtureRequest, emulator: Any) -> AsyncIterator[Any]:
    opened: list[Any] = []

    def make(**changes: Any) -> Any:
        settings = settings_for(emulator, **changes)
        if request.param == "sync":
            client: Any = ImagenClient(settings)
            opened.append(client.close)
            return SyncAdapter(client)
        # "async" sends through aiohttp (the triggerer's client, ImagenHook.aget_conn); "async-httpx" runs
        # the same flows through httpx.AsyncClient and httpx's own network stack.
        transport = httpx.AsyncHTTPTransport() if request.param == "async-httpx" else None
        client = AsyncImagenClient(settings, transport=transport)
        opened.append(client.aclose)
        return client

    yield make
    for close in opened:
        result = close()
        if asyncio.iscoroutine(result):
            await result


@pytest.fixture
def client(make_client: Any) -> Any:
    return make_client()


async def wait_terminal(client: Any, task_id: str, limit: float = 15.0) -> Task:
    deadline = time.monotonic() + limit
    while True:
        task = await client.get_task(task_id)
        if task.is_terminal or time.monotonic() > deadline:
            return task
        await asyncio.sleep(0.1)


class TestHappyPath:
    async def test_submit_poll_download(self, client: Any, emulator: Any) -> None:
        submitted = await client.submit(ImageRequest("a lighthouse at dawn", size="1:1"))
        assert submitted.id.startswith("task_") and submitted.status == "processing"
        task = await wait_terminal(client, submitted.id)
        assert task.status == "completed" and task.image_url
        image = await client.download_image(task.image_url)
        assert image.content_type == "image/png" and image.size_bytes == len(image.content)
        with Image.open(io.BytesIO(image.content)) as png:
            assert png.format == "PNG" and png.size == (image.width, image.height)
        ledger = emulator.ledger()
        assert (ledger["posts"], ledger["tasks_created"], ledger["credits_charged"]) == (1, 1, 46)

    async def test_real_pixel_sizes_per_ratio(self, client: Any, emulator: Any) -> None:
        emulator.configure(image_scale=1.0)
        for size in ("9:16", "4:3"):
            task = await wait_terminal(client, (await client.submit(ImageRequest("sizes", size=size))).id)
            image = await client.download_image(task.image_url, io.BytesIO())
            assert (image.width, image.height) == PIXEL_SIZES[size]
            assert image.content is None  # streamed into the sink, not kept

    async def test_chinese_prompt_round_trips(self, client: Any, emulator: Any) -> None:
        prompt = "一只在雪山上奔跑的红色狐狸，电影感光线"
        task = await wait_terminal(client, (await client.submit(ImageRequest(prompt))).id)
        assert task.status == "completed"
        assert emulator.ledger()["submissions_by_prompt"] == {prompt: 1}
        assert (await client.download_image(task.image_url)).width

    async def test_balance_reads_are_free(self, client: Any, emulator: Any) -> None:
        before = await client.get_balance()
        await client.submit(ImageRequest("one paid image"))
        assert await client.get_balance() == before - 46


class TestDocumentedErrors:
    async def test_invalid_key_is_10003(self, make_client: Any, emulator: Any) -> None:
        client = make_client(api_key="rk_not_a_real_key")
        with pytest.raises(AuthenticationError) as info:
            await client.submit(ImageRequest("x"))
        assert (info.value.status_code, info.value.code) == (401, 10003)
        assert emulator.ledger()["tasks_created"] == 0

    async def test_revoked_key_is_10004(self, make_client: Any, emulator: Any) -> None:
        emulator.configure(api_keys=(emulator.api_key, "rk_revoked_key"), revoked_keys=("rk_revoked_key",))
        with pytest.raises(AuthenticationError) as info:
            await make_client(api_key="rk_revoked_key").get_balance()
        assert info.value.code == 10004

    async def test_server_side_validation_is_400(self, client: Any, emulator: Any) -> None:
        request = ImageRequest("x")
        # The only way to reach the server's own check is to get past ours.
        object.__setattr__(request, "size", "2:1")
        with pytest.raises(InvalidRequestError) as info:
            await client.submit(request)
        assert info.value.status_code == 400 and info.value.code
        assert emulator.ledger()["tasks_created"] == 0

    async def test_insufficient_credits_is_402_and_creates_nothing(self, client: Any, emulator: Any) -> None:
        emulator.configure(starting_balance=45)
        emulator.reset()
        with pytest.raises(InsufficientCreditsError) as info:
            await client.submit(ImageRequest("too expensive"))
        assert info.value.status_code == 402
        assert emulator.ledger()["tasks_created"] == 0

    async def test_unknown_task_is_404(self, client: Any) -> None:
        with pytest.raises(TaskNotFoundError) as info:
            await client.get_task("task_00000000000000000000000000000000")
        assert info.value.status_code == 404

    async def test_moderated_task_fails_with_80006_and_is_refunded(self, client: Any, emulator: Any) -> None:
        task = await wait_terminal(client, (await client.submit(ImageRequest("[[moderate]] a scene"))).id)
        assert (task.status, task.error_code) == ("failed", 80006)
        assert isinstance(task_failure(task.id, task.error_code, task.error_message), ContentModeratedError)
        ledger = emulator.ledger()
        assert ledger["credits_charged"] == 46 and ledger["credits_refunded"] == 46

    async def test_failed_task_is_refunded(self, client: Any, emulator: Any) -> None:
        task = await wait_terminal(client, (await client.submit(ImageRequest("[[fail]] a scene"))).id)
        assert task.status == "failed" and task.error_code != 80006
        assert emulator.ledger()["net_credits"] == 0


class TestRetries:
    async def test_get_waits_for_retry_after(self, client: Any, emulator: Any) -> None:
        emulator.configure(rate_limit_rps=0.5)
        await client.get_balance()  # spends the bucket's token
        started = time.monotonic()
        await client.get_balance()  # 429 with Retry-After: 1 (or more), then retried
        assert time.monotonic() - started >= 1.0
        assert emulator.ledger()["rate_limited"] >= 1

    async def test_submit_after_429_is_retried_once_nothing_was_created(
        self, client: Any, emulator: Any
    ) -> None:
        emulator.configure(rate_limit_rps=0.5)
        await client.get_balance()
        task = await client.submit(ImageRequest("rate limited then accepted"))
        ledger = emulator.ledger()
        assert task.id and ledger["rate_limited"] >= 1
        assert ledger["submissions_by_prompt"] == {"rate limited then accepted": 1}

    async def test_a_submit_asked_not_to_wait_hands_the_429_back_at_once(
        self, client: Any, emulator: Any
    ) -> None:
        """A caller that paces itself on 429s hears each one: one POST, nothing created, the wait asked."""
        emulator.configure(rate_limit_rps=0.5)
        await client.get_balance()
        with pytest.raises(RateLimitedError) as info:
            await client.submit(ImageRequest("rate limited, handed back"), retry_rate_limited=False)
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        ledger = emulator.ledger()
        assert ledger["posts"] == 1 and ledger["tasks_created"] == 0 and ledger["credits_charged"] == 0

    async def test_gets_retry_5xx_then_give_up(self, client: Any, emulator: Any) -> None:
        emulator.configure(error_rate_5xx=1.0)
        with pytest.raises(ServerError) as info:
            await client.get_balance()
        assert info.value.status_code == 500
        assert emulator.ledger()["server_errors"] == FAST_RETRY.max_attempts

    async def test_gets_survive_intermittent_5xx(self, make_client: Any, emulator: Any) -> None:
        emulator.configure(error_rate_5xx=0.3, seed=7)
        client = make_client(retry=replace(FAST_RETRY, max_attempts=10))
        for _ in range(10):
            assert await client.get_balance() > 0
        assert emulator.ledger()["server_errors"] > 0


class TestAmbiguousSubmits:
    async def test_task_created_then_502_is_not_retried(self, client: Any, emulator: Any) -> None:
        prompt = "[[ambiguous]] a paid task whose id never arrives"
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(ImageRequest(prompt))
        assert info.value.status_code == 502
        ledger = emulator.ledger()
        assert ledger["posts"] == 1 and ledger["submissions_by_prompt"] == {prompt: 1}
        assert ledger["credits_charged"] == 46

    async def test_5xx_on_submit_is_ambiguous_and_sent_once(self, client: Any, emulator: Any) -> None:
        emulator.configure(error_rate_5xx=1.0)
        with pytest.raises(AmbiguousSubmitError):
            await client.submit(ImageRequest("x"))
        assert emulator.ledger()["posts"] == 1

    async def test_timeout_after_sending_is_ambiguous_and_sent_once(
        self, make_client: Any, emulator: Any
    ) -> None:
        emulator.configure(response_delay=1.0)
        client = make_client(timeout=0.3)
        with pytest.raises(AmbiguousSubmitError, match="ReadTimeout"):
            await client.submit(ImageRequest("slow answer"))
        await asyncio.sleep(1.0)  # let the server finish what it was doing
        assert emulator.ledger()["posts"] == 1

    async def test_connection_refused_is_retried_and_not_ambiguous(self, make_client: Any) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = make_client(base_url=f"http://127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(ImagenTransportError, match="ConnectError"):
            await client.submit(ImageRequest("nobody listens"))
        assert time.monotonic() - started < 5


class TestDownloads:
    async def test_non_image_content_is_refused(self, client: Any) -> None:
        task = await wait_terminal(client, (await client.submit(ImageRequest("[[html]] page"))).id)
        with pytest.raises(DownloadError, match="text/html"):
            await client.download_image(task.image_url)

    async def test_body_over_the_cap_is_refused(self, make_client: Any) -> None:
        client = make_client(max_image_bytes=1000)
        task = await wait_terminal(client, (await client.submit(ImageRequest("big"))).id)
        with pytest.raises(DownloadError, match="1000"):
            await client.download_image(task.image_url)

    async def test_expired_url_is_reported_as_expired(self, client: Any, emulator: Any) -> None:
        emulator.configure(image_ttl=0.5)
        task = await wait_terminal(client, (await client.submit(ImageRequest("short lived"))).id)
        await asyncio.sleep(1.6)  # the URL's expiry is a whole unix second, at least the TTL after ready
        with pytest.raises(ImageExpiredError) as info:
            await client.download_image(task.image_url)
        assert "sig=" not in str(info.value) and "expires=" not in str(info.value)

    async def test_non_http_urls_are_refused(self, client: Any) -> None:
        with pytest.raises(DownloadError, match="not an http"):
            await client.download_image("file:///etc/passwd")


class TestSecrets:
    async def test_key_never_in_logs_errors_or_reprs(
        self,
        make_client: Any,
        emulator: Any,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        secret = "rk_secret_value_that_must_not_leak"
        emulator.configure(api_keys=(emulator.api_key, secret))
        caplog.set_level(logging.DEBUG)
        # Airflow's logging config, applied when other test modules import Airflow, quiets these loggers:
        # without this the check below would read only httpcore's lines, not the request lines (httpx's,
        # or the aiohttp sender's) that carry URLs.
        for name in ("httpx", "airflow_provider_imagen.api.aiohttp_sender"):
            request_logger = logging.getLogger(name)
            caplog.set_level(logging.DEBUG, logger=name)
            monkeypatch.setattr(request_logger, "disabled", False)
            monkeypatch.setattr(request_logger, "propagate", True)
        texts: list[str] = []
        client = make_client(api_key=secret)
        task = await wait_terminal(client, (await client.submit(ImageRequest("secret test"))).id)
        await client.download_image(task.image_url)
        emulator.configure(error_rate_5xx=1.0)
        for call in (client.get_balance(), client.submit(ImageRequest("x"))):
            with pytest.raises(Exception) as info:
                await call
            texts += [str(info.value), repr(info.value)]
        inner = getattr(client, "inner", client)
        texts += [repr(inner), repr(inner.settings), caplog.text]
        request_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP Request")]
        assert any("/…/" in line for line in request_lines)  # the requests were logged, URLs redacted
        for text in texts:
            assert secret not in text
        assert "sig=" not in caplog.text  # signed image URL redacted in the request lines


# -- errors that name the real mistake -------------------------------------------------------------------


async def test_a_base_url_with_a_path_is_a_404_that_names_the_full_url(
    make_client: Any, emulator: Any
) -> None:
    """Every route of the contract answers 404 under a wrong path: not a "task not found", and the error
    shows the URL that was asked (the API path alone, ``/balance``, hides the mistake)."""
    client = make_client(base_url=emulator.base_url + "/v2")
    with pytest.raises(ImagenAPIError) as info:
        await client.get_balance()
    assert type(info.value) is ImagenAPIError  # not TaskNotFoundError: no task was asked for
    message = str(info.value)
    assert f"GET {emulator.base_url}/v2/api/v1/balance: HTTP 404" in message, message
    assert "check the connection's Base URL" in message and "its path '/v2' is kept as given" in message
    assert "code None" not in message


async def test_a_host_without_a_scheme_says_that_https_was_assumed(make_client: Any, emulator: Any) -> None:
    """The emulator speaks plain HTTP; ``127.0.0.1:port`` becomes ``https://…`` and the TLS handshake
    fails. The error must say so, and how to write the host instead."""
    host = emulator.base_url.removeprefix("http://")
    client = make_client(base_url=host, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(ImagenTransportError) as info:
        await client.get_balance()
    message = str(info.value)
    assert f"the connection's host '{host}' has no scheme, so https:// was assumed" in message, message
    assert f"set the host to http://{host}" in message
    assert emulator.ledger()["requests"] == 0  # the handshake failed: nothing reached the API


def test_a_host_with_a_scheme_is_not_said_to_be_assumed() -> None:
    assert ClientSettings(api_key="k", base_url="reapi.ai").https_assumed
    assert not ClientSettings(api_key="k", base_url="https://reapi.ai").https_assumed
    assert not ClientSettings(api_key="k").https_assumed  # the default is written out in full


async def test_a_402_shows_the_apis_own_code(client: Any, emulator: Any) -> None:
    emulator.set_balance(0)
    with pytest.raises(InsufficientCreditsError) as info:
        await client.submit(ImageRequest("a lamp", "1:1"))
    assert info.value.code == 30001
    assert "HTTP 402, code 30001: Insufficient credits" in str(info.value)


def test_error_text_shows_no_code_none_and_no_http_status_for_the_providers_own_summaries() -> None:
    answered = ServerError("Service Unavailable", status_code=503, method="GET", path="/tasks/task_1")
    assert str(answered) == "GET /tasks/task_1: HTTP 503: Service Unavailable"
    summary = InsufficientCreditsError("the account ran out of credits", status_code=402)
    assert str(summary) == "the account ran out of credits"
    assert "code None" not in str(ImagenAPIError("x", status_code=418, method="GET", path="/balance"))


def test_an_ambiguous_submit_of_an_earlier_try_is_not_wrapped_twice() -> None:
    first = AmbiguousSubmitError("ReadTimeout after the request was sent")
    again = AmbiguousSubmitError(first.reason, earlier_try=True)
    message = str(again)
    assert message.count("submit outcome unknown") == 1 and message.count("ReadTimeout") == 1, message
    assert "an earlier try sent this request but never learned its task id" in message
    assert "resubmit_unknown=True" in message and again.reason == first.reason


class TestBrokenDownloads:
    """A real loopback server that cuts the image off mid-body: the client fetches it again whole."""

    @pytest.fixture
    def flaky_image(self) -> Any:
        import http.server
        import io
        import threading

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (1024, 1024), (200, 120, 40)).save(buffer, format="PNG")
        png = buffer.getvalue()
        served: list[int] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.append(1)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                if len(served) <= breaks:
                    self.wfile.write(png[: len(png) // 3])  # and the connection closes: a body cut off
                    self.close_connection = True
                    return
                self.wfile.write(png)

            def log_message(self, *args: Any) -> None:
                pass

        breaks = 1
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}/image.png", png, served
        server.shutdown()
        server.server_close()

    async def test_a_body_cut_off_once_is_fetched_again_whole(self, client: Any, flaky_image: Any) -> None:
        url, png, served = flaky_image
        image = await client.download_image(url)
        assert image.content == png and (image.width, image.height) == (1024, 1024)
        assert len(served) == 2  # one broken answer, one whole

    async def test_into_a_sink_a_cut_off_body_is_not_fetched_again(
        self, client: Any, flaky_image: Any
    ) -> None:
        import io

        from airflow_provider_imagen.api.errors import DownloadError

        url, _, served = flaky_image
        with pytest.raises(DownloadError, match="broke off"):
            await client.download_image(url, io.BytesIO())  # part of it is in the sink already
        assert len(served) == 1
