"""The emulator over real HTTP on loopback: the reAPI surface, every fault, the ledger, the control routes."""

from __future__ import annotations

import asyncio
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from airflow_provider_imagen.emulator import DEFAULT_API_KEY, EmulatorServer

if TYPE_CHECKING:  # the fixture class lives in conftest; never import conftest at runtime
    from conftest import Api

ERROR_ENVELOPE = re.compile(r"req_[0-9a-f]+")


def assert_error(response: httpx.Response, status: int, code: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert ERROR_ENVELOPE.fullmatch(error["request_id"])
    return error


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


# ---------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, 10001),
        ({"Authorization": DEFAULT_API_KEY}, 10002),
        ({"Authorization": f"Basic {DEFAULT_API_KEY}"}, 10002),
        ({"Authorization": "Bearer"}, 10002),
        ({"Authorization": "Bearer rk_unknown_key"}, 10003),
        ({"Authorization": "Bearer rk_revoked_key"}, 10004),
    ],
)
def test_auth_codes_on_every_endpoint(emu: EmulatorServer, headers: dict[str, str], code: int) -> None:
    emu.configure(api_keys=(DEFAULT_API_KEY, "rk_revoked_key"), revoked_keys=("rk_revoked_key",))
    body = {"model": "imagen-4-0", "prompt": "x"}
    with httpx.Client(base_url=emu.api_url, headers=headers) as client:
        assert_error(client.post("/images/generations", json=body), 401, code)
        assert_error(client.get("/tasks/task_" + "0" * 32), 401, code)
        assert_error(client.get("/balance"), 401, code)
    ledger = emu.ledger()
    assert ledger["posts"] == 1 and ledger["polls"] == 1 and ledger["balance_reads"] == 1
    assert ledger["tasks_created"] == 0


# ---------------------------------------------------------------------------------------------- submit


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", 20001),
        (b'["a list"]', 20001),
        (b'{"prompt": "a cat"}', 20002),
        (b'{"model": "imagen-4-0"}', 20002),
        (b'{"model": "imagen-3", "prompt": "a cat"}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "a cat", "size": "21:9"}', 20001),
        (b'{"model": "imagen-4-0", "prompt": ""}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "   "}', 20001),
        (b'{"model": "imagen-4-0", "prompt": "a cat", "n": 2}', 20001),
        (('{"model": "imagen-4-0", "prompt": "' + "a" * 4001 + '"}').encode(), 20001),
    ],
)
def test_validation_errors_create_nothing(api: Api, body: bytes, code: int) -> None:
    response = api.http.post(
        "/images/generations", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, code)
    ledger = api.server.ledger()
    assert (ledger["posts"], ledger["tasks_created"], ledger["credits_charged"]) == (1, 0, 0)
    assert api.balance() == 1_000_000


@pytest.mark.parametrize(
    ("body", "content_type", "fragment"),
    [
        (
            b'{"model": "imagen-4-0", "prompt": "a cat"}',
            "text/plain",
            "Content-Type must be application/json",
        ),
        (b'{"model": "imagen-4-0", "prompt": "a cat"}', "text/plain; charset=utf-8", "Content-Type must be"),
        (b"model=imagen-4-0&prompt=a+cat", "application/x-www-form-urlencoded", "Content-Type must be"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json", "nested too deeply"),
    ],
    ids=["text/plain", "text/plain charset", "form", "deep array", "deep object"],
)
def test_a_body_the_api_would_refuse_is_a_400_envelope_never_charged(
    api: Api, body: bytes, content_type: str, fragment: str
) -> None:
    """A JSON text sent as ``text/plain`` is not a JSON request, and nesting that exhausts the parser is a
    bad body: both are the client's mistake (400 and the error envelope), never a task, never a 500."""
    response = api.http.post("/images/generations", content=body, headers={"Content-Type": content_type})
    error = assert_error(response, 400, 20001)
    assert fragment in str(error["message"])
    ledger = api.server.ledger()
    assert (ledger["posts"], ledger["tasks_created"], ledger["credits_charged"]) == (1, 0, 0)


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"]
)
def test_json_bodies_with_any_json_media_type_or_none_are_accepted(
    api: Api, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    request = api.http.build_request(
        "POST", "/images/generations", content=b'{"model": "imagen-4-0", "prompt": "a cat"}', headers=headers
    )
    assert request.headers.get("Content-Type") == content_type  # httpx adds none for raw content
    response = api.http.send(request)
    assert response.status_code == 200, response.text
    assert api.server.ledger()["tasks_created"] == 1


def test_a_deeply_nested_control_body_is_a_400(api: Api) -> None:
    control = api.server.base_url + "/_emulator/config"
    assert_error(httpx.post(control, content=b"[" * 100_000), 400, 20001)


def test_submit_answer_and_defaults(api: Api) -> None:
    before = time.time()
    response = api.submit("a lighthouse", n=1)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "model", "status", "created_at"}
    assert re.fullmatch(r"task_[0-9a-f]{32}", body["id"])
    assert body["model"] == "imagen-4-0" and body["status"] == "processing"
    assert isinstance(body["created_at"], int) and int(before) <= body["created_at"] <= time.time()
    (task,) = api.server.tasks()
    assert task["size"] == "16:9" and task["prompt"] == "a lighthouse"
    assert api.balance() == 1_000_000 - 46


