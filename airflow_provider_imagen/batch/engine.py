"""One pass of a batch: absorb what the poller saw, mirror, refill the window, then wait or finish.

Why passes: a batch of thousands of images runs as one Airflow task that comes back to a worker only when
there is work (images to mirror, room in the window) and waits in the triggerer in between. Each pass
rebuilds its state from the prompt table and the journal, never from memory, so a pass can run on any
worker, after any crash, in any try. The operator is a thin adapter: it turns a :class:`Wait` into a
deferral (or a blocking poll) and a :class:`Finish` into its return value.

Invariants:
- money is spent only in :func:`airflow_provider_imagen.batch.submit.submit_chunk`, after the plan of
  :mod:`airflow_provider_imagen.batch.window` allowed it (window, budget, unknown submits);
- every request ends in the manifest with exactly one status, even when the run stops early;
- no signed URL leaves this module: it is fetched, used for the download and dropped.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.client import ImagenClient
from airflow_provider_imagen.api.errors import (
    AuthenticationError,
    ImageExpiredError,
    ImagenError,
    ImagenTransportError,
    ImageRefusedError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
)
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, Task, credits_to_usd, pixel_size_mismatch
from airflow_provider_imagen.batch.journal import Journal, JournalEntries, JournalEntry, new_record
from airflow_provider_imagen.batch.mirror import image_file_name, mirror_image
from airflow_provider_imagen.batch.pools import PassThreads
from airflow_provider_imagen.batch.status import EXPIRED, NOT_SUBMITTED, REJECTED, SKIPPED_BUDGET
from airflow_provider_imagen.batch.storage import LOCAL_PROTOCOLS, as_path
from airflow_provider_imagen.batch.submit import RateLimiter, SubmitReport, submit_chunk
from airflow_provider_imagen.batch.window import (
    FIRE_AHEAD,
    WindowIndex,
    WindowPlan,
    linger_for,
    streams_on_worker,
)
from airflow_provider_imagen.polling import PollOutcome

if TYPE_CHECKING:
    from airflow_provider_imagen.batch.specs import ImageSpec

from airflow_provider_imagen.batch.base import (  # noqa: F401 - re-exported: where callers import them
    STOP_REASONS,
    BatchSettings,
    Finish,
    RunClock,
    StopReason,
    StopRequestedError,
    Wait,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def patiently(call: Callable[[], T], *, deadline: float, what: str) -> T:
    """Return ``call()``, waiting out every 429 (``Retry-After``) until ``deadline``.

    For free calls only (a balance read, a task fetch): a 429 means "later", never a failure of the
    task, as long as the try has time left.
    """
    while True:
        try:
            return call()
        except RateLimitedError as exc:
            wait = exc.retry_after or 1.0
            if time.time() + wait >= deadline:
                raise
            log.info("The API rate-limits %s; asking again in %.1f s.", what, wait)
            time.sleep(wait)


def entries_for_next_pass(
    journal: Journal, entries: MutableMapping[str, JournalEntry]
) -> MutableMapping[str, JournalEntry] | None:
    """Return what the next pass of this process starts from, or ``None`` when it must read the journal.

    Passes in one process follow each other: the next starts from what this one folded in, and keeps
    its window index. After ``compact_over`` writes the segments are compacted (a long stream on an
    object store would otherwise leave thousands for a later read), from memory when only this object
    wrote them since its last read: a full read costs O(rows), and a stream does it every few hundred
    images. Another writer's file (a fenced older try) asks for the full read, which compacts it too.
    """
    if journal.appended <= journal.compact_over:
        return entries
    if isinstance(entries, JournalEntries) and journal.compact_appended(entries):
        return entries
    return None


def budget_with_balance(max_credits: int | None, *, balance: int, entries: Mapping[str, JournalEntry]) -> int:
    """Return a try's budget capped by what the account can still pay, each credit counted once.

    The budget is compared with everything this run's journal says may have been paid, earlier tries
    included; the balance read now already lacks that spend, so it is added back before capping.
    """
    if isinstance(entries, JournalEntries):
        spent = CREDITS_PER_IMAGE * entries.charged_total()  # without building every entry
    else:
        spent = CREDITS_PER_IMAGE * sum(e.charged_submits for e in entries.values())
    cap = spent + balance
    return cap if max_credits is None else min(max_credits, cap)


class BatchPass:
    """Everything one pass needs; build one per pass, call :meth:`run` once."""

    def __init__(
        self,
        *,
        client: ImagenClient,
        journal: Journal,
        specs: Sequence[ImageSpec],
        images_root: ObjectStoragePath | str,
        settings: BatchSettings,
        clock: RunClock,
        answers: dict[str, Task] | None = None,
        entries: MutableMapping[str, JournalEntry] | None = None,
        index: WindowIndex | None = None,
        stop: threading.Event | None = None,
        now: Callable[[], float] = time.time,
        threads: PassThreads | None = None,
    ) -> None:
        self.client = client
        self.journal = journal
        #: Seconds the API asked to wait after the last round of submits (a 429), else 0.
        self._backoff = 0.0
        #: Set by the operator's ``on_kill`` (a clear, mark-failed, a worker shutting down): no POST after.
        self.stop = stop or threading.Event()
        self.specs = specs
        self.images_root = as_path(images_root)
        self.settings = settings
        self.clock = clock
        self.now = now
        #: The journal folded; ``entries`` lets a caller that has just read it skip a second read.
        self.entries: MutableMapping[str, JournalEntry] = entries if entries is not None else journal.load()
        #: The plan kept up to date across the passes of one process (built here once otherwise).
        self.index = index if index is not None and entries is not None else self._new_index()
        self.schedule = settings.schedule
        #: Terminal answers seen on this worker (URLs included): mirroring needs no second GET for them.
        self.answers = answers if answers is not None else {}
        self._logged_progress = False
        #: Pools the caller keeps across passes; without them, this pass starts its own and stops them.
        self._threads = threads

    # -- the pass ------------------------------------------------------------------------------

    def run(self, outcome: PollOutcome | None, *, sweep: bool = False) -> Wait | Finish:
        """Absorb ``outcome`` (``None`` on the first pass of a try), act, and say what comes next.

        :param sweep: first poll every overdue task here, on the worker: after a resume from the
            triggerer, tasks that ended while the task was being scheduled are found now, not one
            round trip later (each such poll is the GET its download needs anyway).
        """
        if self._threads is not None:
            return self._run(outcome, sweep=sweep)
        with PassThreads(self.settings) as self._threads:
            try:
                return self._run(outcome, sweep=sweep)
            finally:
                self._threads = None

    @property
    def threads(self) -> PassThreads:
        assert self._threads is not None, "only while the pass runs"
        return self._threads

    def _run(self, outcome: PollOutcome | None, *, sweep: bool) -> Wait | Finish:
        started = self.now()
        if outcome is not None:
            self._absorb(outcome)
            if outcome.status == "error":
                raise ImagenError(
                    f"polling failed: {outcome.message}. Paid tasks are journalled; a retry of this task "
                    "re-attaches to them without paying again"
                )
        if sweep:
            self._sweep(started)
        stop = self._stop_reason()
        plan = self._plan(stop is not None)
        # The places of the tasks that ended are refilled before their images are downloaded: a place
        # waits for no download (a streaming batch kept 183 of 200 places busy that way, 192 this way),
        # and the downloads follow the first round of submits. Except right after the sweep of a resumed
        # pass: its burst of GETs may have used up a limit on requests per second, and a submit's 429
        # then would read as a full account and cut the window to the few tasks still in flight.
        # Downloads, free calls that wait out a 429, go first there (and when nothing is to be sent).
        unmirrored = plan.to_mirror
        if unmirrored and (sweep or not plan.to_submit):
            self._mirror(unmirrored)
            unmirrored = []
            plan = self._plan(stop is not None)
        while plan.to_submit:
            before = self.window
            stop = self._submit(plan.to_submit, more_waiting=plan.waiting_count > 0) or stop
            if unmirrored:
                self._mirror(unmirrored)
                unmirrored = []
            plan = self._plan(stop is not None)
            if plan.in_flight and self.window <= before:
                break  # the window is full: the next places free as tasks end
            # The window grew (the API took a whole round): fill it now rather than after the next end.
            if self._backoff and plan.to_submit:
                # Nothing of ours renders and the account is full: wait as the API asked, then try again.
                time.sleep(min(self._backoff, max(self.clock.deadline - self.now(), 0.0)))
                stop = self._stop_reason() or stop
                plan = self._plan(stop is not None)
            # The API refused every submit of that window (400s, say) and nothing is rendering: send the
            # next window now. Refused keys are final for this try, so this ends.
        if plan.unknown and not plan.in_flight and not plan.to_submit:
            # Unknown submits may belong to an older try fenced off mid-chunk: it journals the ones it
            # never sent when it wakes. Read once more before giving them up, and send what it left.
            self.entries = self.journal.load()
            self.index = self._new_index()
            plan = self._plan(stop is not None)
            if plan.to_submit:
                stop = self._submit(plan.to_submit) or stop
                plan = self._plan(stop is not None)
        now = self.now()
        if plan.in_flight and now < self.clock.deadline:
            self._progress(plan)
            window = len(plan.in_flight)
            refillable = bool(plan.waiting_count) and not plan.budget_bound and stop is None
            submitted_at = {t: self.entries[k].submitted_at for k, t in plan.in_flight.items()}
            linger = linger_for(
                submitted_at,
                self.schedule,
                linger=self.settings.linger,
                refillable=refillable,
                stream=self.streams,
                min_deferral=self.settings.min_deferral,
                now=now,
                deadline=self.clock.deadline,
                slot_share=self.clock.slot_share(now),
            )
            if linger is not None:
                need = 1  # on the worker, act on every end at once: mirror it, refill its place
            elif refillable:
                need = max(1, math.ceil(window * self.settings.refill_fraction))
            else:
                need = window  # nothing more to send: come back once, when every task has ended
            return Wait(
                task_ids=list(submitted_at),
                submitted_at=list(submitted_at.values()),
                fire_when_done=need,
                polled_until=self._polled_until(outcome, started),
                linger=linger,
                # Come back as the next tasks fall due, not a resume after they were seen: a refill
                # as the next first polls come, the last wait as the last polls do.
                fire_ahead=FIRE_AHEAD if linger is None else None,
            )
        return self._finish(plan, stop)

    @staticmethod
    def _polled_until(outcome: PollOutcome | None, started: float) -> float | None:
        """Return up to when the tasks were polled on their grids, for the next poller to skip.

        A poller in this process says so itself (its last full round: the instants after it were not
        polled, and skipping them lost tasks for whole backoff steps). After the triggerer, the sweep of
        this pass polled every overdue task at ``started``. A try's first pass: nothing was polled.
        """
        if outcome is None:
            return None
        return outcome.polled_until if outcome.polled_until is not None else started

    # -- steps ---------------------------------------------------------------------------------

    def _new_index(self) -> WindowIndex:
        return WindowIndex(
            self.specs,
            self.entries,
            resubmit_unknown=self.settings.resubmit_unknown,
            retry_mirror_after=self.clock.started_at,
            retry_rejected_before=self.clock.started_at,
        )

    def _plan(self, stop_submitting: bool) -> WindowPlan:
        return self.index.plan(
            max_in_flight=self.window, max_credits=self.clock.budget, stop_submitting=stop_submitting
        )

    @property
    def window(self) -> int:
        """Return how many tasks may be in flight now (see :meth:`RunClock.current_window`)."""
        return self.clock.current_window(self.settings.max_in_flight)

    @property
    def streams(self) -> bool:
        """Return whether rows waiting for room are refilled on the worker rather than after a deferral."""
        if self.settings.refill_on_worker is not None:
            return self.settings.refill_on_worker and self.settings.linger > 0
        return streams_on_worker(
            self.schedule, linger=self.settings.linger, min_deferral=self.settings.min_deferral
        )

    def _adapt(self, reports: Sequence[SubmitReport], *, more_waiting: bool) -> float:
        """Size the window from the API's answers (:meth:`RunClock.adapt_window`); return the wait asked.

        Several batches on one account then share its capacity instead of each storming it with its
        own ``max_in_flight``. With ``adaptive_window=False`` the window stays at ``max_in_flight``; a
        429 still sets the wait.
        """
        limited = [e for r in reports for e in r.rejected.values() if isinstance(e, RateLimitedError)]
        wait = max((e.retry_after or 1.0) for e in limited) if limited else 0.0
        if not self.settings.adaptive_window:
            return wait
        before = self.window
        after = self.clock.adapt_window(
            self.settings.max_in_flight,
            now=self.now(),
            in_flight=len(self.index.in_flight),
            accepted=sum(len(r.submitted) for r in reports),
            held_back=more_waiting,
            retry_after=wait if limited else None,
        )
        if after < before:
            log.info("The API rate-limits submits: the window shrinks from %d to %d.", before, after)
        return wait

    def _stop_reason(self) -> StopReason | None:
        """Return why no more may be submitted in this try, if anything forbids it."""
        if self.now() >= self.clock.deadline:
            return "deadline"
        return self.index.stopping

    def _sweep(self, now: float) -> None:
        """Poll every in-flight task that is overdue, in parallel; record those that ended."""
        overdue = [
            (key, task_id)
            for key, task_id in self.index.in_flight.items()
            if (self.entries[key].submitted_at or now) + self.settings.expected_render <= now
        ]
        if not overdue:
            return

        def one(item: tuple[str, str]) -> dict[str, Any] | None:
            key, task_id = item
            try:
                task = self.client.get_task(task_id)
            except TaskNotFoundError as exc:
                return new_record("terminal", key, task_id=task_id, status="not_found", error_code=exc.code)
            except (ImagenTransportError, ServerError, RateLimitedError):
                return None  # the next poller will ask again
            if not task.is_terminal:
                return None
            self.answers[task_id] = task
            return new_record(
                "terminal",
                key,
                task_id=task_id,
                status=task.status,
                error_code=task.error_code,
                error_message=task.error_message,
            )

        self._write([r for r in self.threads.mirror.map(one, overdue) if r is not None])

    def _absorb(self, outcome: PollOutcome) -> None:
        key_of = {t: k for t in outcome.tasks if (k := self.index.task_key(t)) is not None}
        ended = [
            (key_of[task_id], task_id, state)
            for task_id, state in outcome.tasks.items()
            if task_id in key_of
            and state.status != "processing"
            and self.entries[key_of[task_id]].status is None
        ]

        def one(item: tuple[str, str, Any]) -> dict[str, Any]:
            key, task_id, state = item
            message = None
            if state.status == "failed":
                message = self._failure_message(task_id)
            return new_record(
                "terminal",
                key,
                task_id=task_id,
                status=state.status,
                error_code=state.error_code,
                error_message=message,
            )

        failures = sum(1 for _, _, state in ended if state.status == "failed")
        # One failure's GET is cheaper here than a hop to another thread.
        records = list(self.threads.mirror.map(one, ended)) if failures > 1 else [one(i) for i in ended]
        if outcome.status == "timeout" and self.now() >= self.clock.deadline:
            records += [
                new_record("timeout", key_of[t], task_id=t) for t in outcome.processing_ids if t in key_of
            ]
        self._write(records)

    def _failure_message(self, task_id: str) -> str | None:
        """Return the API's message for a failed task (events carry only its code: they stay small).

        A poller on this worker kept the answer; after the triggerer, one free GET asks for it. The
        message is worth that GET: it is what the manifest tells the user about a refused prompt.
        """
        task = self.answers.get(task_id)
        if task is None:
            try:
                task = self.client.get_task(task_id)
            except ImagenError:
                return None
        return task.error_message

    def _mirror(self, keys: Iterable[str]) -> None:
        """Fetch each task's URL (it never rode the event) and mirror its image, in parallel.

        A 429 on these free calls is no failure: the keys it hit are mirrored again once the API's
        ``Retry-After`` has passed, for as long as the try's deadline allows.
        """
        keys = list(keys)
        while keys:
            limited = self._mirror_once(keys)
            if not limited:
                return
            wait = max(limited.values())
            if self.now() + wait >= self.clock.deadline:
                log.warning(
                    "%d image(s) still rate limited at the deadline; a retry mirrors them", len(limited)
                )
                return
            log.info("The API rate-limits mirroring; %d image(s) again in %.1f s.", len(limited), wait)
            time.sleep(wait)
            keys = list(limited)

    def _mirror_once(self, keys: list[str]) -> dict[str, float]:
        """Mirror ``keys`` once; return the keys a 429 kept from it, with the seconds to wait for each."""
        limited: dict[str, float] = {}

        def one(key: str) -> dict[str, Any] | None:
            entry = self.entries[key]
            spec = self.specs[self.index.position[key]]
            name = image_file_name(spec.prompt_id, spec.size, spec.variation, entry.task_id)
            dest = self.images_root / name
            try:
                task = self.answers.pop(entry.task_id or "", None) or self.client.get_task(
                    entry.task_id or ""
                )
                if not task.image_url:
                    raise ImagenError(f"task {task.id} is completed but carries no image URL")
                image = mirror_image(self.client, task.image_url, dest)
            except RateLimitedError as exc:
                limited[key] = exc.retry_after or self.settings.poll_interval
                return None
            except ImageExpiredError as exc:
                return new_record("mirror_failed", key, task_id=entry.task_id, reason=str(exc), expired=True)
            except ImageRefusedError as exc:  # paid, but not an image we accept: final, reported
                reason = f"{type(exc).__name__}: {exc}"
                return new_record("mirror_failed", key, task_id=entry.task_id, reason=reason, final=True)
            except Exception as exc:  # any storage library's error: the row stays paid and retriable
                reason = f"{type(exc).__name__}: {exc}"
                return new_record("mirror_failed", key, task_id=entry.task_id, reason=reason, expired=False)
            mismatch = (
                pixel_size_mismatch(spec.size, image.width, image.height)
                if self.settings.check_pixel_size
                else None
            )
            return new_record(
                "mirrored", key, task_id=entry.task_id, image=image.to_dict(), mismatch=mismatch
            )

        records = [r for r in self.threads.mirror.map(one, keys) if r is not None]
        failed = [r for r in records if r["e"] == "mirror_failed"]
        for r in failed[:5]:
            log.warning("Could not mirror %s: %s", r["k"], r["reason"])
        self._write(records)
        return limited

    def _submit(self, specs: Sequence[ImageSpec], *, more_waiting: bool = False) -> StopReason | None:
        """Submit in journalled chunks, a few at a time, at the bounded rate.

        ``more_waiting``: rows beyond these wait for room, so an accepted round may grow the window.
        Returns a stop reason when the API ran out of credits (the other chunks then stop too).
        """
        size = self.settings.journal_chunk or (1 if self.journal.path.protocol in LOCAL_PROTOCOLS else 10)
        chunks = deque(specs[i : i + size] for i in range(0, len(specs), size))
        pace = RateLimiter(self.settings.max_submit_rate)
        dry = threading.Event()

        def one(part: Sequence[ImageSpec], outbox: list[dict[str, Any]]) -> SubmitReport:
            # One refused key or an unreachable API means every other POST would fail the same way.
            attempts = {s.key: len(self.entries[s.key].task_ids) for s in part if s.key in self.entries}
            try:
                report = submit_chunk(
                    self.client,
                    self.journal,
                    {s.key: s.request for s in part if s.request is not None},
                    digests={s.key: s.digest for s in part},
                    attempts=attempts,
                    pace=pace,
                    should_stop=lambda: dry.is_set() or self.stop.is_set(),
                    # An adapting window hears every 429, and waits out the API's period itself.
                    retry_rate_limited=not self.settings.adaptive_window,
                    outbox=outbox,
                )
            except BaseException:
                dry.set()  # fenced, or broken: the other chunks send nothing more
                raise
            if report.out_of_credits is not None or any(
                isinstance(e, (AuthenticationError, RateLimitedError)) for e in report.rejected.values()
            ):
                dry.set()  # a 429: the account is full for now, the rest of the round would hear it too
            return report

        def lane() -> list[SubmitReport]:
            # A lane sends chunk after chunk; each chunk's answers ride with the next one's intents (one
            # durable write per chunk), and the last answers are written when the lane runs dry.
            outbox: list[dict[str, Any]] = []
            done: list[SubmitReport] = []
            try:
                while True:
                    try:
                        part = chunks.popleft()
                    except IndexError:
                        return done
                    done.append(timed(part, outbox))
            finally:
                if outbox:
                    self.journal.append(outbox)

        timed = self.threads.submit.timed(one)
        lanes = self.threads.submit.width(len(chunks))
        futures = [self.threads.submit.submit(lane) for _ in range(lanes)]
        try:
            reports = [report for future in futures for report in future.result()]
        except BaseException:
            # An interrupt from Airflow (timeout, SIGTERM) lands here, in the main thread: stop every
            # chunk before its next POST; a POST already sent gets its answer journalled by its thread.
            dry.set()
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise
        for report in reports:
            self._fold(report.records)
        self._backoff = self._adapt(reports, more_waiting=more_waiting)
        if self.stop.is_set():
            raise StopRequestedError(
                "the task was asked to stop (a clear, mark-failed or a worker shutting down); every POST "
                "sent so far is journalled and nothing more was sent: a retry re-attaches to them"
            )
        if any(r.out_of_credits is not None for r in reports):
            log.error("The API says the account is out of credits; submitting stops.")
            return "insufficient_credits"
        refusals = [e for r in reports for e in r.rejected.values()]
        if any(isinstance(e, AuthenticationError) for e in refusals):
            log.error("The API refused the key; submitting stops.")
            return "authentication"
        if (
            refusals
            and all(isinstance(e, ImagenTransportError) for e in refusals)
            and not any(r.submitted for r in reports)
        ):
            log.error("The API could not be reached; submitting stops.")
            return "unreachable"
        return None

    def _write(self, records: list[dict[str, Any]]) -> None:
        if records:
            self.journal.append(records)
            self._fold(records)

    def _fold(self, records: Iterable[Mapping[str, Any]]) -> None:
        keys = []
        for rec in records:
            entry = self.entries.get(rec["k"])
            if entry is None:
                entry = self.entries[rec["k"]] = JournalEntry(rec["k"])
            entry.apply(rec)
            keys.append(rec["k"])
        self.index.touch(keys, self.entries)

    def _progress(self, plan: WindowPlan, *, force: bool = False) -> None:
        now = self.now()
        if self._logged_progress or (
            not force and now - self.clock.progress_at < self.settings.progress_interval
        ):
            return
        self._logged_progress = True
        self.clock.progress_at = now
        elapsed = max(now - self.clock.started_at, 1e-6)
        done_here = max(plan.done, 0)
        rate = done_here / elapsed
        left = plan.total - plan.done
        eta = f"{left / rate:,.0f} s" if rate > 0 and left else ("0 s" if not left else "unknown")
        budget = f" of budget {self.clock.budget:,}" if self.clock.budget is not None else ""
        paid_now = self.index.paid_since(self.clock.started_at)
        log.info(
            "Progress: %d/%d done, %d in flight (window %d), %d waiting, %d failed, %d moderated, "
            "%d unknown; credits %s%s ($%.2f; paid in this try %s, earlier %s); %.1f images/min; ETA %s",
            plan.done,
            plan.total,
            len(plan.in_flight),
            self.window,
            plan.waiting_count + len(plan.to_submit),
            plan.failed,
            plan.moderated,
            len(plan.unknown),
            f"{plan.committed:,}",
            budget,
            credits_to_usd(plan.committed),
            f"{paid_now:,}",
            f"{plan.committed - paid_now:,}",
            rate * 60,
            eta,
        )

    def _finish(self, plan: WindowPlan, stop: StopReason | None) -> Finish:
        self._progress(plan, force=True)
        finish = Finish(stopped=stop)
        if plan.in_flight:  # the deadline passed with tasks still rendering
            self._write([new_record("timeout", k, task_id=t) for k, t in plan.in_flight.items()])
            finish.stopped = finish.stopped or "deadline"
        for spec in self.index.waiting() if plan.waiting_count else ():
            if stop == "insufficient_credits":
                finish.overrides[spec.key] = (SKIPPED_BUDGET, "the API reported insufficient credits")
            elif stop in ("authentication", "unreachable"):
                finish.overrides[spec.key] = (NOT_SUBMITTED, f"not sent: submitting stopped ({stop})")
            elif stop == "deadline":
                finish.overrides[spec.key] = (NOT_SUBMITTED, "the run's deadline passed before its turn")
            else:
                finish.overrides[spec.key] = (
                    SKIPPED_BUDGET,
                    f"max_credits={self.clock.budget} would be exceeded ({CREDITS_PER_IMAGE} per image)",
                )
        for key in plan.rejected:
            reason = self.entries[key].rejected_reason or "refused by the API"
            # Keys never sent are not here: the plan puts them back with the rows still to send.
            if stop == "insufficient_credits" and self.entries[key].rejected_kind == "insufficient_credits":
                finish.overrides[key] = (SKIPPED_BUDGET, "the API reported insufficient credits")
            else:
                finish.overrides[key] = (REJECTED, reason)
                finish.error = finish.error or reason
        if stop in ("authentication", "unreachable"):
            finish.stopped = stop
        # Settled keys (a snapshot's finished rows) owe nothing here: reading them all would build 10^5
        # entries at the end of a long stream.
        items = (
            self.entries.unsettled_items()
            if isinstance(self.entries, JournalEntries)
            else self.entries.items()
        )
        for key, entry in items:
            i = self.index.position.get(key)
            if i is None or not entry.matches(self.specs[i].digest):
                continue
            if entry.expired:
                finish.overrides[key] = (EXPIRED, entry.mirror_error or "image URL expired")
            elif entry.status == "completed" and entry.mirrored is None and not entry.mirror_final:
                finish.unmirrored += 1
        return finish
