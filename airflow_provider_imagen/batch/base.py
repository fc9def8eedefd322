"""The types a batch pass speaks in: its settings, the try's clock, and what a pass asks for next.

Why apart from the pass: the operator builds settings and clocks, turns a :class:`Wait` into a deferral
and a :class:`Finish` into a manifest, and a test can build any of them without the engine. Everything
here is JSON-safe where it must ride a deferral, and holds no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.polling import PollSchedule

#: The window a try starts from: high enough for a nightly table in one round, low enough that an
#: account whose limit is lower hears a few hundred 429s at most before the window finds it.
START_WINDOW: Final = 100
#: What a 429 leaves of the window. Halving (TCP's choice) left 8 batches on one capped account using
#: 69 % of its capacity, a fifth off 79 %, a tenth off 82 % (with 1–6 % of submits answered 429): a
#: batch refills a place only once a poll has seen its task end, so the account is never quite as
#: full as the windows, and a deep cut empties it further.
DECREASE: Final = 0.9
#: Fewest accepted submits that earn a window one growth step, however small it is (see
#: :func:`growth_due`): a window of a few places does not grow on every submit the API takes.
MIN_GROWTH_CREDIT: Final = 4

StopReason = Literal["deadline", "insufficient_credits", "authentication", "unreachable"]
#: Why a try sends no more: its deadline passed, the API refused the account or the key (every other
#: POST would be refused the same way), or the API could not be reached at all.
STOP_REASONS: Final[tuple[str, ...]] = get_args(StopReason)


class StopRequestedError(RuntimeError):
    """Airflow asked the task to stop while it was submitting; nothing more was sent. Safe to retry."""


@dataclass(frozen=True)
class BatchSettings:
    """The knobs of a batch run that shape its passes (all JSON-safe)."""

    #: The ceiling of the window; the window itself starts lower and adapts (see :attr:`RunClock.window`).
    max_in_flight: int = 1000
    #: Come back to the worker once this share of the window has ended (at least one task) and the
    #: deferral has lasted ``min_deferral``.
    refill_fraction: float = 0.1
    max_credits: int | None = None
    resubmit_unknown: bool = False
    #: POSTs per second at most; ``None`` for as fast as the API answers (429s are still honoured).
    max_submit_rate: float | None = None
    #: Submits journalled per segment: a crash mid-chunk leaves up to this many unknown submits. ``None``:
    #: 1 on a local journal (a write costs microseconds), 10 on an object store (a write is a PUT).
    journal_chunk: int | None = None
    #: Parallel downloads when mirroring.
    mirror_concurrency: int = 8
    #: POSTs in flight at once (each still journalled before it is sent).
    submit_concurrency: int = 4
    #: Seconds between progress lines.
    progress_interval: float = 30.0
    #: With nothing left to send, wait on the worker instead of deferring when the next task is due to end
    #: within this many seconds (see :func:`airflow_provider_imagen.batch.window.linger_for`). ``0``
    #: always defers, and never refills on the worker.
    linger: float = 5.0
    #: While rows wait for room: ``True`` refills each place on the worker as it frees (fastest, holds a
    #: worker slot), ``False`` defers between refills, ``None`` decides from the render time
    #: (:func:`airflow_provider_imagen.batch.window.streams_on_worker`).
    refill_on_worker: bool | None = None
    #: Seconds a deferral lasts at least (the trigger holds its event; the operator sets it from the
    #: deployment: :func:`airflow_provider_imagen.triggers.imagen.min_deferral_seconds`).
    min_deferral: float = 7.0
    #: Seconds after its submit at which a task is first polled (the poll schedule's first poll).
    expected_render: float = 10.0
    #: First interval between polls of an overdue task (the poll schedule's; grows by 1.5×).
    poll_interval: float = 2.0
    #: Record an image whose pixel size is not Imagen 4's for its ratio as ``wrong_size``.
    check_pixel_size: bool = True
    #: Shrink the window on a submit answered 429 and grow it back as the API accepts
    #: submits (see :meth:`RunClock.adapt_window`). ``False`` keeps ``max_in_flight``, and the client
    #: waits out each 429 and sends again.
    adaptive_window: bool = True

    @property
    def schedule(self) -> PollSchedule:
        """Return the poll schedule of this batch (the trigger's and the worker's)."""
        return PollSchedule.for_renders(self.expected_render, self.poll_interval)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight={self.max_in_flight}: must be at least 1")
        if not 0 < self.refill_fraction <= 1:
            raise ValueError(f"refill_fraction={self.refill_fraction}: must be in (0, 1]")
        if self.max_credits is not None and self.max_credits <= 0:
            raise ValueError(
                f"max_credits={self.max_credits}: must be a positive number of credits "
                f"({CREDITS_PER_IMAGE} per image), or None for no budget"
            )
        if self.max_submit_rate is not None and self.max_submit_rate <= 0:
            raise ValueError(f"max_submit_rate={self.max_submit_rate}: must be positive, or None")


@dataclass
class RunClock:
    """Wall-clock facts of one try that must survive between passes (they ride the deferral kwargs)."""

    #: When this try started (epoch seconds).
    started_at: float
    #: When this try must stop waiting (epoch seconds).
    deadline: float
    #: When the last progress line was logged.
    progress_at: float = 0.0
    #: The effective budget for this try (``max_credits`` capped by a balance check), if any.
    budget: int | None = None
    #: The journal lease this try claimed (see :mod:`airflow_provider_imagen.batch.fence`).
    epoch: int | None = None
    #: Tasks this try keeps in flight now (``None``: not adapted yet, :data:`START_WINDOW`); never above
    #: ``max_in_flight``. See :meth:`adapt_window`.
    window: int | None = None
    #: The window at the last 429: below it the window doubles, above it grows per window's worth of
    #: accepted submits, or sooner (:func:`growth_due`) while it holds few places (``None``: no 429 yet).
    threshold: int | None = None
    #: Submits the API accepted since the window last grew (above ``threshold``).
    credit: int = 0
    #: Until when (epoch seconds) a 429 is part of the congestion that last shrank the window: the
    #: API's ``Retry-After`` from that 429.
    calm_until: float | None = None
    #: That ``Retry-After`` (seconds): the API's period of congestion, which also paces growth faster
    #: than a window's worth per step (see :meth:`adapt_window`).
    period: float | None = None
    #: Until when (epoch seconds) growth waits before taking another step faster than a window's worth.
    paced_until: float | None = None
    #: Seconds of worker slot this try's earlier processes held (each from its start to its deferral).
    held: float = 0.0
    #: When this process started (epoch seconds; not carried over: each resume is a new process).
    resumed_at: float | None = None

    def slot_share(self, now: float) -> float:
        """Return the share of this try's wall time a worker slot was held, this process included."""
        here = now - self.resumed_at if self.resumed_at is not None else 0.0
        return (self.held + here) / max(now - self.started_at, 1e-6)

    def current_window(self, ceiling: int) -> int:
        """Return how many tasks may be in flight now, ``ceiling`` being ``max_in_flight``."""
        return min(self.window or START_WINDOW, ceiling)

    def adapt_window(
        self,
        ceiling: int,
        *,
        now: float,
        in_flight: int,
        accepted: int = 0,
        held_back: bool = False,
        retry_after: float | None = None,
    ) -> int:
        """Size the window from one round of submits; return the new window.

        The API's capacity is not documented and is shared by every batch of the account, so the window
        finds it, the way TCP finds a path's:

        - slow start: until the first 429, each round the API takes whole while rows wait doubles the
          window, so one batch on an idle account fills it in a few rounds;
        - then it grows per window's worth of accepted submits (about once per render, however many
          rounds a batch refilling at every end runs), or per :func:`growth_due` of them (fewer, the
          fewer places the window holds against its ceiling) at most once per ``Retry-After``, by
          what it grew since the last 429, at least one: by one right after a 429, where the account
          was full, then by 2, 4, … for as long as the account takes everything, so places another
          batch left (it finished, or gave way) are taken in a few renders, not one place per render;
        - multiplicative decrease: a 429 shrinks it by a tenth (:data:`DECREASE`), at most once per
          ``Retry-After``: every 429 of one burst (several batches asking at once) is one signal, not
          one decrease each. Nor does it stay above what the batch has in flight: the account is full
          at that, so a window far above it (a batch starting, or one that just lost places to others)
          would only hear more 429s. A 429 heard with nothing of the batch in flight only says "wait":
          the account is full of other work, and shrinking a window that holds nothing would not
          lighten it.

        Several batches on one account then converge on its capacity instead of each storming it.

        :param now: the time of the round (epoch seconds).
        :param in_flight: the batch's tasks in flight after the round.
        :param accepted: submits of the round the API accepted.
        :param held_back: rows waited for room after the round (a window that holds nothing back proves
            nothing about the account).
        :param retry_after: the API's ``Retry-After`` (seconds) when it answered a submit of the round
            with 429; ``None`` when it answered none.
        """
        window = self.current_window(ceiling)
        if retry_after is not None:
            if in_flight and (self.calm_until is None or now >= self.calm_until):
                self.window = self.threshold = max(1, min(int(window * DECREASE), in_flight))
                self.credit = 0
                self.calm_until = now + retry_after
                self.period = retry_after
        elif accepted and held_back and window < ceiling:
            if self.threshold is None:
                self.window = min(window * 2, ceiling)
            elif window < self.threshold:
                self.window = min(window * 2, self.threshold, ceiling)
            else:
                self.credit += accepted
                grown = window
                while grown < ceiling:
                    if self.credit >= grown:  # a window's worth: the pace at the ceiling
                        cost = grown
                    elif self.credit >= (cost := growth_due(grown, ceiling)) and now >= (
                        self.paced_until or 0.0
                    ):
                        self.paced_until = now + (self.period or 1.0)
                    else:
                        break
                    self.credit -= cost
                    grown = min(grown + max(1, grown - self.threshold), ceiling)
                self.window = grown
        return self.current_window(ceiling)

    def to_kwargs(self) -> dict[str, Any]:
        """Return the JSON-safe form for ``defer(kwargs=…)``."""
        return {
            "started_at": self.started_at,
            "deadline": self.deadline,
            "progress_at": self.progress_at,
            "budget": self.budget,
            "epoch": self.epoch,
            "window": self.window,
            "threshold": self.threshold,
            "credit": self.credit,
            "calm_until": self.calm_until,
            "period": self.period,
            "paced_until": self.paced_until,
            "held": self.held,
        }