def test_4000_chinese_characters_are_accepted(api: Api) -> None:
    api.submit_ok("山" * 4000)


def test_insufficient_credits_402(api: Api) -> None:
    api.server.set_balance(50)
    api.submit_ok()
    assert_error(api.submit(), 402, 30001)
    assert api.balance() == 4
    ledger = api.server.ledger()
    assert ledger["tasks_created"] == 1 and ledger["posts"] == 2 and ledger["credits_charged"] == 46


# ---------------------------------------------------------------------------------------------- poll


def test_poll_processing_then_completed(api: Api) -> None:
    task_id = api.submit_ok("a boat", size="1:1")
    first = api.poll(task_id).json()
    assert first["status"] == "processing" and first["output"] is None and first["error"] is None
    done = api.wait(task_id)
    assert set(done) == {"id", "model", "status", "created_at", "output", "error"}
    assert done["status"] == "completed" and done["error"] is None
    (url,) = done["output"]["image_urls"]
    assert url.startswith(f"{api.server.base_url}/_emulator/media/{task_id}.png?expires=")
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert expires >= time.time() + 86400 - 5
    (task,) = api.server.tasks()
    assert task["first_terminal_poll_at"] is not None
    assert task["first_terminal_poll_at"] >= task["ready_at"]
    assert task["polls"] >= 2


def test_unknown_task_and_other_keys_task_404(api: Api) -> None:
    api.server.configure(api_keys=(DEFAULT_API_KEY, "rk_second_key"))
    assert_error(api.poll("task_" + "f" * 32), 404, 40401)
    with httpx.Client(
        base_url=api.server.api_url, headers={"Authorization": "Bearer rk_second_key"}
    ) as other:
        response = other.post("/images/generations", json={"model": "imagen-4-0", "prompt": "mine"})
        task_id = response.json()["id"]
        assert other.get(f"/tasks/{task_id}").status_code == 200
        assert other.get("/balance").json() == {"balance": 1_000_000 - 46}
    assert_error(api.poll(task_id), 404, 40401)
    assert api.balance() == 1_000_000


# ---------------------------------------------------------------------------------------------- faults


def test_rate_limit_429_with_retry_after_charges_nothing(api: Api) -> None:
    api.server.configure(rate_limit_rps=0.5, rate_limit_burst=2)
    assert api.balance() == 1_000_000
    api.submit_ok()
    limited = api.submit()
    error = assert_error(limited, 429, 50001)
    assert "rate limit" in str(error["message"]).lower()
    retry_after = limited.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert_error(api.http.get("/balance"), 429, 50001)
    ledger = api.server.ledger()
    assert ledger["rate_limited"] == 2 and ledger["tasks_created"] == 1 and ledger["posts"] == 2
    api.server.configure(rate_limit_rps=None)
    assert api.balance() == 1_000_000 - 46


def test_injected_500_creates_nothing(api: Api) -> None:
    api.server.configure(error_rate_5xx=1.0)
    for _ in range(3):
        assert_error(api.submit(), 500, 60099)
    assert_error(api.http.get("/balance"), 500, 60099)
    api.server.configure(error_rate_5xx=0.0)
    ledger = api.server.ledger()
    assert ledger["posts"] == 3 and ledger["tasks_created"] == 0 and ledger["server_errors"] == 4
    assert api.balance() == 1_000_000


