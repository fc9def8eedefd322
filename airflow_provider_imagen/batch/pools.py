"""The thread pools of a batch's passes, which use as many of their threads as the API's latency asks for.

Why: a batch that streams on its worker sends a round of POSTs, polls and downloads several times a
second. Against a far API each call waits on the network, and spreading a round over many threads is what
keeps it short. Against a near one (a local emulator, an API in the same data centre) each call takes a
millisecond or two of CPU, the threads mostly wait for the interpreter lock, and every hand-over of it
costs the process kernel time: on a 2-core machine a stream spread over all of up to 8 + 8 + 4 threads
spent about a tenth more CPU per image than one spread as its calls need, for the same wall time. So a
pool measures how long its calls take and spreads a round over just enough threads to finish it within
its time budget, never more than its ceiling (the operator's ``mirror_concurrency``, the schedule's
``max_concurrent_polls``, the engine's ``submit_concurrency``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from airflow_provider_imagen.batch.base import BatchSettings

T = TypeVar("T")

#: Weight of the newest call in the running mean of a call's duration: a few dozen calls set it.
_SMOOTHING = 0.1


class SizedPool(Executor):
    """A thread pool whose :meth:`map` spreads a round over ``ceil(calls × mean call / budget)`` threads.

    At most ``ceiling``. Until it has timed a call, it uses every thread it may (the right choice for a far
    API). A round of calls is split into interleaved groups, one per thread, each run in order; results
    come back in the order of the items, as :meth:`Executor.map` returns them.
    """

    def __init__(self, ceiling: int, budget: float, name: str) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling={ceiling}: a pool needs at least one thread")
        if budget <= 0:
            raise ValueError(f"budget={budget}: must be positive seconds")
        self.ceiling = ceiling
        self.budget = budget
        self._pool = ThreadPoolExecutor(ceiling, thread_name_prefix=name)
        self._mean: float | None = None
        self._lock = threading.Lock()

    @property
    def mean_call(self) -> float | None:
        """Seconds one call took, on a running average (``None`` before the first)."""
        return self._mean

    def width(self, calls: int) -> int:
        """Return how many threads ``calls`` calls should be spread over."""
        if calls <= 1:
            return max(calls, 0)
        mean = self._mean
        if mean is None:
            return min(self.ceiling, calls)
        return max(1, min(self.ceiling, calls, math.ceil(calls * mean / self.budget)))

    def timed(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Return ``fn`` recording how long each call takes, for :meth:`width`."""

        def run(*args: Any) -> T:
            start = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._observe(time.monotonic() - start)

        return run

    def _observe(self, seconds: float) -> None:
        with self._lock:
            mean = self._mean
            self._mean = seconds if mean is None else mean + _SMOOTHING * (seconds - mean)

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        items = list(zip(*iterables, strict=False))  # as Executor.map: the shortest iterable ends it
        width = self.width(len(items))
        call = self.timed(fn)
        if width >= len(items):
            return self._pool.map(lambda args: call(*args), items, timeout=timeout)
        groups = [items[g::width] for g in range(width)]
        done = self._pool.map(lambda group: [call(*args) for args in group], groups, timeout=timeout)
        results: list[Any] = [None] * len(items)
        for g, group_results in enumerate(done):
            results[g::width] = group_results
        return iter(results)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


class PassThreads:
    """The thread pools of a batch's passes, started once per process and kept across its passes.

    A batch streaming on the worker runs a round of submits, polls and downloads every few hundred
    milliseconds; starting fresh threads for every round cost a few percent of its CPU. Each of the
    round's three steps may take a quarter of the gap between rounds before its pool spreads it wider.
    """

    def __init__(self, settings: BatchSettings) -> None:
        schedule = settings.schedule
        budget = schedule.round_gap / 4
        self.submit = SizedPool(settings.submit_concurrency, budget, "imagen-submit")
        self.mirror = SizedPool(settings.mirror_concurrency, budget, "imagen-mirror")
        self.poll = SizedPool(schedule.max_concurrent_polls, budget, "imagen-poll")

    def close(self) -> None:
        for pool in (self.submit, self.mirror, self.poll):
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PassThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