def growth_due(window: int, ceiling: int) -> int:
    """Return how many accepted submits earn a window past its last 429 one growth step.

    A window's worth scaled by the window's share of its ceiling (``window² / ceiling``), at least
    :data:`MIN_GROWTH_CREDIT`: at the ceiling a window's worth (about a render), at a tenth of it a
    tenth of that. Why: every batch on a full account loses the same tenth per 429, so with equal
    growth the shares stay where the first seconds left them (8 batches of one backfill ended 100 s
    apart in a 320 s run, the last ones alone on an account they could not fill). Batches of one
    backfill share a ceiling, so growing sooner the fewer places a batch holds pulls their shares
    together, and they finish closer to each other while the account is still full. Such a step comes
    at most once per ``Retry-After`` (:meth:`RunClock.adapt_window`): where renders are shorter than
    that period, faster steps would outrun the one cut per period and storm the account.
    """
    return max(MIN_GROWTH_CREDIT, window * window // max(ceiling, 1))


@dataclass(frozen=True)
class Wait:
    """Poll these tasks until ``fire_when_done`` of them end, then run another pass."""

    task_ids: list[str]
    submitted_at: list[float | None]
    fire_when_done: int
    #: The ids were already polled on their grids up to this time (``None`` on a try's first pass).
    polled_until: float | None = None
    #: Wait on the worker for at most this many seconds, then run another pass (``None``: defer).
    linger: float | None = None
    #: When deferred: fire this many seconds before enough tasks are due for their first poll, so the
    #: worker arrives as they are (``None``: fire on ends the trigger saw).
    fire_ahead: float | None = None


@dataclass
class Finish:
    """Nothing is left to do (or the run stopped): write the manifest with these overrides."""

    #: key → (status, reason) for requests the journal cannot describe alone.
    overrides: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Why the run stopped early, if it did.
    stopped: StopReason | None = None
    #: The API's own answer when it refused the run as a whole (e.g. a wrong key), to fail the task with.
    error: str | None = None
    #: Paid images still not mirrored (and not expired): the try must fail so a retry mirrors them.
    unmirrored: int = 0