@pytest.mark.parametrize("how", ["marker", "rate"])
def test_ambiguous_submit_creates_and_charges_then_502(api: Api, how: str) -> None:
    prompt = "a castle [[ambiguous]]" if how == "marker" else "a castle"
    if how == "rate":
        api.server.configure(ambiguous_submit_rate=1.0)
    assert_error(api.submit(prompt), 502, 60502)
    ledger = api.server.ledger()
    assert ledger["ambiguous_submits"] == 1 and ledger["tasks_created"] == 1
    assert ledger["credits_charged"] == 46 and ledger["server_errors"] == 1
    assert ledger["submissions_by_prompt"] == {prompt: 1}
    assert api.balance() == 1_000_000 - 46
    (task,) = api.server.tasks()
    assert task["ambiguous"] and task["prompt"] == prompt


@pytest.mark.parametrize(
    ("prompt", "fields", "code", "message"),
    [
        ("a fight [[moderate]]", {}, 80006, "Request violates content policy"),
        ("a cat", {"moderation_rate": 1.0}, 80006, "Request violates content policy"),
        ("a cat", {"moderated_words": ["cat"]}, 80006, "Request violates content policy"),
        ("a dog [[fail]]", {}, 60001, "Generation failed"),
        ("a dog", {"failure_rate": 1.0}, 60001, "Generation failed"),
    ],
)
def test_failed_tasks_are_refunded(
    api: Api, prompt: str, fields: dict[str, object], code: int, message: str
) -> None:
    api.server.configure(**fields)
    task_id = api.submit_ok(prompt)
    assert api.balance() == 1_000_000 - 46
    done = api.wait(task_id)
    assert done["status"] == "failed" and done["output"] is None
    assert done["error"] == {"code": code, "message": message}
    assert api.balance() == 1_000_000
    ledger = api.server.ledger()
    assert ledger["credits_charged"] == 46 and ledger["credits_refunded"] == 46 and ledger["net_credits"] == 0
    kind = "moderated" if code == 80006 else "failed"
    assert ledger["status_counts"][kind] == 1


def test_refund_happens_without_any_poll(api: Api) -> None:
    api.submit_ok("x [[fail]]")
    ready_at = api.server.tasks()[0]["ready_at"]
    time.sleep(max(0.0, ready_at - time.time()) + 0.02)
    ledger = httpx.get(f"{api.server.base_url}/_emulator/ledger").json()
    assert ledger["polls"] == 0
    assert ledger["credits_refunded"] == 46 and ledger["balance"] == 1_000_000


def test_slow_marker_takes_ten_times_longer(api: Api) -> None:
    api.server.configure(latency_mean=0.1, latency_jitter=0.0)
    start = time.time()
    api.submit_ok("normal")
    api.submit_ok("sluggish [[slow]]")
    normal, slow = (task["ready_at"] - start for task in api.server.tasks())
    assert normal == pytest.approx(0.1, abs=0.05)
    assert slow == pytest.approx(1.0, abs=0.1)


async def test_response_delay_is_concurrent(emu: EmulatorServer) -> None:
    emu.configure(response_delay=0.4)
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    async with httpx.AsyncClient(base_url=emu.api_url, headers=headers, timeout=10) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.get("/balance") for _ in range(20)))
        elapsed = time.perf_counter() - start
    assert all(r.status_code == 200 for r in responses)
    assert 0.4 <= elapsed < 1.5


def test_sustains_hundreds_of_polls_per_second(api: Api) -> None:
    # Sync clients in threads: httpx's async pool, sharing this process's GIL with the server, is the
    # bottleneck otherwise. The emulator itself answers ~1000 polls/s here.
    task_id = api.submit_ok()
    headers = {"Authorization": f"Bearer {api.server.api_key}"}

    def poll_many(count: int) -> list[int]:
        with httpx.Client(base_url=api.server.api_url, headers=headers) as client:
            return [client.get(f"/tasks/{task_id}").status_code for _ in range(count)]

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        statuses = [status for batch in pool.map(poll_many, [150] * 4) for status in batch]
    elapsed = time.perf_counter() - start
    assert statuses == [200] * 600
    assert 600 / elapsed > 250, f"{600 / elapsed:.0f} polls/s"  # ~1000/s locally; margin for busy CI
    assert api.server.tasks()[0]["polls"] == 600


# ---------------------------------------------------------------------------------------------- media


def test_full_size_png(api: Api) -> None:
    api.server.configure(image_scale=1.0)
    url = api.wait(api.submit_ok("a full size owl", size="1:1"))["output"]["image_urls"][0]
    response = httpx.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert png_size(response.content) == (1024, 1024)


