"""Generate one image: validate, submit once on the worker, wait in the triggerer, mirror, return a dict.

Paid exactly once across retries: the submit goes through the journal (see
:mod:`airflow_provider_imagen.batch.journal`), so a retry re-attaches to the task an earlier try paid for.
The signed image URL is fetched on the worker right before the download and never reaches XCom, a log
line or a trigger event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from airflow.configuration import conf
from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_imagen.api.errors import (
    AmbiguousSubmitError,
    ImagenError,
    ImagenInputError,
    TaskNotFoundError,
    TaskTimeoutError,
    WrongImageSizeError,
    task_failure,
)
from airflow_provider_imagen.api.models import (
    CREDITS_PER_IMAGE,
    DEFAULT_SIZE,
    ImageRequest,
    Task,
    pixel_size_mismatch,
)
from airflow_provider_imagen.batch.base import StopRequestedError
from airflow_provider_imagen.batch.journal import Journal, JournalEntry, new_record, resolve_journal_root
from airflow_provider_imagen.batch.mirror import image_file_name, mirror_image
from airflow_provider_imagen.batch.preflight import probe_locations, require_one_image
from airflow_provider_imagen.batch.storage import as_path
from airflow_provider_imagen.batch.submit import submit_chunk
from airflow_provider_imagen.hooks.imagen import ImagenHook
from airflow_provider_imagen.operators._arguments import check_generate_arguments, check_generate_rendered
from airflow_provider_imagen.operators._tries import stop_event, try_owner
from airflow_provider_imagen.polling import PollOutcome, PollSchedule, poll_tasks
from airflow_provider_imagen.triggers.imagen import (
    DEFERRAL_SAFETY_MARGIN,
    ImagenTaskTrigger,
    resume_not_before,
)
from airflow_provider_imagen.ui.links import ImagenImageGalleryLink

if TYPE_CHECKING:
    from airflow.sdk import Context, TaskInstanceKey

    from airflow_provider_imagen.api.client import ImagenClient

#: The journal key of the one image this operator makes.
IMAGE_KEY: Final = "image"
#: XCom key holding the mirrored image's URI, read by the extra link.
IMAGE_URI_XCOM_KEY: Final = "imagen_image_uri"
#: Signed image URLs live this long after the task completes.
URL_LIFETIME: Final = 24 * 3600


class ImagenImageLink(BaseOperatorLink):
    """Link to where the image was mirrored (object-store consoles for ``s3://`` and ``gs://``)."""

    name = "Imagen image"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.providers.common.compat.sdk import XCom

        uri = XCom.get_value(key=IMAGE_URI_XCOM_KEY, ti_key=ti_key)
        return browsable_uri(uri) if uri else ""


def browsable_uri(uri: str) -> str:
    """Return a URL a browser can open for a storage URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("s3", "gs", "gcs"):
        return uri
    netloc, _, key = rest.partition("/")
    bucket = netloc.rpartition("@")[2]  # ObjectStoragePath puts the conn id there: s3://conn_id@bucket/…
    if scheme == "s3":
        return f"https://s3.console.aws.amazon.com/s3/object/{bucket}?prefix={key}"
    return f"https://storage.cloud.google.com/{bucket}/{key}"


class ImagenGenerateOperator(BaseOperator):
    """Generate one Imagen 4 image and mirror it to storage; paid once, even across retries.

    The submit happens on the worker, after the request has been validated and its intent journalled.
    If the image is not ready at the first look, the task defers to :class:`ImagenTaskTrigger` (no
    worker slot is held while the API renders) with an absolute deadline.

    :param prompt: what to draw, 1-4000 characters. Templated.
    :param size: aspect ratio: ``1:1``, ``4:3``, ``3:4``, ``16:9`` or ``9:16``. Templated.
    :param imagen_conn_id: the ``imagen`` connection. Templated.
    :param output_path: where to mirror the image: a ``.png`` file or a folder, on any
        ``ObjectStoragePath`` (``file://``, ``s3://``, ``gs://``…). Without it, only the task id and the
        URL's expiry are returned. Templated.
    :param deferrable: wait in the triggerer instead of on the worker. Default ``[operators]
        default_deferrable``.
    :param poll_interval: seconds between polls once the image is overdue (grows by ``poll_backoff``).
    :param expected_render: seconds after the submit at which the first poll is made.
    :param timeout: seconds to wait for the render before failing with :class:`TaskTimeoutError`;
        the task stays paid for and a retry re-attaches to it.
    :param journal_path: where the exactly-once journal lives; default ``[imagen] journal_root``, else a
        ``_journal`` folder beside ``output_path``, else under ``$AIRFLOW_HOME``. Must be storage that
        every worker sees. Templated.
    :param resubmit_unknown: pay again for a submit whose outcome an earlier try could not learn (a
        timeout or 5xx after sending). Off by default: that earlier POST may already have been paid.
    :param check_pixel_size: fail with :class:`WrongImageSizeError` (after mirroring: the image stays)
        when the image's pixel size is not Imagen 4's for ``size`` (within 2 % per side).
    """

    template_fields: Sequence[str] = ("prompt", "size", "imagen_conn_id", "output_path", "journal_path")
    operator_extra_links = (ImagenImageLink(), ImagenImageGalleryLink())
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        prompt: str,
        size: str = DEFAULT_SIZE,
        imagen_conn_id: str = ImagenHook.default_conn_name,
        output_path: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 2.0,
        expected_render: float = 10.0,
        poll_backoff: float = 1.5,
        timeout: float = 600.0,
        journal_path: str | None = None,
        resubmit_unknown: bool = False,
        check_pixel_size: bool = True,
        **kwargs: Any,
    ) -> None:
        # Types and ranges, at DAG parse time: templated arguments are checked again once rendered.
        check_generate_arguments(locals())
        super().__init__(**kwargs)
        self.check_pixel_size = check_pixel_size
        self.prompt = prompt
        self.size = size
        self.imagen_conn_id = imagen_conn_id
        self.output_path = output_path
        self.deferrable = deferrable
        self.schedule = PollSchedule(
            expected_render=expected_render, poll_interval=poll_interval, backoff=poll_backoff
        )
        if timeout <= 0:
            raise ValueError(f"timeout={timeout}: must be a positive number of seconds")
        self.timeout = timeout
        self.journal_path = journal_path
        self.resubmit_unknown = resubmit_unknown

    # -- Airflow entry points ----------------------------------------------------------------------

    def _do_render_template_fields(
        self, parent: Any, template_fields: Any, context: Context, jinja_env: Any, seen_oids: set[int]
    ) -> None:
        """Render like Airflow, then check the rendered paths (a mapped task renders through this method)."""
        if parent is self:
            self._imagen_templates = {name: getattr(self, name) for name in template_fields}
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
        if parent is self:
            self._check_rendered()

    def _check_rendered(self) -> None:
        try:
            check_generate_rendered(self, getattr(self, "_imagen_templates", {}))
        except ImagenInputError as exc:
            # A template that renders to a bad value renders to it again on retry: fail, no retries.
            raise AirflowFailException(f"invalid argument, nothing was submitted: {exc}") from exc

    def execute(self, context: Context) -> dict[str, Any]:
        self._check_rendered()
        try:
            request = ImageRequest(self.prompt, self.size)
        except ImagenInputError as exc:
            # Bad input does not get better on retry, and nothing has been paid: fail now, no retries.
            raise AirflowFailException(f"invalid input, nothing was submitted: {exc}") from exc
        # The extra link is resolved when the task defers or ends; give it a value to find until the
        # image is mirrored, so Airflow does not log a failed XCom lookup.
        context["ti"].xcom_push(key=IMAGE_URI_XCOM_KEY, value=None)
        journal = self._journal(context)
        entry = self._current(journal, request)
        client = self._client()
        if entry is None or entry.mirrored is None:
            # The free checks first: a wrong key or an unwritable folder leaves nothing behind.
            self._preflight(client, entry)
        # Claim, then read again: an older try still alive stops before its next POST, and whatever it
        # journalled before that is in this read (see batch.fence).
        journal.claim(try_owner(context), try_number=getattr(context["ti"], "try_number", None))
        entry = self._current(journal, request)
        if entry is not None and entry.mirrored is not None:
            self.log.info("Image already made and mirrored by an earlier try; nothing to pay.")
            return self._result(context, entry)
        task_id = self._submit_once(client, journal, request, entry)
        if stop_event(self).is_set():  # asked to stop while the POST was out: its answer is journalled
            raise StopRequestedError(f"the task was asked to stop; task {task_id} is journalled")
        task = client.get_task(task_id)
        if task.is_terminal:
            return self._finish(context, client, journal, task)
        submitted_at = journal.load()[IMAGE_KEY].submitted_at or time.time()
        deadline = submitted_at + self.timeout
        if self.deferrable:
            self.defer(
                trigger=ImagenTaskTrigger(
                    imagen_conn_id=self.imagen_conn_id,
                    task_ids=[task_id],
                    deadline=deadline,
                    submitted_at=[submitted_at],
                    not_before=resume_not_before(),
                    **self.schedule.to_kwargs(),
                ),
                method_name="execute_complete",
                kwargs={"deadline": deadline},
                timeout=timedelta(seconds=max(deadline - time.time(), 0)) + DEFERRAL_SAFETY_MARGIN,
            )
        outcome = poll_tasks(client, [task_id], deadline=deadline, schedule=self.schedule)
        return self._complete(context, client, journal, outcome, deadline)

    def on_kill(self) -> None:
        """Send nothing more: Airflow calls this on SIGTERM (a clear or mark-failed)."""
        stop_event(self).set()

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, deadline: float | None = None
    ) -> dict[str, Any]:
        """Resume after the trigger: validate its event, then fetch, mirror and return."""
        outcome = PollOutcome.from_event(event)
        return self._complete(context, self._client(), self._journal(context), outcome, deadline)

    # -- steps -------------------------------------------------------------------------------------

    def _current(self, journal: Journal, request: ImageRequest) -> JournalEntry | None:
        """Return the journal's entry for this request, or ``None`` when it holds none or another one."""
        entry = journal.load().get(IMAGE_KEY)
        if entry is not None and not entry.matches(request.digest()):
            self.log.info(
                "The request changed since an earlier try paid for task %s; sending the new one.",
                entry.task_id or "(unknown)",
            )
            return None
        return entry

    def _submit_once(
        self, client: ImagenClient, journal: Journal, request: ImageRequest, entry: JournalEntry | None
    ) -> str:
        if entry is not None and entry.unknown_submit and not self.resubmit_unknown:
            why = entry.ambiguous_reason or "the worker stopped mid-submit"
            raise AmbiguousSubmitError(why, earlier_try=True)
        if entry is not None and entry.task_id and not entry.unknown_submit:
            self.log.info(
                "Re-attaching to task %s submitted by an earlier try; no new charge.", entry.task_id
            )
            return entry.task_id
        self.log.info("Submitting 1 image (%d credits, $%.3f).", CREDITS_PER_IMAGE, CREDITS_PER_IMAGE / 1000)
        attempts = {IMAGE_KEY: len(entry.task_ids)} if entry else None
        report = submit_chunk(
            client, journal, {IMAGE_KEY: request}, digests={IMAGE_KEY: request.digest()}, attempts=attempts
        )
        if IMAGE_KEY in report.submitted:
            self.log.info("Submitted task %s.", report.submitted[IMAGE_KEY])
            return report.submitted[IMAGE_KEY]
        if IMAGE_KEY in report.ambiguous:
            raise AmbiguousSubmitError(report.ambiguous[IMAGE_KEY])
        raise report.rejected[IMAGE_KEY]

    def _complete(
        self,
        context: Context,
        client: ImagenClient,
        journal: Journal,
        outcome: PollOutcome,
        deadline: float | None,
    ) -> dict[str, Any]:
        (task_id,) = outcome.tasks
        if outcome.status == "timeout":
            journal.append([new_record("timeout", IMAGE_KEY, task_id=task_id)])
            raise TaskTimeoutError([task_id], deadline if deadline is not None else time.time())
        if outcome.status == "error":
            raise ImagenError(f"polling task {task_id} failed: {outcome.message}")
        if outcome.tasks[task_id].status == "not_found":
            raise TaskNotFoundError(
                f"task {task_id} is unknown to the API (another key, or no longer kept)", status_code=404
            )
        # The URL never rode the event: ask for it here, on the worker, right before downloading.
        return self._finish(context, client, journal, client.get_task(task_id))

    def _finish(self, context: Context, client: ImagenClient, journal: Journal, task: Task) -> dict[str, Any]:
        if task.status == "failed":
            journal.append(
                [
                    new_record(
                        "terminal",
                        IMAGE_KEY,
                        task_id=task.id,
                        status="failed",
                        error_code=task.error_code,
                        error_message=task.error_message,
                    )
                ]
            )
            raise task_failure(task.id, task.error_code, task.error_message)
        if not task.image_url:
            raise ImagenError(f"task {task.id} is completed but its answer carries no image URL")
        records = [new_record("terminal", IMAGE_KEY, task_id=task.id, status="completed")]
        mismatch = None
        if self.output_path:
            dest = self._destination(context, task.id)
            image = mirror_image(client, task.image_url, dest)
            self.log.info(
                "Mirrored %s (%s bytes, %sx%s).", image.uri, image.size_bytes, image.width, image.height
            )
            if self.check_pixel_size:
                mismatch = pixel_size_mismatch(self.size, image.width, image.height)
            records.append(
                new_record("mirrored", IMAGE_KEY, task_id=task.id, image=image.to_dict(), mismatch=mismatch)
            )
        journal.append(records)
        if mismatch:
            # Paid and kept (the journal and XCom name the file), but not what was asked for.
            raise WrongImageSizeError(f"task {task.id}: {mismatch}; the image is kept at {dest}")
        entry = journal.load()[IMAGE_KEY]
        return self._result(context, entry)

    def _result(self, context: Context, entry: JournalEntry) -> dict[str, Any]:
        image = entry.mirrored or {}
        if image.get("uri"):
            context["ti"].xcom_push(key=IMAGE_URI_XCOM_KEY, value=image["uri"])
        return {
            "task_id": entry.task_id,
            "status": entry.status,
            "image_uri": image.get("uri"),
            "sha256": image.get("sha256"),
            "width": image.get("width"),
            "height": image.get("height"),
            "bytes": image.get("size_bytes"),
            "credits": CREDITS_PER_IMAGE if entry.status == "completed" else 0,
            "url_expires_at": (entry.completed_at + URL_LIFETIME) if entry.completed_at else None,
        }

    # -- plumbing ----------------------------------------------------------------------------------

    def _client(self) -> ImagenClient:
        return ImagenHook(self.imagen_conn_id).get_conn()

    def _preflight(self, client: ImagenClient, entry: JournalEntry | None) -> None:
        """Free checks before the POST, when one will be sent: writable output and journal, a balance read.

        The balance read also catches a wrong key, base URL or host before anything is paid. A try that
        re-attaches to a task an earlier try paid for sends no POST and needs none of it.
        """
        if entry is not None:
            reattach = entry.task_id and not entry.unknown_submit
            if reattach or (entry.unknown_submit and not self.resubmit_unknown):
                return
        locations = {}
        if self.output_path:
            out = as_path(self.output_path)
            locations["output_path"] = out.parent if out.suffix.lower() == ".png" else out
        locations["journal_path"] = resolve_journal_root(self.journal_path, self.output_path)
        probe_locations(locations)
        from airflow_provider_imagen.batch.engine import patiently  # pyarrow: not at DAG parse

        balance = patiently(client.get_balance, deadline=time.time() + self.timeout, what="the balance read")
        require_one_image(balance, None, nothing_paid_yet=lambda: True)

    def _journal(self, context: Context) -> Journal:
        return Journal.for_task_instance(resolve_journal_root(self.journal_path, self.output_path), context)

    def _destination(self, context: Context, task_id: str) -> Any:
        out = as_path(self.output_path)  # type: ignore[arg-type]
        if out.suffix.lower() == ".png":
            return out  # the user's own name: a "latest image" they chose to overwrite
        ti = context["ti"]
        # The DAG, task, run and map index name the image for a reader; the reAPI task id makes the
        # name one no other run, try or task can take.
        name = f"{ti.dag_id}-{ti.task_id}-{ti.run_id}-{ti.map_index}"
        return out / image_file_name(name, self.size, 0, task_id)
