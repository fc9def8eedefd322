"""The wait decision of a batch pass: stay on the worker, or defer to the triggerer (a pure function)."""

from __future__ import annotations

import pytest

from airflow_provider_imagen.batch.window import linger_for
from airflow_provider_imagen.polling import PollSchedule

NOW = 1_800_000_000.0
SCHEDULE = PollSchedule(expected_render=10.0, poll_interval=2.0)


def decide(submitted: dict[str, float | None], *, refillable: bool, linger: float = 5.0) -> float | None:
    return linger_for(submitted, SCHEDULE, linger=linger, refillable=refillable, now=NOW, deadline=NOW + 3600)


def test_a_window_just_sent_with_nothing_left_to_send_defers() -> None:
    """First ends 10 s away, beyond ``linger``: the triggerer waits, the slot is free."""
    assert decide({"a": NOW, "b": NOW - 1}, refillable=False) is None


def test_a_window_with_rows_waiting_stays_through_the_first_renders() -> None:
    """Refilling on the worker: waits until the first poll (9 s away), plus ``linger``."""
    assert decide({"a": NOW, "b": NOW - 1}, refillable=True) == pytest.approx(9.0 + 5.0)


def test_ends_due_within_linger_are_awaited_on_the_worker() -> None:
    """The first poll of ``b`` is 3 s away: cheaper to wait than to pay a round trip."""
    assert decide({"a": NOW, "b": NOW - 7}, refillable=False) == pytest.approx(3.0 + 5.0)


def test_overdue_tasks_of_a_slow_api_defer_even_with_rows_waiting() -> None:
    """Polls back off: 10 s after submit, then +2, +3, +4.5 … capped at 30 s; grid instants at 164.3,
    194.3 and 224.3 s after the submit. 200 s after it, the next poll is 24.3 s away: defer. 190 s after
    it, the next is 4.3 s away: wait."""
    assert decide({"a": NOW - 200.0}, refillable=True) is None
    assert decide({"a": NOW - 190.0}, refillable=True) == pytest.approx(4.34 + 5.0, abs=0.01)


def test_linger_zero_always_defers_and_the_deadline_caps_the_wait() -> None:
    assert decide({"a": NOW - 9}, refillable=True, linger=0.0) is None
    capped = linger_for({"a": NOW - 9}, SCHEDULE, linger=5.0, refillable=True, now=NOW, deadline=NOW + 2.0)
    assert capped == pytest.approx(2.0)
    assert decide({}, refillable=True) is None