@pytest.mark.parametrize(
    ("size", "pixels"),
    [
        ("1:1", (256, 256)),
        ("3:4", (224, 320)),
        ("4:3", (320, 224)),
        ("9:16", (192, 352)),
        ("16:9", (352, 192)),
    ],
)
def test_scaled_png_sizes(api: Api, size: str, pixels: tuple[int, int]) -> None:
    api.server.configure(image_scale=0.25)
    url = api.wait(api.submit_ok(f"ratio {size}", size=size))["output"]["image_urls"][0]
    assert png_size(httpx.get(url).content) == pixels


def test_media_url_expiry_and_bad_urls(api: Api) -> None:
    api.server.configure(image_ttl=0.5)
    task_id = api.submit_ok("short lived")
    url = api.wait(task_id)["output"]["image_urls"][0]
    assert httpx.get(url).status_code == 200
    query = parse_qs(urlsplit(url).query)
    tampered = url.replace(query["sig"][0], "0" * 32)
    assert httpx.get(tampered).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403
    assert httpx.get(url.replace(task_id, "task_" + "a" * 32)).status_code == 404
    time.sleep(max(0.0, int(query["expires"][0]) - time.time()) + 0.05)
    expired = httpx.get(url)
    assert expired.status_code == 403 and "expired" in expired.text.lower()
    ledger = api.server.ledger()
    assert ledger["downloads"] == 1 and ledger["downloads_rejected"] == 4
    assert api.server.tasks()[0]["downloads"] == 1


def test_html_marker_serves_html(api: Api) -> None:
    url = api.wait(api.submit_ok("a trap [[html]]"))["output"]["image_urls"][0]
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.lstrip().lower().startswith("<!doctype html")


def test_chinese_prompt_round_trips(api: Api) -> None:
    prompt = "一只在雪地里的红狐狸，水墨画风格"
    task_id = api.submit_ok(prompt, size="3:4")
    url = api.wait(task_id)["output"]["image_urls"][0]
    assert png_size(httpx.get(url).content) == (896, 1280)
    assert api.server.tasks()[0]["prompt"] == prompt
    assert api.server.ledger()["submissions_by_prompt"] == {prompt: 1}


# ------------------------------------------------------------------------------------- ledger and control


def test_ledger_counts(api: Api) -> None:
    first = api.submit_ok("same prompt")
    api.submit_ok("same prompt")
    api.submit_ok("other prompt")
    api.submit("")  # rejected, still a post
    api.balance()
    url = api.wait(first)["output"]["image_urls"][0]
    httpx.get(url)
    httpx.get(url)
    ledger = httpx.get(f"{api.server.base_url}/_emulator/ledger").json()
    polls = api.server.tasks()[0]["polls"]
    expected = {
        "posts": 4,
        "tasks_created": 3,
        "credits_charged": 138,
        "credits_refunded": 0,
        "net_credits": 138,
        "balance": 1_000_000 - 138,
        "polls": polls,
        "balance_reads": 1,
        "downloads": 2,
        "rate_limited": 0,
        "server_errors": 0,
        "ambiguous_submits": 0,
        "submissions_by_prompt": {"same prompt": 2, "other prompt": 1},
    }
    assert {name: ledger[name] for name in expected} == expected
    assert sum(ledger["status_counts"].values()) == 3
    assert set(ledger["status_counts"]) == {"processing", "completed", "failed", "moderated"}

    tasks = httpx.get(f"{api.server.base_url}/_emulator/tasks").json()
    assert [t["prompt"] for t in tasks] == ["same prompt", "same prompt", "other prompt"]
    fields = {"id", "prompt", "size", "status", "created_at", "ready_at", "first_terminal_poll_at", "polls"}
    assert fields | {"downloads"} <= set(tasks[0])
    assert tasks[0]["downloads"] == 2 and tasks[1]["first_terminal_poll_at"] is None


def test_config_changes_at_runtime_over_http(api: Api) -> None:
    control = f"{api.server.base_url}/_emulator/config"
    response = httpx.post(control, json={"latency_mean": 0.05, "latency_jitter": 0, "starting_balance": 92})
    assert response.status_code == 200
    assert response.json()["latency_mean"] == 0.05
    assert httpx.get(control).json()["starting_balance"] == 92
    assert api.server.config.latency_jitter == 0.0
    assert_error(httpx.post(control, json={"no_such_knob": 1}), 400, 20001)
    assert_error(httpx.post(control, json={"failure_rate": 2}), 400, 20001)
    assert_error(httpx.post(control, content=b"[1]"), 400, 20001)

    httpx.post(f"{api.server.base_url}/_emulator/reset")  # balances restart from the new starting_balance
    api.submit_ok()
    api.submit_ok()
    assert_error(api.submit(), 402, 30001)

    httpx.post(control, json={"api_keys": ["rk_fresh_key"]})
    assert_error(api.http.get("/balance"), 401, 10003)


