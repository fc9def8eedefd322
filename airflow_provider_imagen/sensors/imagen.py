"""Wait for an existing Imagen task (e.g. one an upstream task submitted) to finish."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout, AirflowSkipException

from airflow_provider_imagen.api.errors import TaskNotFoundError, task_failure
from airflow_provider_imagen.hooks.imagen import ImagenHook
from airflow_provider_imagen.polling import PollOutcome, PollSchedule
from airflow_provider_imagen.triggers.imagen import (
    DEFERRAL_SAFETY_MARGIN,
    ImagenTaskTrigger,
    resume_not_before,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class ImagenTaskSensor(BaseSensorOperator):
    """Wait until an Imagen task is ``completed``; fail without retry (or skip with ``soft_fail``) if not.

    It pokes once on the worker; if the task is still processing and ``deferrable`` is set, it hands the
    wait to :class:`ImagenTaskTrigger` with an absolute deadline of ``timeout`` seconds from now, so no
    worker slot is held. ``poke`` and ``reschedule`` modes work as for any sensor. The sensor returns
    ``{"task_id", "status"}`` to XCom: never the signed image URL.

    :param imagen_task_id: the task id to wait for (e.g. ``"{{ ti.xcom_pull('submit')['task_id'] }}"``).
        Templated.
    :param imagen_conn_id: the ``imagen`` connection. Templated.
    :param deferrable: wait in the triggerer. Default ``[operators] default_deferrable``.
    :param expected_render: seconds from now at which the trigger first polls.
    :param poll_interval: the trigger's first interval between polls once overdue.
    """

    template_fields: Sequence[str] = ("imagen_task_id", "imagen_conn_id")

    def __init__(
        self,
        *,
        imagen_task_id: str,
        imagen_conn_id: str = ImagenHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        expected_render: float = 2.0,
        poll_interval: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.imagen_task_id = imagen_task_id
        self.imagen_conn_id = imagen_conn_id
        self.deferrable = deferrable
        self.schedule = PollSchedule(expected_render=expected_render, poll_interval=poll_interval)

    def poke(self, context: Context) -> bool:
        task = ImagenHook(self.imagen_conn_id).get_conn().get_task(self.imagen_task_id)
        self.log.info("Task %s is %s.", task.id, task.status)
        if task.status == "failed":
            self._fail(task_failure(task.id, task.error_code, task.error_message))
        return task.status == "completed"

    def _fail(self, error: Exception) -> None:
        """Fail for good: a failed render never turns into a success, so retrying is pointless.

        ``AirflowFailException`` is also what ``soft_fail`` turns into a skip; the typed error
        (:class:`ContentModeratedError`, :class:`TaskFailedError`…) is chained as its cause.
        """
        raise AirflowFailException(str(error)) from error

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            super().execute(context)
            return self._result("completed")
        try:
            done = self.poke(context)
        except AirflowFailException as exc:
            if self.soft_fail or self.never_fail:  # as the base class does for its own pokes
                raise AirflowSkipException(f"Skipping: soft_fail is set and {exc}") from exc
            raise
        if done:
            return self._result("completed")
        self.defer(
            trigger=ImagenTaskTrigger(
                imagen_conn_id=self.imagen_conn_id,
                task_ids=[self.imagen_task_id],
                deadline=time.time() + float(self.timeout),
                not_before=resume_not_before(),
                **self.schedule.to_kwargs(),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)) + DEFERRAL_SAFETY_MARGIN,
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Turn the trigger's event into success, a typed failure, or a sensor timeout."""
        outcome = PollOutcome.from_event(event)
        state = outcome.tasks[self.imagen_task_id]
        if outcome.status == "timeout":
            raise AirflowSensorTimeout(
                f"task {self.imagen_task_id} still processing after {self.timeout} s (it may still finish)"
            )
        if outcome.status == "error":
            raise RuntimeError(f"polling task {self.imagen_task_id} failed: {outcome.message}")
        if state.status == "not_found":
            self._fail(
                TaskNotFoundError(f"task {self.imagen_task_id} is unknown to the API", status_code=404)
            )
        if state.status == "failed":
            self._fail(task_failure(self.imagen_task_id, state.error_code, None))
        return self._result(state.status)

    def _result(self, status: str) -> dict[str, Any]:
        return {"task_id": self.imagen_task_id, "status": status}
