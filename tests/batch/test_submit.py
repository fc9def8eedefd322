"""The submit loop against the emulator over loopback: interrupts, fencing, what each key is left with."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_imagen.api.client import ClientSettings, ImagenClient
from airflow_provider_imagen.api.errors import RateLimitedError
from airflow_provider_imagen.api.models import ImageRequest
from airflow_provider_imagen.batch.fence import FencedError
from airflow_provider_imagen.batch.journal import Journal
from airflow_provider_imagen.batch.submit import submit_chunk


class Interrupt(BaseException):
    """Stands for what Airflow raises in a task: ``AirflowTaskTimeout``, ``AirflowTaskTerminated``."""


def journal(tmp_path: Path) -> Journal:
    return Journal(str(tmp_path / "j"), dag_id="d", task_id="t", run_id="r")


@pytest.fixture
def client(emulator: Any) -> Iterator[ImagenClient]:
    with ImagenClient(ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url)) as c:
        yield c


def requests(n: int) -> dict[str, ImageRequest]:
    return {f"p{i}|1:1|v0": ImageRequest(f"an interrupted lamp {i}", "1:1") for i in range(n)}


@pytest.fixture
def alarm() -> Iterator[None]:
    """Raise :class:`Interrupt` from SIGALRM, in the main thread, as ``execution_timeout`` does."""

    def fire(signum: int, frame: Any) -> None:
        raise Interrupt("execution_timeout")

    previous = signal.signal(signal.SIGALRM, fire)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_an_interrupt_while_the_post_awaits_its_answer_leaves_the_key_ambiguous(
    emulator: Any, client: ImagenClient, tmp_path: Path, alarm: None
) -> None:
    """The emulator creates and charges the task, then answers after 1.5 s; the interrupt comes at 0.5 s.
    The key must be unknown (it was paid), and the keys after it provably not sent."""
    emulator.configure(response_delay=1.5)
    j = journal(tmp_path)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    with pytest.raises(Interrupt):
        submit_chunk(client, j, requests(3))
    ledger = emulator.ledger()
    assert ledger["posts"] == 1 and ledger["tasks_created"] == 1  # paid, and no answer reached us
    entries = j.load()
    first, *rest = sorted(entries)
    assert entries[first].unknown_submit
    assert "Interrupt" in (entries[first].ambiguous_reason or "")
    assert entries[first].charged_submits == 1
    for key in rest:
        assert not entries[key].unknown_submit and entries[key].charged_submits == 0
        assert (entries[key].rejected_reason or "").startswith("NotSentError")


def test_an_interrupt_before_the_post_is_sent_leaves_nothing_unknown(
    emulator: Any, client: ImagenClient, tmp_path: Path, alarm: None
) -> None:
    """An interrupt while the rate limiter sleeps before the first POST: nothing was sent, nothing is
    unknown, and a retry may send every key."""
    j = journal(tmp_path)
    waited = threading.Event()

    def slow_pace() -> None:
        waited.set()
        signal.pause()  # the alarm interrupts this wait

    signal.setitimer(signal.ITIMER_REAL, 0.2)
    with pytest.raises(Interrupt):
        submit_chunk(client, j, requests(2), pace=slow_pace)
    assert waited.is_set() and emulator.ledger()["posts"] == 0
    assert all(not e.unknown_submit and e.charged_submits == 0 for e in j.load().values())


def test_a_fenced_try_sends_nothing_and_hands_its_keys_to_the_newer_try(
    emulator: Any, client: ImagenClient, tmp_path: Path
) -> None:
    """Try A claims, a newer try B claims: A's next chunk writes its intents, finds B's lease before the
    first POST, sends nothing and journals every key "not sent", so B may send them."""
    a, b = journal(tmp_path), journal(tmp_path)
    a.claim("try-a")
    b.claim("try-b")
    with pytest.raises(FencedError, match="another try of this task instance claimed the journal"):
        submit_chunk(client, a, requests(3))
    assert emulator.ledger()["posts"] == 0
    entries = b.load()
    assert len(entries) == 3
    assert all(not e.unknown_submit and e.charged_submits == 0 for e in entries.values())
    report = submit_chunk(client, b, requests(3))  # the owner sends them, once each
    assert len(report.submitted) == 3 and emulator.ledger()["posts"] == 3


def test_a_try_that_loses_the_lease_mid_chunk_stops_before_its_next_post(
    emulator: Any, client: ImagenClient, tmp_path: Path
) -> None:
    """The newer try claims between two POSTs of the older try's chunk (from its rate limiter): the
    older try has sent one POST, which is journalled as submitted, and sends no more."""
    a, b = journal(tmp_path), journal(tmp_path)
    a.claim("try-a")
    calls = 0

    def pace() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            b.claim("try-b")

    with pytest.raises(FencedError):
        submit_chunk(client, a, requests(3), pace=pace)
    assert emulator.ledger()["posts"] == 1
    entries = b.load()
    assert sorted(e.charged_submits for e in entries.values()) == [0, 0, 1]
    assert sum(1 for e in entries.values() if e.task_id) == 1


def test_a_chunk_that_meets_a_429_hands_it_back_and_sends_no_more(
    emulator: Any, client: ImagenClient, tmp_path: Path
) -> None:
    """With ``retry_rate_limited=False`` (a batch window), the first 429 ends the chunk: the account is
    full, and the rest would hear the same. The refused key and those after it are journalled as
    created nothing (to send again), never as unknown: no row fails, nothing is paid twice."""
    emulator.configure(max_concurrent_renders=1, latency_mean=5.0, latency_jitter=0.0)
    j = journal(tmp_path)
    report = submit_chunk(client, j, requests(4), retry_rate_limited=False)
    assert len(report.submitted) == 1 and emulator.ledger()["posts"] == 2
    assert isinstance(report.rejected["p1|1:1|v0"], RateLimitedError)
    entries = j.load()
    assert sorted(e.rejected_kind or "" for e in entries.values()) == [
        "",
        "not_sent",
        "not_sent",
        "rate_limited",
    ]
    assert all(not e.unknown_submit for e in entries.values())
    assert sum(e.charged_submits for e in entries.values()) == 1


def test_a_chunk_whose_turn_comes_after_a_stop_journals_nothing(
    emulator: Any, client: ImagenClient, tmp_path: Path
) -> None:
    """Another chunk of the round met a 429 (or ran dry) first: this one writes no intent and sends
    nothing, so its keys stay as they were, ready for the next round."""
    j = journal(tmp_path)
    report = submit_chunk(client, j, requests(3), should_stop=lambda: True)
    assert not report.records and emulator.ledger()["posts"] == 0 and not j.load()


def test_an_outbox_writes_each_chunks_answers_with_the_next_intents(
    emulator: Any, client: ImagenClient, tmp_path: Path
) -> None:
    """Three chunks of one through one outbox: three segments (each chunk's intent, the answers before
    it), not six; the last answers stay in the outbox until the caller writes them, and then every key
    has its task id."""
    j = journal(tmp_path)
    outbox: list[dict[str, Any]] = []
    chunks = [dict([item]) for item in requests(3).items()]
    for chunk in chunks:
        submit_chunk(client, j, chunk, outbox=outbox)
        assert [r["e"] for r in outbox] == ["submitted"] and outbox[0]["k"] in chunk
    assert j.appended == 3
    j.append(outbox)
    entries = j.load()
    created = {t["id"] for t in emulator.tasks()}
    assert sorted(entries) == sorted(k for c in chunks for k in c)
    for entry in entries.values():
        assert entry.task_id in created and not entry.unknown_submit and entry.charged_submits == 1
    assert emulator.ledger()["posts"] == 3


def test_an_interrupt_in_the_next_chunk_still_journals_the_answers_in_the_outbox(
    emulator: Any, client: ImagenClient, tmp_path: Path, alarm: None
) -> None:
    """The answers of a chunk ride with the next chunk's intents; an interrupt while that chunk's POST
    awaits its answer must leave the earlier key submitted (with its id), the interrupted one unknown."""
    j = journal(tmp_path)
    outbox: list[dict[str, Any]] = []
    first, second = (dict([item]) for item in requests(2).items())
    submit_chunk(client, j, first, outbox=outbox)
    emulator.configure(response_delay=1.5)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    with pytest.raises(Interrupt):
        submit_chunk(client, j, second, outbox=outbox)
    assert outbox == []  # written with the second intent, never twice
    entries = j.load()
    (k1,), (k2,) = first, second
    assert entries[k1].task_id and not entries[k1].unknown_submit
    assert entries[k2].unknown_submit and entries[k2].charged_submits == 1
    assert emulator.ledger()["posts"] == 2