def test_reset_over_http(api: Api) -> None:
    api.server.configure(latency_mean=0.5)
    api.wait(api.submit_ok("[[fail]]"), timeout=10)
    api.submit_ok()
    assert httpx.post(f"{api.server.base_url}/_emulator/reset").json() == {"ok": True}
    ledger = api.server.ledger()
    assert ledger["tasks_created"] == ledger["posts"] == ledger["polls"] == ledger["credits_refunded"] == 0
    assert ledger["submissions_by_prompt"] == {} and api.server.tasks() == []
    assert api.balance() == 1_000_000
    assert api.server.config.latency_mean == 0.5


def test_set_balance_over_http(api: Api) -> None:
    response = httpx.post(f"{api.server.base_url}/_emulator/balance", json={"balance": 10})
    assert response.json() == {"key": DEFAULT_API_KEY, "balance": 10}
    assert_error(api.submit(), 402, 30001)
    bad = httpx.post(f"{api.server.base_url}/_emulator/balance", json={"balance": -1})
    assert_error(bad, 400, 20001)


def test_unknown_api_route_uses_error_envelope(api: Api) -> None:
    assert_error(api.http.get("/models"), 404, 40400)


def test_two_servers_are_independent() -> None:
    with EmulatorServer(port=0) as one, EmulatorServer(port=0) as two:
        assert one.base_url != two.base_url
        headers = {"Authorization": f"Bearer {one.api_key}"}
        httpx.post(
            f"{one.api_url}/images/generations", json={"model": "imagen-4-0", "prompt": "x"}, headers=headers
        )
        assert one.ledger()["tasks_created"] == 1 and two.ledger()["tasks_created"] == 0
        assert one.running
    assert not one.running


# ---------------------------------------------------------------------------------------------- late answers


async def _submit_and_watch(emu: EmulatorServer, prompt: str, watch_after: float) -> tuple[float, dict, dict]:
    """Submit, read the ledger while the answer is still held back; return (seconds, answer, ledger)."""
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    body = {"model": "imagen-4-0", "prompt": prompt}
    async with httpx.AsyncClient(base_url=emu.api_url, headers=headers, timeout=10) as client:
        start = time.perf_counter()
        pending = asyncio.ensure_future(client.post("/images/generations", json=body))
        await asyncio.sleep(watch_after)
        assert not pending.done(), "the answer came before the delay"
        async with httpx.AsyncClient(base_url=emu.base_url) as control:
            during = (await control.get("/_emulator/ledger")).json()
        response = await pending
        elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text
    return elapsed, response.json(), during


async def test_submit_answer_delay_charges_first_then_answers_late(emu: EmulatorServer) -> None:
    emu.configure(submit_answer_delay=0.6)
    elapsed, answer, during = await _submit_and_watch(emu, "a lighthouse at dusk", 0.3)
    # The task exists and is paid for while the client still waits for its id.
    assert during["tasks_created"] == 1 and during["credits_charged"] == 46 and during["late_submits"] == 1
    assert elapsed >= 0.6
    (task,) = emu.tasks()
    assert answer["id"] == task["id"] and task["answer_delay"] == 0.6
    # Polls and balance reads are not held back.
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    start = time.perf_counter()
    assert httpx.get(f"{emu.api_url}/balance", headers=headers).json() == {"balance": 1_000_000 - 46}
    assert time.perf_counter() - start < 0.4


async def test_late_marker_delays_only_its_own_submit(emu: EmulatorServer) -> None:
    emu.configure(late_submit_delay=0.5)
    elapsed, _, during = await _submit_and_watch(emu, "a harbour [[late]]", 0.25)
    assert elapsed >= 0.5 and during["tasks_created"] == 1 and during["late_submits"] == 1
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    start = time.perf_counter()
    reply = httpx.post(
        f"{emu.api_url}/images/generations",
        json={"model": "imagen-4-0", "prompt": "a harbour"},
        headers=headers,
    )
    assert reply.status_code == 200 and time.perf_counter() - start < 0.4
    assert emu.ledger()["late_submits"] == 1
    assert [t["answer_delay"] for t in emu.tasks()] == [0.5, 0.0]


