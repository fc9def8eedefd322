"""The wait decision of a batch pass: stay on the worker, or defer to the triggerer (a pure function)."""

from __future__ import annotations

import pytest

from airflow_provider_imagen.batch.window import linger_for, streams_on_worker
from airflow_provider_imagen.polling import PollSchedule

NOW = 1_800_000_000.0
SCHEDULE = PollSchedule(expected_render=10.0, poll_interval=2.0)


def decide(
    submitted: dict[str, float | None], *, refillable: bool, linger: float = 5.0, stream: bool = True
) -> float | None:
    return linger_for(
        submitted, SCHEDULE, linger=linger, refillable=refillable, stream=stream, now=NOW, deadline=NOW + 3600
    )


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


def test_a_batch_that_does_not_stream_defers_while_rows_wait_however_soon_the_next_end() -> None:
    """Slot-free refills: the trigger brings the worker back for a share of the window."""
    assert decide({"a": NOW - 9.9}, refillable=True, stream=False) is None
    # Once everything is sent, an end due within ``linger`` is still awaited on the worker.
    assert decide({"a": NOW - 9}, refillable=False, stream=False) == pytest.approx(1.0 + 5.0)


def test_a_slot_free_batch_waits_for_an_end_about_to_be_seen_while_its_slot_share_allows() -> None:
    """Under its slot budget, an end seen within a poll interval and a quarter is awaited on the worker
    (its place refilled at once, not after a round trip through the triggerer); over it, or for an end
    further away, the batch defers."""
    from airflow_provider_imagen.batch.window import SLOT_SHARE

    def share(submitted: dict[str, float | None], slot_share: float) -> float | None:
        return linger_for(
            submitted, SCHEDULE, linger=5.0, refillable=True, stream=False, now=NOW, deadline=NOW + 3600,
            slot_share=slot_share,
        )  # fmt: skip

    assert share({"a": NOW - 9.0}, 0.1) == pytest.approx(1.0 + 5.0)
    assert share({"a": NOW - 9.0}, SLOT_SHARE) is None
    assert share({"a": NOW - 6.0}, 0.1) is None  # 4 s away: more than 2 s x 1.25


def test_with_nothing_left_to_send_an_end_due_before_a_deferral_could_end_is_awaited_on_the_worker() -> None:
    """A deferral lasts at least ``min_deferral`` (7 s): an end 6 s away is awaited here, not deferred for."""
    submitted = {"a": NOW - 4}
    assert decide(submitted, refillable=False) is None  # 6 s > linger, no hold: defer
    waited = linger_for(
        submitted, SCHEDULE, linger=5.0, refillable=False, stream=False, now=NOW, deadline=NOW + 3600,
        min_deferral=7.0,
    )  # fmt: skip
    assert waited == pytest.approx(6.0 + 5.0)


def test_renders_shorter_than_two_deferral_round_trips_stream_on_the_worker() -> None:
    """A round trip is ``min_deferral`` plus ~1.5 s of resume: 4.5 s at the default 3 s."""
    assert not streams_on_worker(SCHEDULE, linger=5.0, min_deferral=3.0)  # 10 s renders: defer
    assert streams_on_worker(PollSchedule(expected_render=1.0), linger=5.0, min_deferral=3.0)
    assert streams_on_worker(SCHEDULE, linger=5.0, min_deferral=5.0)  # a slow scheduler: 13 s round trips
    assert not streams_on_worker(PollSchedule(expected_render=1.0), linger=0.0, min_deferral=3.0)


