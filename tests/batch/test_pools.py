"""The pass threads spread a round over as many threads as its calls' duration asks for, no more."""

from __future__ import annotations

import threading
import time

import pytest

from airflow_provider_imagen.batch.base import BatchSettings
from airflow_provider_imagen.batch.pools import PassThreads, SizedPool


def _calls_on(pool: SizedPool, items: list[int], pause: float = 0.0) -> tuple[list[int], set[str]]:
    names: set[str] = set()
    lock = threading.Lock()

    def call(x: int) -> int:
        with lock:
            names.add(threading.current_thread().name)
        if pause:
            time.sleep(pause)
        return x * 2

    return list(pool.map(call, items)), names


def test_quick_calls_share_one_thread_and_keep_their_order() -> None:
    pool = SizedPool(8, budget=1.0, name="t-quick")
    try:
        assert pool.width(20) == 8  # nothing timed yet: every thread, as for a far API
        first, _ = _calls_on(pool, list(range(20)))
        assert first == [2 * x for x in range(20)]
        assert pool.mean_call is not None and pool.mean_call < 1.0 / 20
        assert pool.width(20) == 1
        second, names = _calls_on(pool, list(range(20)))
        assert second == [2 * x for x in range(20)]
        assert len(names) == 1
    finally:
        pool.shutdown()


def test_slow_calls_use_every_thread_up_to_the_ceiling() -> None:
    pool = SizedPool(4, budget=0.01, name="t-slow")
    try:
        _calls_on(pool, list(range(8)), pause=0.02)
        assert pool.width(8) == 4  # 8 × 0.02 s in 0.01 s would take 16 threads: the ceiling is 4
        assert pool.width(3) == 3  # never more threads than calls
        results, names = _calls_on(pool, list(range(8)), pause=0.02)
        assert results == [2 * x for x in range(8)]
        assert len(names) > 1
    finally:
        pool.shutdown()


def test_a_round_is_split_by_what_fits_the_budget() -> None:
    pool = SizedPool(8, budget=0.1, name="t-split")
    try:
        pool._observe(0.01)  # one call takes 10 ms
        assert pool.width(0) == 0
        assert pool.width(1) == 1
        assert pool.width(10) == 1  # 100 ms of calls fit the budget on one thread
        assert pool.width(25) == 3  # 250 ms: three threads
        assert pool.width(1000) == 8
    finally:
        pool.shutdown()


def test_an_error_in_a_call_reaches_the_caller() -> None:
    pool = SizedPool(2, budget=1.0, name="t-error")
    try:
        _calls_on(pool, [1, 2])  # timed: quick calls, one thread from now on

        def call(x: int) -> int:
            if x == 3:
                raise ValueError("row 3")
            return x

        with pytest.raises(ValueError, match="row 3"):
            list(pool.map(call, range(6)))
    finally:
        pool.shutdown()


def test_the_pass_threads_take_their_ceilings_and_budget_from_the_settings() -> None:
    settings = BatchSettings(
        mirror_concurrency=5, submit_concurrency=3, expected_render=1.0, poll_interval=0.1
    )
    with PassThreads(settings) as threads:
        assert (threads.submit.ceiling, threads.mirror.ceiling) == (3, 5)
        assert threads.poll.ceiling == settings.schedule.max_concurrent_polls
        assert threads.mirror.budget == pytest.approx(settings.schedule.round_gap / 4)
