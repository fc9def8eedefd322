"""Generate images for a whole prompt table in one task: thousands of prompts, paid once, one manifest.

One task instance per prompt (the stock approach) is capped at 1024 by ``max_map_length`` and costs
seconds of scheduling per prompt. This operator keeps a bounded window of tasks in flight
at the API, waits for them in the triggerer, and comes back to a worker only to mirror finished images
and refill the window. The work of each pass lives in :mod:`airflow_provider_imagen.batch.engine`; this
module adapts it to Airflow (deferral, XCom, Asset events, failure policy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from airflow.configuration import conf
from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_imagen.api.errors import (
    AuthenticationError,
    ImagenError,
    ImagenInputError,
    ImagenTransportError,
    InsufficientCreditsError,
)
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, DEFAULT_SIZE, credits_to_usd
from airflow_provider_imagen.batch.base import BatchSettings, Finish, RunClock, StopRequestedError
from airflow_provider_imagen.batch.journal import (
    Journal,
    JournalEntries,
    JournalEntry,
    resolve_journal_root,
)
from airflow_provider_imagen.batch.preflight import probe_locations, require_one_image
from airflow_provider_imagen.batch.status import NOT_SUBMITTED
from airflow_provider_imagen.batch.storage import as_path
from airflow_provider_imagen.hooks.imagen import ImagenHook
from airflow_provider_imagen.operators._arguments import (
    budget,
    check_batch_arguments,
    check_batch_rendered,
    is_template,
    without_records,
)
from airflow_provider_imagen.operators._tries import stop_event, try_owner
from airflow_provider_imagen.polling import PollOutcome, poll_tasks
from airflow_provider_imagen.triggers.imagen import (
    DEFERRAL_SAFETY_MARGIN,
    ImagenTaskTrigger,
    min_deferral_seconds,
    resume_not_before,
)
from airflow_provider_imagen.ui.links import ImagenGalleryLink

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_imagen.batch.engine import PassThreads
    from airflow_provider_imagen.batch.specs import ImageSpec
    from airflow_provider_imagen.batch.table import Table

OnInvalid = Literal["record", "fail"]


class ImagenBatchGenerateOperator(BaseOperator):
    """Generate one image per (row × size × variation) of a prompt table, mirror them, write a manifest.

    Money: every paid submit is journalled before it is sent, the budget is checked before every POST,
    and retries (of the whole task, after a crash, a triggerer restart or a clear) re-attach to the tasks
    an earlier try paid for. Results go to storage: XCom gets only ``{manifest_uri, counts, credits}``.

    :param prompts: the prompt table: a Parquet file or folder on any ``ObjectStoragePath`` (``file://``,
        ``s3://``…), or a list of records, or a DataFrame. Templated only when it is a path or URI string:
        records and DataFrames reach the API exactly as given (prompts may hold ``{{`` and ``{#``).
    :param output_path: folder for the images (``images/``) and the manifest (``manifests/``); absolute
        or a URI. Templated.
    :param imagen_conn_id: the ``imagen`` connection. Templated.
    :param id_column: column holding the unique prompt id.
    :param prompt_column: column holding the prompt text.
    :param size_column: column holding a ratio or a list of ratios per row (optional in the table).
    :param sizes: ratios for rows that give none (e.g. ``["1:1", "16:9", "9:16"]``).
    :param default_size: the ratio when neither the row nor ``sizes`` gives one.
    :param variations: images per prompt and size; each is its own paid request.
    :param on_invalid: ``"record"`` puts bad rows in the manifest as ``invalid`` and sends the rest;
        ``"fail"`` fails the task before anything is submitted if any row is bad.
    :param fail_when_all_invalid: with ``on_invalid="record"``, still fail (before anything is sent) when
        no row at all is valid; ``False`` writes a manifest of ``invalid`` rows and succeeds.
    :param max_credits: budget for the run in credits (46 per image, so at least 46); rows beyond it are
        ``skipped_budget``. ``None`` for no budget. Templated (a rendered string of digits is accepted).
    :param check_balance: cap the budget at the account balance (the balance is always read first: a
        free call that catches a wrong key or an unreachable API before any POST).
    :param max_in_flight: tasks rendering at the API at once, at most. The window starts at 100 (or this,
        if lower), doubles per round of submits the API accepts until its first 429, then shrinks by a
        tenth on a 429 and grows back as submits are accepted, the sooner the fewer places it holds:
        batches sharing an account find its capacity and share it evenly.
    :param refill_fraction: when a wait with rows still to send is deferred, come back to refill once
        this share of the window has ended (and the deferral has lasted ``min_deferral``).
    :param max_submit_rate: POSTs per second at most (``None``: as fast as the API answers; its 429s
        shrink the window either way).
    :param timeout: seconds for the whole try; tasks still rendering then are ``timeout`` in the
        manifest (a retry re-attaches to them), unsent rows ``not_submitted``.
    :param expected_render: seconds after its submit at which a task is first polled.
    :param poll_interval: first interval between polls of an overdue task (grows by 1.5×).
    :param resubmit_unknown: pay again for submits whose outcome is unknown (see the journal docs).
    :param fail_on_error_rate: fail the task (after writing the manifest) when more than this share of
        the valid requests failed; moderated requests are not counted here.
    :param fail_on_moderation_rate: the same for moderated requests.
    :param mirror_concurrency: parallel downloads.
    :param progress_interval: seconds between progress lines in the log.
    :param linger: with nothing left to send, wait on the worker instead of deferring when the next task
        is due to end within this many seconds (a triggerer round trip costs more). ``0`` always
        defers and frees the slot at every wait.
    :param refill_on_worker: while rows wait for room in the window: ``True`` stays on the worker and
        refills each place as it frees (fastest; holds a worker slot for the whole stream), ``False``
        defers between refills (the slot is free while tasks render), ``None`` decides from
        ``expected_render``: defer when renders last at least twice a deferral round trip
        (``min_deferral`` + 1.5 s), stream when they are shorter. Ignored when ``linger=0``.
    :param min_deferral: seconds each deferral lasts at least (``None``: ``[imagen]
        min_deferral_seconds``, else ``[workers] min_heartbeat_interval`` + 2 s). A resume before the
        scheduler has heard of the deferring process's exit is failed by it (a stale success).
    :param journal_path: where the exactly-once journal lives (default: beside the output). Templated.
    :param check_pixel_size: record an image whose pixel size is not Imagen 4's for its ratio (within
        2 % per side) as ``wrong_size`` instead of ``completed``.
    :param adaptive_window: shrink the window by a tenth when the API answers a submit 429 (an
        account-wide limit shared with other batches; once per ``Retry-After``) and grow it back as
        submits are accepted; ``False`` keeps ``max_in_flight`` and only waits out each 429.
    :param deferrable: wait in the triggerer between passes (no worker slot held). Default
        ``[operators] default_deferrable``.
    """

    template_fields: Sequence[str] = (
        "prompts",
        "output_path",
        "imagen_conn_id",
        "journal_path",
        "max_credits",
    )
    operator_extra_links = (ImagenGalleryLink(),)
    ui_color = "#d2e3fc"

    def __init__(
        self,
        *,
        prompts: str | list[dict[str, Any]] | Any,
        output_path: str,
        imagen_conn_id: str = ImagenHook.default_conn_name,
        id_column: str = "prompt_id",
        prompt_column: str = "prompt",
        size_column: str = "size",
        sizes: Sequence[str] | None = None,
        default_size: str = DEFAULT_SIZE,
        variations: int = 1,
        on_invalid: OnInvalid = "record",
        fail_when_all_invalid: bool = True,
        max_credits: int | str | None = None,
        check_balance: bool = False,
        max_in_flight: int = 1000,
        refill_fraction: float = 0.1,
        max_submit_rate: float | None = None,
        timeout: float = 6 * 3600.0,
        expected_render: float = 10.0,
        poll_interval: float = 2.0,
        resubmit_unknown: bool = False,
        fail_on_error_rate: float | None = None,
        fail_on_moderation_rate: float | None = None,
        mirror_concurrency: int = 8,
        progress_interval: float = 30.0,
        linger: float = 5.0,
        refill_on_worker: bool | None = None,
        min_deferral: float | None = None,
        journal_path: str | None = None,
        check_pixel_size: bool = True,
        adaptive_window: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        # Types and ranges, at DAG parse time: templated arguments are checked again once rendered.
        check_batch_arguments(locals())
        if "outlets" not in kwargs and isinstance(output_path, str) and not is_template(output_path):
            kwargs["outlets"] = [Asset(manifests_asset_uri(output_path))]
        super().__init__(**kwargs)
        self.prompts = prompts
        self.output_path = output_path
        self.imagen_conn_id = imagen_conn_id
        self.id_column = id_column
        self.prompt_column = prompt_column
        self.size_column = size_column
        self.sizes = list(sizes) if sizes is not None else None
        self.default_size = default_size
        self.variations = variations
        self.on_invalid = on_invalid
        self.fail_when_all_invalid = fail_when_all_invalid
        self.max_credits = max_credits
        self.check_balance = check_balance
        self.timeout = timeout
        self.fail_on_error_rate = fail_on_error_rate
        self.fail_on_moderation_rate = fail_on_moderation_rate
        self.journal_path = journal_path
        self.deferrable = deferrable
        self.min_deferral = min_deferral
        self.settings = BatchSettings(
            max_in_flight=max_in_flight,
            refill_fraction=refill_fraction,
            max_credits=None if is_template(max_credits) else budget(max_credits),  # set once rendered
            resubmit_unknown=resubmit_unknown,
            max_submit_rate=max_submit_rate,
            mirror_concurrency=mirror_concurrency,
            progress_interval=progress_interval,
            linger=linger,
            refill_on_worker=refill_on_worker,
            expected_render=expected_render,
            poll_interval=poll_interval,
            check_pixel_size=check_pixel_size,
            adaptive_window=adaptive_window,
        )
        self.schedule = self.settings.schedule

    # -- Airflow entry points ----------------------------------------------------------------------

    def _do_render_template_fields(
        self, parent: Any, template_fields: Any, context: Context, jinja_env: Any, seen_oids: set[int]
    ) -> None:
        """Render like Airflow, except ``prompts`` given as records (sent verbatim); then check the values.

        Overridden here rather than in ``render_template_fields`` because a mapped task renders through
        this method of its unmapped operator.
        """
        if parent is not self:
            return super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
        fields = without_records(self, template_fields)
        self._imagen_templates = {name: getattr(self, name) for name in fields}
        super()._do_render_template_fields(parent, fields, context, jinja_env, seen_oids)
        self._check_rendered()

    def _check_rendered(self) -> None:
        """Check the templated arguments (rendered, or as given when ``execute`` is called directly).

        Also takes the deferral hold of the deployment (see ``min_deferral``), read where the task runs.
        """
        settle = min_deferral_seconds() if self.min_deferral is None else self.min_deferral
        if settle != self.settings.min_deferral:
            self.settings = replace(self.settings, min_deferral=settle)
        try:
            credits = check_batch_rendered(self, getattr(self, "_imagen_templates", {}))
        except ImagenInputError as exc:
            # A template that renders to a bad value renders to it again on retry: fail, no retries.
            raise AirflowFailException(f"invalid argument, nothing was submitted: {exc}") from exc
        if credits != self.settings.max_credits:
            self.settings = replace(self.settings, max_credits=credits)

    def execute(self, context: Context) -> dict[str, Any]:
        self._check_rendered()
        journal = self._journal(context)
        table = self._table()
        specs = self._specs(table, journal, reuse=False)
        now = time.time()
        clock = RunClock(
            started_at=now,
            deadline=now + self.timeout,
            budget=self.settings.max_credits,
            resumed_at=now,  # the try starts here: its slot time counts from now
        )
        client = self._client()
        balance = self._preflight(context, specs, clock, client)
        # Claim the journal before reading it: an older try that is still alive (a zombie, or a hand-run
        # ``airflow tasks test``) stops before its next POST, and every intent it journalled before that
        # check is in the read below, so this try never sends the same row again.
        clock.epoch = journal.claim(
            try_owner(context), try_number=getattr(context["ti"], "try_number", None)
        ).epoch
        # Resumes read the specs back instead of expanding the table again (written once this try will
        # pay: a try that fails its checks leaves no journal folder).
        from airflow_provider_imagen.batch.spec_cache import CACHE_FOLDER, cached_specs

        # The rest of the try reads them from the cache as a resume does: a spec is built only for the
        # rows a pass uses, instead of one object per row held for the whole stream.
        specs = cached_specs(table, journal.path / CACHE_FOLDER, specs, **self._expansion())
        entries = journal.load()
        if self.check_balance and balance is not None:
            from airflow_provider_imagen.batch.engine import budget_with_balance

            clock.budget = budget_with_balance(clock.budget, balance=balance, entries=entries)
        # The clock of this try goes to the journal: deferral kwargs alone are not enough, since
        # ``dag.test()`` drops them when it runs the trigger in-line.
        journal.record_try(clock.to_kwargs())
        return self._run(context, journal, specs, clock, None, client=client, entries=entries)

    def execute_complete(
        self,
        context: Context,
        event: dict[str, Any] | None = None,
        *,
        started_at: float | None = None,
        deadline: float | None = None,
        progress_at: float = 0.0,
        budget: int | None = None,
        epoch: int | None = None,
        window: int | None = None,
        threshold: int | None = None,
        credit: int = 0,
        calm_until: float | None = None,
        period: float | None = None,
        paced_until: float | None = None,
        held: float = 0.0,
    ) -> dict[str, Any]:
        """Resume after the trigger: check this try still owns the journal, validate the event, go on.

        The keyword arguments are the try's clock as it deferred (:meth:`RunClock.to_kwargs`). The
        journal's copy is the one used: ``dag.test()`` resumes without them, and the two must agree.
        """
        del started_at, deadline, budget  # the journal's record of this try says the same
        outcome = PollOutcome.from_event(event)
        journal = self._journal(context)
        lease = journal.resume(try_owner(context), epoch)
        entries = journal.load()  # read once: the first pass starts from it too
        clocks = journal.tries
        if lease.epoch not in clocks:
            raise ImagenError("resumed, but the journal holds no record of this try; is journal_path shared?")
        # The window adapts between passes; where Airflow kept the kwargs it goes on from where it was.
        resumed = {
            "progress_at": progress_at,
            "epoch": lease.epoch,
            "window": window,
            "threshold": threshold,
            "credit": credit,
            "calm_until": calm_until,
            "period": period,
            "paced_until": paced_until,
            "held": held,
            "resumed_at": _process_started(clocks[lease.epoch]["started_at"]),
        }
        clock = RunClock(**{**clocks[lease.epoch], **resumed})
        return self._run(
            context,
            journal,
            self._specs(self._table(), journal, reuse=True),
            clock,
            outcome,
            client=self._client(),
            entries=entries,
        )

    def on_kill(self) -> None:
        """Stop sending: Airflow calls this on SIGTERM (a clear or mark-failed) and on ``execution_timeout``.

        The submitter threads send no POST after it; a POST already on the wire has its answer
        journalled, so a retry re-attaches to it instead of paying again.
        """
        stop_event(self).set()

    # -- the loop ----------------------------------------------------------------------------------

    def _run(
        self,
        context: Context,
        journal: Journal,
        specs: Sequence[ImageSpec],
        clock: RunClock,
        outcome: PollOutcome | None,
        *,
        client: Any,
        entries: MutableMapping[str, Any] | None = None,
        threads: PassThreads | None = None,
    ) -> dict[str, Any]:
        # pyarrow: not at DAG parse
        from airflow_provider_imagen.batch.engine import BatchPass, PassThreads, entries_for_next_pass

        if threads is None:
            with PassThreads(self.settings) as threads:  # kept across this process's passes
                return self._run(
                    context, journal, specs, clock, outcome, client=client, entries=entries, threads=threads
                )

        answers: dict[str, Any] = {}  # terminal answers seen on this worker, URLs included; never XCom
        index = None  # the plan kept across the passes of this process (see WindowIndex)
        sweep = outcome is not None  # resumed from the triggerer: look for what ended meanwhile
        while True:
            batch = BatchPass(
                client=client,
                journal=journal,
                specs=specs,
                images_root=as_path(self.output_path) / "images",
                settings=self.settings,
                clock=clock,
                answers=answers,
                entries=entries,
                index=index,
                stop=stop_event(self),
                threads=threads,
            )
            step = batch.run(outcome, sweep=sweep)
            # The next pass starts from what this one folded in (a resume on a worker reads afresh).
            entries = entries_for_next_pass(journal, batch.entries)
            index = batch.index  # used only beside the entries it was built from
            if isinstance(step, Finish):
                # What this process folded is the whole journal when no other writer's file is there;
                # otherwise the end reads it afresh.
                done = batch.entries
                current = isinstance(done, JournalEntries) and journal.holds_only(done)
                del entries, index, batch
                return self._finish(context, specs, journal, step, clock, done if current else None)
            if self.deferrable and step.linger is None:
                if clock.resumed_at is not None:  # this process's slot time ends with the deferral
                    clock.held += time.time() - clock.resumed_at
                self.defer(
                    trigger=ImagenTaskTrigger(
                        imagen_conn_id=self.imagen_conn_id,
                        task_ids=step.task_ids,
                        deadline=clock.deadline,
                        submitted_at=step.submitted_at,
                        fire_when_done=step.fire_when_done,
                        polled_until=step.polled_until,
                        fire_ahead=step.fire_ahead,
                        not_before=resume_not_before(self.settings.min_deferral),
                        **self.schedule.to_kwargs(),
                    ),
                    method_name="execute_complete",
                    kwargs=clock.to_kwargs(),
                    timeout=timedelta(seconds=max(clock.deadline - time.time(), 0)) + DEFERRAL_SAFETY_MARGIN,
                )
            # Not deferrable, or the next tasks end so soon that a triggerer round trip costs more.
            until = clock.deadline if step.linger is None else min(clock.deadline, time.time() + step.linger)
            outcome = poll_tasks(
                client,
                step.task_ids,
                deadline=until,
                schedule=self.schedule,
                submitted_at=dict(zip(step.task_ids, step.submitted_at, strict=True)),  # type: ignore[arg-type]
                fire_when_done=step.fire_when_done,
                polled_until=step.polled_until,
                answers=answers,
                executor=threads.poll,
            )
            if stop_event(self).is_set():
                raise StopRequestedError("the task was asked to stop while it waited on the worker")
            sweep = False

    def _finish(
        self,
        context: Context,
        specs: Sequence[ImageSpec],
        journal: Journal,
        finish: Finish,
        clock: RunClock,
        entries: MutableMapping[str, JournalEntry] | None = None,
    ) -> dict[str, Any]:
        from airflow_provider_imagen.batch.manifest import (
            RunIdentity,
            manifest_path,
            manifest_row,
            write_manifest_stream,
        )

        if entries is None:
            entries = journal.load()
        identity = RunIdentity.from_context(context)
        left_unsent = 0
        this_try = {"submitted": 0, "reattached": 0, "credits": 0}
        # One look at each entry, kept by nobody: a run of 10^5 rows never holds them all.
        look = entries.peek if isinstance(entries, JournalEntries) else entries.get

        def rows() -> Iterator[dict[str, Any]]:
            # Streamed: the writer holds one row group of dicts at a time, not the whole run's.
            nonlocal left_unsent
            for spec in specs:
                status, reason = finish.overrides.get(spec.key, (None, None))
                entry = look(spec.key)
                _count_this_try(this_try, spec, entry, clock.started_at)
                if (
                    status is None
                    and spec.valid
                    and entry is not None
                    and entry.matches(spec.digest)
                    and entry.task_id is None
                    and not entry.unknown_submit
                ):
                    # An older try (fenced off) journalled it "not sent" after this try's last pass.
                    status, reason = NOT_SUBMITTED, "not sent: an older try of this task stopped before it"
                    left_unsent += 1
                yield manifest_row(
                    spec, entry, identity=identity, override_status=status, override_reason=reason
                )

        written = write_manifest_stream(rows(), manifest_path(self.output_path, identity=identity))
        uri = written.uri
        counts = {k: v for k, v in written.counts.items() if v}
        credits = written.credits
        kept_rows = written.counts["total"] - written.written
        result = {"manifest_uri": uri, "counts": counts, "credits": credits, "this_try": this_try}
        self.log.info(
            "This try: %d request(s) sent, %d re-attached to tasks paid earlier; paid now %d credits ($%.2f)",
            this_try["submitted"],
            this_try["reattached"],
            this_try["credits"],
            credits_to_usd(this_try["credits"]),
        )
        self.log.info(
            "Manifest written to %s: %s; %d credits ($%.2f) for its images, whenever paid%s%s.",
            uri,
            ", ".join(f"{k} {v}" for k, v in counts.items()),
            credits,
            credits_to_usd(credits),
            f"; {kept_rows} row(s) kept from an earlier manifest of this run" if kept_rows else "",
            f"; stopped early: {finish.stopped}" if finish.stopped else "",
        )
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = result
        self._enforce_rates(counts)
        if finish.stopped == "authentication":
            raise AuthenticationError(
                f"the API refused the key ({finish.error}); nothing was paid for the "
                f"{counts.get('rejected', 0)} rejected request(s), listed in {uri}. Fix the connection "
                "and clear the task",
                status_code=401,
            )
        if finish.stopped == "unreachable":
            raise ImagenTransportError(
                f"the API could not be reached ({finish.error}); nothing was paid for the requests "
                f"listed as rejected or not_submitted in {uri}. A retry of the task sends them"
            )
        if left_unsent:
            raise ImagenError(
                f"{left_unsent} row(s) were left unsent by an older try of this task that stopped late "
                f"(not_submitted rows in {uri}); nothing was paid for them, and a retry sends them"
            )
        not_mirrored = finish.unmirrored
        if not_mirrored:
            raise ImagenError(
                f"{not_mirrored} paid image(s) could not be mirrored yet (download_failed rows in {uri}); "
                "a retry of this task mirrors them without paying again while their URLs live (24 h)"
            )
        if finish.stopped == "insufficient_credits":
            answer = api_answer(entries, InsufficientCreditsError)
            raise InsufficientCreditsError(
                f"the account ran out of credits ({answer}); the manifest at {uri} lists what was made and "
                "what was skipped. Top up and clear the task: a retry sends only what is missing",
                status_code=402,
            )
        return result

    def _enforce_rates(self, counts: dict[str, int]) -> None:
        valid = counts.get("total", 0) - counts.get("invalid", 0)
        if not valid:
            return
        failed = counts.get("failed", 0) + counts.get("not_found", 0) + counts.get("rejected", 0)
        for share, limit, what in (
            (failed / valid, self.fail_on_error_rate, "failed"),
            (counts.get("moderated", 0) / valid, self.fail_on_moderation_rate, "moderated"),
        ):
            if limit is not None and share > limit:
                raise AirflowFailException(
                    f"{share:.1%} of {valid} valid requests {what}, over the limit of {limit:.1%} "
                    "(the manifest was written)"
                )

    # -- plumbing ----------------------------------------------------------------------------------

    def _table(self) -> Table:
        """Return the prompt table, read with pyarrow (pandas only for a DataFrame given)."""
        from airflow_provider_imagen.batch.table import load_prompt_table

        try:
            return load_prompt_table(
                self.prompts,
                id_column=self.id_column,
                prompt_column=self.prompt_column,
                size_column=self.size_column,
            )
        except ImagenInputError as exc:
            raise AirflowFailException(f"invalid prompt table, nothing was submitted: {exc}") from exc

    def _expansion(self) -> dict[str, Any]:
        """Return the arguments that decide how the table expands into specs."""
        return {
            "id_column": self.id_column,
            "prompt_column": self.prompt_column,
            "size_column": self.size_column,
            "sizes": self.sizes,
            "default_size": self.default_size,
            "variations": self.variations,
        }

    def _specs(self, table: Table, journal: Journal, *, reuse: bool) -> Sequence[ImageSpec]:
        """Return the try's specs: expanded on its first pass, read back from the cache on a resume.

        A resume (a new process after each deferral) reads what the first pass cached beside the
        journal, keyed by the table's content and every expansion argument; a changed table or argument
        is another key, so it expands again (and caches that).
        """
        from airflow_provider_imagen.batch.spec_cache import CACHE_FOLDER, invalid_specs, load_specs
        from airflow_provider_imagen.batch.specs import (
            raise_if_invalid,
            raise_if_none_valid,
            summarize_invalid,
        )

        try:
            specs = load_specs(
                table, journal.path / CACHE_FOLDER, reuse=reuse, write=reuse, **self._expansion()
            )
            invalid = invalid_specs(specs)
            if self.on_invalid == "fail":
                raise_if_invalid(invalid)
            if self.fail_when_all_invalid and len(invalid) == len(specs):
                raise_if_none_valid(invalid)
        except ImagenInputError as exc:
            # Bad input does not improve on retry, and nothing was paid: fail now, without retries.
            raise AirflowFailException(f"invalid prompt table, nothing was submitted: {exc}") from exc
        if invalid:
            self.log.warning("%s", summarize_invalid(invalid))
        return specs

    def _preflight(
        self, context: Context, specs: Sequence[ImageSpec], clock: RunClock, client: Any
    ) -> int | None:
        """Free checks before the first POST: the output and journal are writable, the account can pay.

        Returns the balance (``None`` when nothing is to be sent).
        """
        journal = self._journal(context)
        root = resolve_journal_root(self.journal_path, self.output_path)
        probe_locations({"output_path": as_path(self.output_path), "journal_path": root})
        balance = self._log_estimate(specs, clock, client)
        if balance is not None:
            # A retry whose earlier try paid must collect what it paid for, however low the balance now.
            require_one_image(balance, clock.budget, nothing_paid_yet=lambda: not journal.load())
        return balance

    def _log_estimate(self, specs: Sequence[ImageSpec], clock: RunClock, client: Any) -> int | None:
        """Log what the run would cost and read the balance (``None`` when nothing is to be sent)."""
        valid = sum(1 for s in specs if s.valid)
        cost = valid * CREDITS_PER_IMAGE
        self.log.info(
            "Estimate: %d images requested, %d valid, %d invalid; %d × %d credits = %d credits ($%.2f)%s.",
            len(specs),
            valid,
            len(specs) - valid,
            valid,
            CREDITS_PER_IMAGE,
            cost,
            credits_to_usd(cost),
            f"; budget {clock.budget} credits" if clock.budget is not None else "",
        )
        if clock.budget is not None and clock.budget < cost:
            self.log.warning(
                "The budget covers %d of %d images; the rest will be skipped_budget.",
                clock.budget // CREDITS_PER_IMAGE,
                valid,
            )
        if not valid:
            return None
        from airflow_provider_imagen.batch.engine import patiently

        # A free read first: a wrong key or an unreachable API fails here, before any POST is sent.
        balance = patiently(client.get_balance, deadline=clock.deadline, what="the balance read")
        self.log.info("Balance: %d credits ($%.2f).", balance, credits_to_usd(balance))
        if self.check_balance and balance < cost:
            self.log.warning("The balance covers %d of %d images.", balance // CREDITS_PER_IMAGE, valid)
        return balance

    def _client(self) -> Any:
        return ImagenHook(self.imagen_conn_id).get_conn()

    def _journal(self, context: Context) -> Journal:
        return Journal.for_task_instance(resolve_journal_root(self.journal_path, self.output_path), context)


def _process_started(not_before: float) -> float:
    """Return when this resumed process started (its slot time counts from there), not before ``not_before``.

    A resume's process starts some way before ``execute_complete``: the DAG file is parsed first.
    """
    import psutil  # type: ignore[import-untyped]

    try:
        return max(psutil.Process().create_time(), not_before)
    except psutil.Error:
        return max(time.time(), not_before)


def _count_this_try(
    counts: dict[str, int], spec: ImageSpec, entry: JournalEntry | None, since: float
) -> None:
    """Add what this try did for ``spec`` to ``counts``, apart from what earlier tries paid for."""
    if entry is None or not spec.valid:
        return
    counts["credits"] += entry.charged_since(since) * CREDITS_PER_IMAGE
    counts["submitted"] += entry.sent_since(since)
    if entry.task_id and (entry.submitted_at or 0) < since and entry.matches(spec.digest):
        counts["reattached"] += 1


def api_answer(entries: Mapping[str, Any], error: type[Exception]) -> str:
    """Return the API's own words for the first request it refused with ``error`` (code included)."""
    prefix = f"{error.__name__}: "
    for entry in entries.values():
        reason = getattr(entry, "rejected_reason", None) or ""
        if reason.startswith(prefix):
            return f"the API answered {reason.removeprefix(prefix)}"
    return "the API answered 402"


def manifests_asset_uri(output_path: str) -> str:
    """Return the Asset URI of an output folder's manifests (``file://`` for plain paths)."""
    uri = str(output_path).rstrip("/")
    if "://" not in uri:
        uri = f"file://{uri}"
    return f"{uri}/manifests"
