"""Every API call written once, as a *flow* that both clients drive.

A flow is a generator that yields what to do next and is sent back what happened, the way httpx's auth
flows are (``httpx/_auth.py``). It never does I/O itself, so the request building, the retry loop and
the error mapping exist once for the blocking and the async client. A flow yields one of:

- a :class:`Call`: the driver sends it (with ``call.stream``, answering once the headers arrive) and sends
  back the :class:`Reply`, or the ``httpx.TransportError`` that stopped it;
- a ``float``: the driver sleeps that many seconds and sends back ``None``;
- a :class:`Drain`: the driver reads the open body into its receiver, closes it, and sends back ``None``
  or the ``httpx.TransportError`` that broke the body off.

A streamed answer that is not a success is read and closed by the driver before the flow sees it; a
successful one is always drained next, so no connection is left open whichever way a flow ends.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import IO, Any, Protocol, TypeGuard, TypeVar, cast
from urllib.parse import quote, urlsplit

import httpx

from airflow_provider_imagen import __version__
from airflow_provider_imagen.api.error_mapping import api_error, download_error, explained
from airflow_provider_imagen.api.errors import (
    AmbiguousSubmitError,
    DownloadError,
    ImagenError,
    ImageRefusedError,
    ServerError,
)
from airflow_provider_imagen.api.images import DownloadedImage, ImageReceiver
from airflow_provider_imagen.api.models import ImageRequest, Task
from airflow_provider_imagen.api.retry import parse_retry_after
from airflow_provider_imagen.api.settings import ClientSettings
from airflow_provider_imagen.api.urls import API_PREFIX, api_path, redact_url
from airflow_provider_imagen.api.wire import Call, Reply, json_call

T = TypeVar("T")

#: What a driver sends back into a flow.
Outcome = Reply | httpx.TransportError | None


class BodyReceiver(Protocol):
    """Takes a streamed body: its headers first (it may refuse them), then its chunks."""

    def start(self, headers: Mapping[str, str]) -> None: ...

    def feed(self, chunk: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Drain:
    """Ask the driver to read ``response``'s open body into ``receiver`` and close it."""

    #: A streamed ``httpx.Response`` whose headers were sent to the flow.
    response: httpx.Response
    receiver: BodyReceiver


#: What a flow yields (send this call / sleep this long / read this body) and what it is sent back.
Flow = Generator["Call | float | Drain", Outcome, T]
#: Given the attempt number and its failed outcome: try again?
Decider = Callable[[int, "Reply | httpx.TransportError"], bool]
#: Given the failed outcome that ends the call: the error to raise.
ErrorMapper = Callable[["Reply | httpx.TransportError"], ImagenError]


class BaseClient:
    """Builds requests and defines every flow; knows nothing of how requests are sent."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._api_root = settings.base_url + API_PREFIX
        self._user_agent = f"airflow-provider-imagen/{__version__}"
        self._headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.settings.base_url!r})"

    # -- flows ---------------------------------------------------------------------------------

    def _submit_flow(
        self, request: ImageRequest, idempotency_key: str | None, *, retry_rate_limited: bool = True
    ) -> Flow[Task]:
        headers = {**self._headers, "Idempotency-Key": idempotency_key} if idempotency_key else self._headers
        call = json_call("POST", self._api_root + "/images/generations", headers, request.to_json())
        response = yield from self._api_exchange(call, submit=True, retry_rate_limited=retry_rate_limited)
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
        response = yield from self._api_exchange(call, submit=False)
        return _parse(call, response, Task.from_json)

    def _balance_flow(self) -> Flow[int]:
        call = Call("GET", self._api_root + "/balance", self._headers)
        response = yield from self._api_exchange(call, submit=False)
        return _parse(call, response, lambda body: int(body["balance"]))

    def _download_flow(self, url: str, sink: IO[bytes] | None) -> Flow[DownloadedImage]:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ImageRefusedError(f"refusing to download {redact_url(url)}: not an http(s) URL")
        # No Authorization header: the key belongs to the API, not to whatever host serves images.
        call = Call("GET", url, {"User-Agent": self._user_agent}, stream=True)
        policy = self.settings.retry
        attempt = 0
        while True:
            attempt += 1
            response = yield from self._exchange(
                call, retry=policy.retry_safe_call, error=partial(download_error, url)
            )
            receiver = ImageReceiver(url, self.settings.max_image_bytes, sink)
            # Both drivers answer a streamed call with an httpx.Response (the aiohttp sender wraps its body).
            broken = yield Drain(cast(httpx.Response, response), receiver)
            if not isinstance(broken, httpx.TransportError):
                return receiver.finish()
            # A body that broke off is fetched again whole, under the same policy as any safe call; not
            # into a caller's sink, which already holds part of it.
            if sink is None and policy.retry_safe_call(attempt, broken):
                yield policy.delay_for(attempt, None)
                continue
            kind = type(broken).__name__
            raise DownloadError(f"download of {redact_url(url)} broke off: {kind}") from broken

    # -- the one retry loop --------------------------------------------------------------------

    def _api_exchange(self, call: Call, *, submit: bool, retry_rate_limited: bool = True) -> Flow[Reply]:
        policy = self.settings.retry

        def error(outcome: Reply | httpx.TransportError) -> ImagenError:
            return explained(
                api_error(call, outcome, submit=submit),
                base_url=self.settings.base_url,
                https_assumed=self.settings.https_assumed,
            )

        retry: Decider = policy.retry_safe_call
        if submit:
            retry = partial(policy.retry_submit, rate_limited=retry_rate_limited)
        return self._exchange(call, retry=retry, error=error)

    def _exchange(self, call: Call, *, retry: Decider, error: ErrorMapper) -> Flow[Reply]:
        """Send ``call`` until it succeeds or ``retry`` gives up; return the 2xx reply or raise ``error``."""
        attempt = 0
        while True:
            attempt += 1
            outcome = yield call
            if outcome is None:
                raise RuntimeError("a driver sent nothing back for a call")
            if _is_reply(outcome) and outcome.is_success:
                return outcome
            if retry(attempt, outcome):
                yield self.settings.retry.delay_for(attempt, _retry_after(outcome))
                continue
            raise error(outcome)


def _parse(call: Call, response: Reply, read: Callable[[Any], T]) -> T:
    try:
        return read(response.json())
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(
            f"unreadable answer: {exc}",
            status_code=response.status_code,
            method=call.method,
            path=api_path(call.url),
        ) from None


def _is_reply(outcome: Outcome) -> TypeGuard[Reply]:
    """Return whether a flow was sent an answer (not a transport failure, not a wake-up from sleep)."""
    return outcome is not None and not isinstance(outcome, httpx.TransportError)


def _retry_after(outcome: Outcome) -> float | None:
    if _is_reply(outcome) and outcome.status_code == 429:
        return parse_retry_after(outcome.headers.get("retry-after"))
    return None
