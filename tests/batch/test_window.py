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


# -- the plan ---------------------------------------------------------------------------------------


def folded(*records: dict) -> dict:
    from airflow_provider_imagen.batch.journal import JournalEntry

    entries: dict = {}
    for rec in records:
        entries.setdefault(rec["k"], JournalEntry(rec["k"])).apply(rec)
    return entries


def test_a_changed_prompt_is_planned_anew_and_its_old_charge_stays_committed() -> None:
    from airflow_provider_imagen.batch.journal import record
    from airflow_provider_imagen.batch.specs import expand_specs
    from airflow_provider_imagen.batch.window import plan_window

    old = expand_specs([{"prompt_id": "p1", "prompt": "a blue vase"}])[0]
    new = expand_specs([{"prompt_id": "p1", "prompt": "a green vase"}])[0]
    assert old.key == new.key and old.digest != new.digest
    entries = folded(
        record("intent", old.key, a="a1", d=old.digest),
        record("submitted", old.key, a="a1", task_id="t1"),
        record("terminal", old.key, task_id="t1", status="completed"),
        record("mirrored", old.key, task_id="t1", image={"uri": "/x.png"}),
    )
    same = plan_window([old], entries, max_in_flight=10)
    assert same.to_submit == [] and same.done == 1 and same.committed == 46
    changed = plan_window([new], entries, max_in_flight=10)
    assert changed.to_submit == [new] and changed.committed == 46
    # The budget sees the old charge: room for the new image only if 92 credits are allowed.
    assert plan_window([new], entries, max_in_flight=10, max_credits=91).to_submit == []
    assert plan_window([new], entries, max_in_flight=10, max_credits=92).to_submit == [new]


def test_every_post_that_may_have_been_paid_counts_against_the_budget() -> None:
    """Row a: crashed mid-submit, then resent with ``resubmit_unknown`` (2 POSTs may be paid); row b:
    an ambiguous 502. With a budget of 4 images, one more row fits, not two."""
    from airflow_provider_imagen.batch.journal import record
    from airflow_provider_imagen.batch.specs import expand_specs
    from airflow_provider_imagen.batch.window import plan_window

    specs = expand_specs([{"prompt_id": p, "prompt": f"item {p}"} for p in "abcd"])
    a, b = specs[0].key, specs[1].key
    entries = folded(
        record("intent", a, a="a1", d=specs[0].digest),
        record("intent", a, a="a2", d=specs[0].digest),
        record("submitted", a, a="a2", task_id="t-a"),
        record("intent", b, a="b1", d=specs[1].digest),
        record("ambiguous", b, a="b1", reason="502"),
    )
    plan = plan_window(specs, entries, max_in_flight=10, max_credits=4 * 46, resubmit_unknown=True)
    assert plan.committed == 3 * 46
    assert [s.key for s in plan.to_submit] == [b]  # b resent (paid again, by consent), c and d wait
    assert plan.budget_bound and [s.prompt_id for s in plan.waiting] == ["c", "d"]


def test_check_balance_counts_each_credit_once() -> None:
    """An earlier try paid for 2 images (92 credits, already gone from the balance of 1,000): the run
    may spend 1,092 in all, not 1,000 more and not 1,000 - 92."""
    from airflow_provider_imagen.batch.engine import budget_with_balance
    from airflow_provider_imagen.batch.journal import record

    entries = folded(
        record("intent", "a|1:1|v0", a="1"),
        record("submitted", "a|1:1|v0", a="1", task_id="t1"),
        record("intent", "b|1:1|v0", a="2"),  # a crash: maybe paid
        record("try", "/try", started_at=0, deadline=1, budget=None),
    )
    assert budget_with_balance(None, balance=1000, entries=entries) == 1092
    assert budget_with_balance(500, balance=1000, entries=entries) == 500
    assert budget_with_balance(5000, balance=1000, entries=entries) == 1092