def test_linger_zero_always_defers_and_the_deadline_caps_the_wait() -> None:
    assert decide({"a": NOW - 9}, refillable=True, linger=0.0) is None
    capped = linger_for(
        {"a": NOW - 9}, SCHEDULE, linger=5.0, refillable=True, stream=True, now=NOW, deadline=NOW + 2.0
    )
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
    from airflow_provider_imagen.batch.journal import new_record
    from airflow_provider_imagen.batch.specs import expand_specs
    from airflow_provider_imagen.batch.window import plan_window

    old = expand_specs([{"prompt_id": "p1", "prompt": "a blue vase"}])[0]
    new = expand_specs([{"prompt_id": "p1", "prompt": "a green vase"}])[0]
    assert old.key == new.key and old.digest != new.digest
    entries = folded(
        new_record("intent", old.key, a="a1", d=old.digest),
        new_record("submitted", old.key, a="a1", task_id="t1"),
        new_record("terminal", old.key, task_id="t1", status="completed"),
        new_record("mirrored", old.key, task_id="t1", image={"uri": "/x.png"}),
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
    from airflow_provider_imagen.batch.journal import new_record
    from airflow_provider_imagen.batch.specs import expand_specs
    from airflow_provider_imagen.batch.window import plan_window

    specs = expand_specs([{"prompt_id": p, "prompt": f"item {p}"} for p in "abcd"])
    a, b = specs[0].key, specs[1].key
    entries = folded(
        new_record("intent", a, a="a1", d=specs[0].digest),
        new_record("intent", a, a="a2", d=specs[0].digest),
        new_record("submitted", a, a="a2", task_id="t-a"),
        new_record("intent", b, a="b1", d=specs[1].digest),
        new_record("ambiguous", b, a="b1", reason="502"),
    )
    plan = plan_window(specs, entries, max_in_flight=10, max_credits=4 * 46, resubmit_unknown=True)
    assert plan.committed == 3 * 46
    assert [s.key for s in plan.to_submit] == [b]  # b resent (paid again, by consent), c and d wait
    assert plan.budget_bound and [s.prompt_id for s in plan.waiting] == ["c", "d"]


def test_check_balance_counts_each_credit_once() -> None:
    """An earlier try paid for 2 images (92 credits, already gone from the balance of 1,000): the run
    may spend 1,092 in all, not 1,000 more and not 1,000 - 92."""
    from airflow_provider_imagen.batch.engine import budget_with_balance
    from airflow_provider_imagen.batch.journal import new_record

    entries = folded(
        new_record("intent", "a|1:1|v0", a="1"),
        new_record("submitted", "a|1:1|v0", a="1", task_id="t1"),
        new_record("intent", "b|1:1|v0", a="2"),  # a crash: maybe paid
        new_record("try", "/try", started_at=0, deadline=1, budget=None),
    )
    assert budget_with_balance(None, balance=1000, entries=entries) == 1092
    assert budget_with_balance(500, balance=1000, entries=entries) == 500
    assert budget_with_balance(5000, balance=1000, entries=entries) == 1092


# -- the index: the same plan, touching only what changed -----------------------------------------------


def _random_history(rng, spec, entries, now: float) -> None:
    """Fold a random, plausible history for ``spec`` into ``entries`` (sometimes none at all)."""
    from airflow_provider_imagen.batch.journal import JournalEntry, new_record

    if not spec.valid or rng.random() < 0.25:
        return
    entry = entries.setdefault(spec.key, JournalEntry(spec.key))
    attempt = f"a{rng.randrange(10**9)}"
    digest = spec.digest if rng.random() < 0.9 else "an-older-request"
    ts = now + rng.choice((-50.0, 50.0))
    entry.apply(new_record("intent", spec.key, a=attempt, d=digest, ts=ts))
    fate = rng.choice(("pending", "ambiguous", "rejected", "submitted", "submitted", "submitted"))
    if fate == "ambiguous":
        entry.apply(new_record("ambiguous", spec.key, a=attempt, reason="502"))
    elif fate == "rejected":
        kind = rng.choice(("not_sent", "rate_limited", "refused", "authentication"))
        entry.apply(new_record("rejected", spec.key, a=attempt, refusal=kind, reason="x", ts=ts))
    elif fate == "submitted":
        task = f"t-{spec.key}"
        entry.apply(new_record("submitted", spec.key, a=attempt, task_id=task, ts=ts))
        end = rng.choice((None, "completed", "failed", "not_found"))
        if end is not None:
            code = rng.choice((80006, 60001)) if end == "failed" else None
            entry.apply(new_record("terminal", spec.key, task_id=task, status=end, error_code=code))
            if end == "completed":
                how = rng.choice(("none", "mirrored", "failed", "final"))
                if how == "mirrored":
                    entry.apply(new_record("mirrored", spec.key, task_id=task, image={"uri": "x"}))
                elif how != "none":
                    entry.apply(
                        new_record(
                            "mirror_failed", spec.key, task_id=task, reason="r", final=how == "final", ts=ts
                        )
                    )


def _same(index_plan, full) -> None:
    assert [s.key for s in index_plan.to_submit] == [s.key for s in full.to_submit]
    assert index_plan.waiting_count == full.waiting_count == len(full.waiting)
    for name in ("in_flight", "to_mirror", "unknown", "rejected", "committed", "done", "total", "failed"):
        assert getattr(index_plan, name) == getattr(full, name), name
    assert (index_plan.moderated, index_plan.budget_bound) == (full.moderated, full.budget_bound)


@pytest.mark.parametrize("seed", range(12))
def test_the_index_plans_exactly_what_plan_window_plans(seed: int) -> None:
    """Random journals and random passes (records folded into random keys): after every touch, the
    index's plan equals :func:`plan_window` over the whole table, at several windows and budgets."""
    import random

    from airflow_provider_imagen.batch.journal import new_record
    from airflow_provider_imagen.batch.specs import expand_specs as expand
    from airflow_provider_imagen.batch.table import expand_specs  # noqa: F401 - the old path still works
    from airflow_provider_imagen.batch.window import WindowIndex, plan_window

    rng = random.Random(seed)
    rows = [{"prompt_id": f"p{i}", "prompt": "" if rng.random() < 0.05 else f"lamp {i}"} for i in range(120)]
    specs = expand(rows, sizes=["1:1", "16:9"])
    now = 1_000_000.0
    entries: dict = {}
    for spec in specs:
        _random_history(rng, spec, entries, now)
    rules = dict(resubmit_unknown=bool(seed % 2), retry_mirror_after=now, retry_rejected_before=now)
    index = WindowIndex(specs, entries, **rules)
    for _step in range(25):
        window, budget, stop = (
            rng.choice((1, 5, 40, 500)),
            rng.choice((None, 46 * 30, 46 * 200)),
            rng.random() < 0.1,
        )
        full = plan_window(
            specs, entries, max_in_flight=window, max_credits=budget, stop_submitting=stop, **rules
        )
        _same(index.plan(max_in_flight=window, max_credits=budget, stop_submitting=stop), full)
        if stop:
            assert [s.key for s in index.waiting()] == [s.key for s in full.waiting]
        # A pass: send some of the planned rows, end or change some others.
        touched = []
        for spec in full.to_submit[: rng.randrange(0, 6)]:
            entries.setdefault(spec.key, None)
            entries.pop(spec.key)
            _random_history(rng, spec, entries, now)
            touched.append(spec.key)
        for spec in rng.sample(list(specs), 5):
            if spec.key in entries and rng.random() < 0.5:
                entries[spec.key].apply(
                    new_record("terminal", spec.key, task_id=entries[spec.key].task_id, status="completed")
                )
                touched.append(spec.key)
        index.touch(touched, entries)


@pytest.mark.parametrize("rows", [1_000, 20_000])
def test_a_pass_touches_the_same_number_of_rows_at_any_table_size(rows: int) -> None:
    """Ten passes of a window of 5: the index reclassifies only the specs those passes changed (and
    reads only the head of the table to find the next ones), whether the table has 1,000 rows or
    20,000."""
    from airflow_provider_imagen.batch.journal import JournalEntry, new_record
    from airflow_provider_imagen.batch.specs import expand_specs as expand
    from airflow_provider_imagen.batch.window import WindowIndex

    specs = expand([{"prompt_id": f"p{i}", "prompt": f"lamp {i}"} for i in range(rows)])
    entries: dict = {}
    index = WindowIndex(specs, entries)
    built = index.touched
    in_flight: list[str] = []
    submitted = 0
    for _pass in range(10):
        plan = index.plan(max_in_flight=5)
        assert len(plan.to_submit) + len(plan.in_flight) <= 5
        submitted += len(plan.to_submit)
        changed = []
        for spec in plan.to_submit:
            entry = entries.setdefault(spec.key, JournalEntry(spec.key))
            entry.apply(new_record("intent", spec.key, a="a", d=spec.digest))
            entry.apply(new_record("submitted", spec.key, a="a", task_id=f"t{spec.key}"))
            changed.append(spec.key)
        for key in in_flight:
            entries[key].apply(new_record("terminal", key, task_id=f"t{key}", status="completed"))
            entries[key].apply(new_record("mirrored", key, task_id=f"t{key}", image={"uri": "x"}))
            changed.append(key)
        in_flight = [s.key for s in plan.to_submit]
        index.touch(changed, entries)
    # Every other pass sends 5 and the next ends them: 25 sent, 25 ended, whatever the table's size.
    assert (submitted, index.touched - built) == (25, 50)
    assert index.plan(max_in_flight=5).waiting_count == rows - 25 - 5  # 5 more planned now