def test_a_client_that_gives_up_on_a_late_answer_has_still_paid(api: Api) -> None:
    api.server.configure(submit_answer_delay=1.0)
    with pytest.raises(httpx.ReadTimeout):
        api.http.post(
            "/images/generations",
            json={"model": "imagen-4-0", "prompt": "an unanswered request"},
            timeout=0.3,
        )
    ledger = api.server.ledger()
    assert ledger["posts"] == 1 and ledger["tasks_created"] == 1 and ledger["net_credits"] == 46
    assert ledger["submissions_by_prompt"] == {"an unanswered request": 1}
    # The task renders and completes like any other: paid, and nobody holds its id.
    (task,) = api.server.tasks()
    assert api.wait(task["id"])["status"] == "completed"


def test_late_and_ambiguous_answers_502_after_the_delay(api: Api) -> None:
    api.server.configure(late_submit_delay=0.4)
    start = time.perf_counter()
    assert_error(api.submit("a quarry [[late]] [[ambiguous]]"), 502, 60502)
    assert time.perf_counter() - start >= 0.4
    ledger = api.server.ledger()
    assert ledger["tasks_created"] == 1 and ledger["ambiguous_submits"] == 1 and ledger["late_submits"] == 1


def test_answer_delays_reject_negative_values(api: Api) -> None:
    for knob in ("submit_answer_delay", "late_submit_delay"):
        reply = httpx.post(f"{api.server.base_url}/_emulator/config", json={knob: -1})
        assert_error(reply, 400, 20001)


# ---------------------------------------------------------------------------------------------- wrong sizes


@pytest.mark.parametrize(
    ("size", "pixels"),
    [
        ("16:9", (192, 352)),
        ("9:16", (352, 192)),
        ("4:3", (224, 320)),
        ("3:4", (320, 224)),
        ("1:1", (352, 192)),
    ],
)
def test_wrong_size_marker_serves_another_aspect_ratio(api: Api, size: str, pixels: tuple[int, int]) -> None:
    api.server.configure(image_scale=0.25)
    task_id = api.submit_ok(f"a misframed shot [[wrong_size]] {size}", size=size)
    done = api.wait(task_id)
    # The API itself reports nothing wrong: only the pixels tell.
    assert done["status"] == "completed" and done["error"] is None
    assert png_size(httpx.get(done["output"]["image_urls"][0]).content) == pixels
    (task,) = api.server.tasks()
    assert task["wrong_size"] and task["size"] == size
    assert api.server.ledger()["net_credits"] == 46


def test_moderated_and_failed_tasks_carry_the_api_message_in_their_poll(api: Api) -> None:
    moderated = api.wait(api.submit_ok("a riot [[moderate]]"))
    failed = api.wait(api.submit_ok("a blur [[fail]]"))
    assert moderated["error"] == {"code": 80006, "message": "Request violates content policy"}
    assert failed["error"] == {"code": 60001, "message": "Generation failed"}


# ------------------------------------------------------------------------------------- account-wide limits


def test_an_account_cap_refuses_submits_beyond_it_with_429_and_charges_nothing(api: Api) -> None:
    """Three tasks may render at once for a key: the fourth submit answers 429 (code 50001) with a
    ``Retry-After`` until the key's next task ends, creates nothing and takes no credit; once one ends,
    a submit goes through again."""
    api.server.configure(max_concurrent_renders=3, latency_mean=1.5, latency_jitter=0.0)
    ids = [api.submit_ok(f"capped {i}") for i in range(3)]
    refused = api.submit("capped 3")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == 50001
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    ledger = api.server.ledger()
    assert ledger["tasks_created"] == 3 and ledger["concurrency_limited"] == 1
    assert ledger["credits_charged"] == 3 * 46
    api.wait(ids[0])
    assert api.submit("capped 3 again").status_code == 200


def test_stock_images_are_drawn_once_per_ratio_at_imagen_sizes(api: Api) -> None:
    api.server.configure(image_mode="stock")
    urls = [api.wait(api.submit_ok(f"stock {i}", size="9:16"))["output"]["image_urls"][0] for i in range(2)]
    first, second = (httpx.get(u).content for u in urls)
    assert first == second and png_size(first) == (768, 1408)
