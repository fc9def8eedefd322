"""Unit tests of the emulator's pure logic (config, validation, state) with a fake clock; no HTTP."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_provider_imagen.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from airflow_provider_imagen.emulator.errors import ApiError, MediaError
from airflow_provider_imagen.emulator.state import EmulatorState
from airflow_provider_imagen.emulator.validation import Submission, authenticate, parse_submission

BASE = "http://emu.test"
START = 1_000.0


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_state(clock: FakeClock, **fields: object) -> EmulatorState:
    settings: dict[str, object] = {"latency_mean": 2.0, "latency_jitter": 0.0, "starting_balance": 1000}
    settings.update(fields)
    return EmulatorState(EmulatorConfig(**settings), clock=clock)  # type: ignore[arg-type]


def submit(
    state: EmulatorState, prompt: str = "a cat", size: str = "16:9", key: str = DEFAULT_API_KEY
) -> str:
    return state.submit(key, Submission(prompt=prompt, size=size)).task.id


def media_parts(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    task_id = parts.path.rsplit("/", 1)[1].removesuffix(".png")
    return task_id, query["expires"][0], query["sig"][0]


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_and_fast() -> None:
    config = EmulatorConfig()
    assert config.api_keys == (DEFAULT_API_KEY,)
    assert config.latency_mean == 3.0 and config.latency_jitter == 1.0
    assert config.image_scale == 1.0 and config.image_ttl == 86400
    assert config.starting_balance == 1_000_000
    fast = EmulatorConfig.fast(seed=7)
    assert (fast.latency_mean, fast.latency_jitter, fast.image_scale, fast.seed) == (0.2, 0.1, 1.0, 7)


def test_config_coerces_json_values_and_round_trips() -> None:
    config = EmulatorConfig().updated({"api_keys": ["a", "b"], "latency_mean": 1, "rate_limit_rps": 5})
    assert config.api_keys == ("a", "b")
    assert isinstance(config.latency_mean, float)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert EmulatorConfig(**data) == config


@pytest.mark.parametrize(
    "fields",
    [
        {"nope": 1},
        {"moderation_rate": 1.5},
        {"failure_rate": -0.1},
        {"latency_mean": -1},
        {"image_scale": 0},
        {"api_keys": []},
        {"api_keys": ["has space"]},
        {"starting_balance": -5},
        {"starting_balance": 1.5},
        {"rate_limit_rps": 0},
        {"seed": "x"},
        {"latency_mean": "fast"},
    ],
)
def test_config_rejects_bad_values(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EmulatorConfig().updated(fields)


# ---------------------------------------------------------------------------------------------- validation


def test_authenticate_codes() -> None:
    config = EmulatorConfig(api_keys=(DEFAULT_API_KEY, "rk_old_key"), revoked_keys=("rk_old_key",))
    assert authenticate(f"Bearer {DEFAULT_API_KEY}", config) == DEFAULT_API_KEY
    assert authenticate(f"bearer  {DEFAULT_API_KEY} ", config) == DEFAULT_API_KEY
    cases = {
        None: 10001,
        "": 10002,
        DEFAULT_API_KEY: 10002,
        f"Token {DEFAULT_API_KEY}": 10002,
        "Bearer": 10002,
        "Bearer a b": 10002,
        "Bearer rk_unknown": 10003,
        "Bearer rk_old_key": 10004,
    }
    for header, code in cases.items():
        with pytest.raises(ApiError) as info:
            authenticate(header, config)
        assert (info.value.status, info.value.code) == (401, code), header


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", 20001),
        (b"\xff\xfe", 20001),
        (b"[1, 2]", 20001),
        (b"", 20002),
        (b'{"prompt": "x"}', 20002),
        (b'{"model": "imagen-4-0"}', 20002),
        (b'{"model": "imagen-4-0", "prompt": null}', 20002),
        (b'{"model": "flux-2", "prompt": "x"}', 20001),
        (b'{"model": "imagen-4-0", "prompt": 5}', 20001),
        (b'{"model": "imagen-4-0", "prompt": ""}', 20001),
        (b'{"model": "imagen-4-0", "prompt": " \\n\\t "}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "x", "size": "2:1"}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "x", "size": "1024x1024"}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "x", "n": 2}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "x", "n": true}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "x", "n": "1"}', 20001),
    ],
)
def test_parse_submission_rejects(raw: bytes, code: int) -> None:
    with pytest.raises(ApiError) as info:
        parse_submission(raw)
    assert (info.value.status, info.value.code) == (400, code)


def test_parse_submission_limits_count_characters_not_bytes() -> None:
    chinese = "猫" * 4000  # 12000 bytes in UTF-8, 4000 characters
    body = json.dumps({"model": "imagen-4-0", "prompt": chinese}, ensure_ascii=False).encode()
    assert parse_submission(body) == Submission(prompt=chinese, size="16:9")
    too_long = json.dumps({"model": "imagen-4-0", "prompt": "a" * 4001}).encode()
    with pytest.raises(ApiError):
        parse_submission(too_long)
    ok = parse_submission(b'{"model": "imagen-4-0", "prompt": "x", "size": "9:16", "n": 1, "extra": 1}')
    assert ok.size == "9:16"


# ---------------------------------------------------------------------------------------------- tasks


def test_task_lifecycle_follows_the_clock(clock: FakeClock) -> None:
    state = make_state(clock)
    task_id = submit(state)
    assert re.fullmatch(r"task_[0-9a-f]{32}", task_id)
    view = state.poll(DEFAULT_API_KEY, task_id, BASE)
    assert view == {
        "id": task_id,
        "model": "imagen-4-0",
        "status": "processing",
        "created_at": int(clock.now),
        "output": None,
        "error": None,
    }
    clock.advance(1.99)
    assert state.poll(DEFAULT_API_KEY, task_id, BASE)["status"] == "processing"
    clock.advance(0.01)
    done = state.poll(DEFAULT_API_KEY, task_id, BASE)
    assert done["status"] == "completed" and done["error"] is None
    (url,) = done["output"]["image_urls"]
    assert url.startswith(f"{BASE}/_emulator/media/{task_id}.png?expires=")
    assert state.poll(DEFAULT_API_KEY, task_id, BASE)["output"] == done["output"]  # a stable URL

    (row,) = state.tasks()
    assert row["first_terminal_poll_at"] == clock.now
    assert row["polls"] == 4
    assert row["ready_at"] == pytest.approx(row["created_at"] + 2.0, abs=1.0)


def test_latency_stays_in_range_and_slow_marker_multiplies(clock: FakeClock) -> None:
    state = make_state(clock, latency_mean=1.0, latency_jitter=0.5, seed=3, starting_balance=10_000)
    for _ in range(50):
        submit(state)
    latencies = [t["ready_at"] - clock.now for t in state.tasks()]
    assert all(0.5 <= latency <= 1.5 for latency in latencies)
    assert max(latencies) - min(latencies) > 0.5

    state = make_state(clock, latency_mean=0.0, latency_jitter=0.0)
    submit(state)
    submit(state, "draw it [[slow]]")
    fast, slow = (t["ready_at"] - clock.now for t in state.tasks())
    assert fast == pytest.approx(0.05)
    assert slow == pytest.approx(0.5)


def test_charge_at_submit_and_402_creates_nothing(clock: FakeClock) -> None:
    state = make_state(clock, starting_balance=100)
    submit(state)
    submit(state)
    assert state.balance(DEFAULT_API_KEY) == 8
    with pytest.raises(ApiError) as info:
        submit(state)
    assert (info.value.status, info.value.code) == (402, 30001)
    ledger = state.ledger()
    assert ledger["tasks_created"] == 2 and ledger["credits_charged"] == 92 and ledger["balance"] == 8


def test_failed_tasks_are_refunded_once_at_ready_time_even_unpolled(clock: FakeClock) -> None:
    state = make_state(clock)
    failed = submit(state, "x [[fail]]")
    moderated = submit(state, "x [[moderate]]")
    submit(state, "fine")
    assert state.balance(DEFAULT_API_KEY) == 1000 - 3 * 46
    assert state.ledger()["credits_refunded"] == 0
    clock.advance(2.0)
    ledger = state.ledger()  # nobody polled: the refund happened anyway
    assert ledger["credits_refunded"] == 92 and ledger["refunds"] == 2
    assert ledger["net_credits"] == 46 and ledger["balance"] == 1000 - 46
    assert ledger["status_counts"] == {"processing": 0, "completed": 1, "failed": 1, "moderated": 1}
    assert state.poll(DEFAULT_API_KEY, failed, BASE)["error"] == {
        "code": 60001,
        "message": "Generation failed",
    }
    assert state.poll(DEFAULT_API_KEY, moderated, BASE)["error"] == {
        "code": 80006,
        "message": "Request violates content policy",
    }
    clock.advance(100)
    state.poll(DEFAULT_API_KEY, failed, BASE)
    assert state.balance(DEFAULT_API_KEY) == 1000 - 46
    assert state.ledger()["credits_refunded"] == 92


def test_poll_that_sees_failed_already_sees_the_refund(clock: FakeClock) -> None:
    state = make_state(clock)
    task_id = submit(state, "[[fail]]")
    clock.advance(5)
    assert state.poll(DEFAULT_API_KEY, task_id, BASE)["status"] == "failed"
    assert state.balance(DEFAULT_API_KEY) == 1000
    assert state.tasks()[0]["refunded"] is True


def test_rates_markers_and_moderated_words(clock: FakeClock) -> None:
    state = make_state(clock, moderated_words=("forbidden", "[[moderate]]"))
    submit(state, "A FORBIDDEN thing")
    submit(state, "allowed")
    outcomes = [t["outcome"] for t in state.tasks()]
    assert outcomes == ["moderated", "completed"]

    state = make_state(clock, failure_rate=1.0)
    submit(state)
    state.configure(failure_rate=0.0, moderation_rate=1.0)
    submit(state)
    assert [t["outcome"] for t in state.tasks()] == ["failed", "moderated"]


def test_seed_reproduces_outcomes_and_latencies(clock: FakeClock) -> None:
    def run() -> list[tuple[str, float]]:
        state = make_state(clock, seed=42, moderation_rate=0.3, failure_rate=0.3, latency_jitter=1.0)
        for _ in range(20):
            submit(state)
        return [(t["outcome"], t["ready_at"]) for t in state.tasks()]

    first, second = run(), run()
    assert first == second
    assert {outcome for outcome, _ in first} == {"completed", "failed", "moderated"}


def test_ambiguous_submit_still_creates_and_charges(clock: FakeClock) -> None:
    state = make_state(clock)
    result = state.submit(DEFAULT_API_KEY, Submission(prompt="x [[ambiguous]]", size="1:1"))
    assert result.ambiguous
    assert not state.submit(DEFAULT_API_KEY, Submission(prompt="x", size="1:1")).ambiguous
    ledger = state.ledger()
    assert ledger["tasks_created"] == 2 and ledger["ambiguous_submits"] == 1 and ledger["balance"] == 908


def test_other_keys_tasks_are_not_found(clock: FakeClock) -> None:
    state = make_state(clock, api_keys=(DEFAULT_API_KEY, "rk_other"))
    task_id = submit(state, key="rk_other")
    for unknown in (task_id, "task_" + "0" * 32, "x" * 500):
        with pytest.raises(ApiError) as info:
            state.poll(DEFAULT_API_KEY, unknown, BASE)
        assert (info.value.status, info.value.code) == (404, 40401)
    assert state.poll("rk_other", task_id, BASE)["id"] == task_id
    assert state.ledger()["balances"] == {"rk_other": 954, DEFAULT_API_KEY: 1000}


def test_rate_limit_bucket(clock: FakeClock) -> None:
    state = make_state(clock, rate_limit_rps=2.0, rate_limit_burst=3)
    for _ in range(3):
        state.check_rate_limit("k")
    with pytest.raises(ApiError) as info:
        state.check_rate_limit("k")
    assert (info.value.status, info.value.code) == (429, 50001)
    assert info.value.headers == {"Retry-After": "1"}
    state.check_rate_limit("other")  # buckets are per key
    clock.advance(0.5)
    state.check_rate_limit("k")
    state.configure(rate_limit_rps=0.1, rate_limit_burst=1)
    state.check_rate_limit("k")
    with pytest.raises(ApiError) as info:
        state.check_rate_limit("k")
    assert info.value.headers == {"Retry-After": "10"}
    state.configure(rate_limit_rps=None)
    for _ in range(100):
        state.check_rate_limit("k")


def test_server_error_roll(clock: FakeClock) -> None:
    state = make_state(clock)
    assert not any(state.roll_server_error() for _ in range(100))
    state.configure(error_rate_5xx=1.0)
    assert all(state.roll_server_error() for _ in range(100))


def test_media_signature_and_expiry(clock: FakeClock) -> None:
    state = make_state(clock, image_ttl=60)
    task_id = submit(state, "look [[html]]", size="4:3")
    clock.advance(2)
    url = state.poll(DEFAULT_API_KEY, task_id, BASE)["output"]["image_urls"][0]
    tid, expires, sig = media_parts(url)
    assert tid == task_id
    ticket = state.open_media(tid, expires, sig)
    assert (ticket.prompt, ticket.size, ticket.html) == ("look [[html]]", "4:3", True)

    for bad in [
        (tid, expires, "0" * 32),
        (tid, str(int(expires) + 1000), sig),
        (tid, "soon", sig),
        (tid, expires, None),
    ]:
        with pytest.raises(MediaError) as info:
            state.open_media(*bad)
        assert info.value.status == 403
    with pytest.raises(MediaError) as info:
        state.open_media("task_unknown", expires, sig)
    assert info.value.status == 404

    clock.now = float(expires) - 0.001
    state.open_media(tid, expires, sig)
    clock.now = float(expires)
    with pytest.raises(MediaError) as info:
        state.open_media(tid, expires, sig)
    assert (info.value.status, info.value.message) == (403, "URL expired")
    ledger = state.ledger()
    assert ledger["downloads"] == 2 and ledger["downloads_rejected"] == 6
    assert state.tasks()[0]["downloads"] == 2


def test_counters_reset_and_configure(clock: FakeClock) -> None:
    state = make_state(clock)
    state.record_request("submit")
    state.record_request("poll")
    state.record_request("balance")
    state.record_response(429)
    state.record_response(502)
    state.record_response(200)
    submit(state, "same")
    submit(state, "same")
    ledger = state.ledger()
    assert (ledger["posts"], ledger["polls"], ledger["balance_reads"]) == (1, 1, 1)
    assert (ledger["rate_limited"], ledger["server_errors"]) == (1, 1)
    assert ledger["submissions_by_prompt"] == {"same": 2}

    state.configure(starting_balance=500, latency_mean=1.0)
    state.reset()
    ledger = state.ledger()
    assert ledger["tasks_created"] == 0 and ledger["posts"] == 0 and state.tasks() == []
    assert ledger["balance"] == 500
    assert state.config.latency_mean == 1.0
    with pytest.raises(ValueError):
        state.configure(bogus=1)
