"""The retry policy's decisions, without a server: which outcomes are retried, and how long we wait."""

from __future__ import annotations

import httpx
import pytest

from airflow_provider_imagen.api.retry import RetryPolicy, parse_retry_after

REQ = httpx.Request("POST", "https://api.example/api/v1/images/generations")


def response(status: int) -> httpx.Response:
    return httpx.Response(status, request=REQ)


class TestSafeCalls:
    @pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
    def test_transient_statuses_are_retried(self, status: int) -> None:
        assert RetryPolicy().retry_safe_call(1, response(status))

    @pytest.mark.parametrize("status", [400, 401, 402, 404, 422])
    def test_definite_answers_are_not_retried(self, status: int) -> None:
        assert not RetryPolicy().retry_safe_call(1, response(status))

    @pytest.mark.parametrize(
        "exc", [httpx.ReadTimeout("t"), httpx.ConnectError("c"), httpx.RemoteProtocolError("r")]
    )
    def test_transport_errors_are_retried(self, exc: httpx.TransportError) -> None:
        assert RetryPolicy().retry_safe_call(1, exc)

    def test_attempts_are_bounded(self) -> None:
        policy = RetryPolicy(max_attempts=3)
        assert policy.retry_safe_call(2, response(503))
        assert not policy.retry_safe_call(3, response(503))


class TestSubmits:
    def test_429_is_retried_because_nothing_was_created(self) -> None:
        assert RetryPolicy().retry_submit(1, response(429))

    def test_429_is_handed_back_to_a_caller_that_paces_itself(self) -> None:
        policy = RetryPolicy()
        assert not policy.retry_submit(1, response(429), rate_limited=False)
        assert policy.retry_submit(1, httpx.ConnectError("refused"), rate_limited=False)

    @pytest.mark.parametrize(
        "exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("t"), httpx.PoolTimeout("p")]
    )
    def test_errors_before_sending_are_retried(self, exc: httpx.TransportError) -> None:
        assert RetryPolicy().retry_submit(1, exc)

    @pytest.mark.parametrize(
        "outcome",
        [
            response(500),
            response(502),
            response(503),
            httpx.ReadTimeout("t"),
            httpx.WriteTimeout("t"),
            httpx.RemoteProtocolError("dropped"),
            httpx.ReadError("reset"),
        ],
    )
    def test_ambiguous_outcomes_are_never_retried(self, outcome: object) -> None:
        assert not RetryPolicy().retry_submit(1, outcome)  # type: ignore[arg-type]


class TestDelays:
    def test_backoff_doubles_and_is_capped(self) -> None:
        policy = RetryPolicy(base_delay=0.5, max_delay=3.0, rand=lambda: 0.999999)
        assert [round(policy.backoff(a), 2) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]

    def test_jitter_spreads_the_delay_down_to_zero(self) -> None:
        assert RetryPolicy(rand=lambda: 0.0).backoff(4) == 0.0

    def test_retry_after_wins_over_backoff_and_is_capped(self) -> None:
        policy = RetryPolicy(max_retry_after=10.0, rand=lambda: 0.5)
        assert policy.delay_for(1, 3.0) == 3.0
        assert policy.delay_for(1, 3600.0) == 10.0
        assert policy.delay_for(1, None) == policy.backoff(1)

    @pytest.mark.parametrize(
        ("header", "seconds"), [("1", 1.0), (" 2.5 ", 2.5), (None, None), ("soon", None), ("-1", None)]
    )
    def test_parse_retry_after(self, header: str | None, seconds: float | None) -> None:
        assert parse_retry_after(header) == seconds

    def test_at_least_one_attempt(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            RetryPolicy(max_attempts=0)
