"""What a poll reports: per-id states and how it ended; the trigger event contract.

An outcome is small and JSON-safe: it rides a trigger event, which the triggerer logs. It carries
statuses and error codes only, never an image URL, and messages are cut free of URLs and secrets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from airflow_provider_imagen.api.models import TERMINAL_STATUSES

if TYPE_CHECKING:
    pass

OutcomeStatus = Literal["success", "timeout", "error"]
#: How a poll ends: the fire condition, the deadline, or too many consecutive failures.
OUTCOME_STATUSES: Final[frozenset[str]] = frozenset({"success", "timeout", "error"})
#: Status of an id whose task the API does not know (HTTP 404). Terminal: it is not coming back.
NOT_FOUND: Final = "not_found"
#: Status reported for every id that has not ended (whatever the API last said about it).
PROCESSING: Final = "processing"
#: Per-id statuses an outcome may carry.
TASK_STATUSES: Final[frozenset[str]] = frozenset({"completed", "failed", NOT_FOUND, PROCESSING})
#: Statuses after which an id is never polled again.
ENDED_STATUSES: Final[frozenset[str]] = TERMINAL_STATUSES | {NOT_FOUND}
_URL_RE: Final = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_MESSAGE_LIMIT: Final = 300


def safe_message(error: BaseException | str, *, secrets: Iterable[str] = ()) -> str:
    """Return a short one-line description of ``error`` with URLs and the given secrets cut out.

    Outcome messages travel in trigger events, which the triggerer logs: a signed URL or a key must never
    reach them, even from an exception text we did not write.
    """
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = _URL_RE.sub("<url>", " ".join(text.split()))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"


@dataclass(frozen=True)
class TaskPollState:
    """What the poller last knew about one task id: never more than a status and an error code."""

    #: ``completed``, ``failed``, ``not_found`` or ``processing`` (which covers unknown statuses).
    status: str
    #: The API's code for a failed task (80006 = moderated) or a 404; ``None`` otherwise.
    error_code: int | None = None

    @property
    def is_terminal(self) -> bool:
        """Return whether the id will never change again."""
        return self.status in ENDED_STATUSES


@dataclass(frozen=True)
class PollOutcome:
    """How a poll ended and where every id stood; small and JSON-safe through :meth:`to_event`."""

    #: ``success`` (fire condition met), ``timeout`` (deadline first) or ``error`` (failures in a row).
    status: OutcomeStatus
    #: Every polled id, in the order it was given.
    tasks: dict[str, TaskPollState] = field(default_factory=dict)
    #: Why it is a timeout or an error; free of URLs and keys.
    message: str | None = None
    #: GET requests the poller made (each may include the client's own retries).
    polls: int = 0
    #: Every id was polled on its grid up to this instant (the poller's last full round), so the next
    #: poller may skip the instants before it. Not part of events: a resumed worker sweeps instead.
    polled_until: float | None = None

    @property
    def completed_ids(self) -> list[str]:
        """Return the ids whose image is ready to fetch."""
        return [tid for tid, state in self.tasks.items() if state.status == "completed"]

    @property
    def failed(self) -> dict[str, int | None]:
        """Return ``{id: error code}`` of the tasks that ended ``failed`` (refunded by the API)."""
        return {tid: state.error_code for tid, state in self.tasks.items() if state.status == "failed"}

    @property
    def not_found_ids(self) -> list[str]:
        """Return the ids the API does not know (404)."""
        return [tid for tid, state in self.tasks.items() if state.status == NOT_FOUND]

    @property
    def processing_ids(self) -> list[str]:
        """Return the ids that had not ended when polling stopped."""
        return [tid for tid, state in self.tasks.items() if state.status == PROCESSING]

    @property
    def terminal_ids(self) -> list[str]:
        """Return the ids that ended, in any way."""
        return [tid for tid, state in self.tasks.items() if state.is_terminal]

    def counts(self) -> dict[str, int]:
        """Return how many ids are in each status (for log lines)."""
        tally = dict.fromkeys(("completed", "failed", NOT_FOUND, PROCESSING), 0)
        for state in self.tasks.values():
            tally[state.status] += 1
        return tally

    def to_event(self) -> dict[str, Any]:
        """Return the outcome as a trigger event payload: JSON scalars only, no URLs."""
        return {
            "status": self.status,
            "message": self.message,
            "polls": self.polls,
            "tasks": {
                tid: {"status": state.status, "error_code": state.error_code}
                for tid, state in self.tasks.items()
            },
        }

    @classmethod
    def from_event(cls, event: object) -> PollOutcome:
        """Validate an event coming back to a worker and rebuild the outcome.

        Raise :class:`ValueError` naming what is wrong: an event is data from another process (and maybe
        another version), and a mistaken "success" would skip paid images.
        """
        if not isinstance(event, Mapping):
            raise ValueError(f"Imagen poll event must be a dict, got {type(event).__name__}")
        status = event.get("status")
        if status is None:
            raise ValueError("Imagen poll event has no 'status'")
        if status not in OUTCOME_STATUSES:
            raise ValueError(
                f"Imagen poll event has unknown status {status!r}; expected one of "
                f"{', '.join(sorted(OUTCOME_STATUSES))}"
            )
        raw_tasks = event.get("tasks")
        if not isinstance(raw_tasks, Mapping):
            raise ValueError(f"Imagen poll event 'tasks' must be a dict, got {type(raw_tasks).__name__}")
        tasks: dict[str, TaskPollState] = {}
        for tid, raw in raw_tasks.items():
            if not isinstance(tid, str) or not tid:
                raise ValueError(f"Imagen poll event has a task id that is not a non-empty string: {tid!r}")
            if not isinstance(raw, Mapping):
                raise ValueError(f"Imagen poll event task {tid}: must be a dict, got {type(raw).__name__}")
            task_status = raw.get("status")
            if task_status not in TASK_STATUSES:
                raise ValueError(
                    f"Imagen poll event task {tid}: unknown status {task_status!r}; expected one of "
                    f"{', '.join(sorted(TASK_STATUSES))}"
                )
            code = raw.get("error_code")
            if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
                raise ValueError(f"Imagen poll event task {tid}: error_code {code!r} is not an integer")
            tasks[tid] = TaskPollState(task_status, code)
        message = event.get("message")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"Imagen poll event 'message' must be a string, got {type(message).__name__}")
        polls = event.get("polls", 0)
        if isinstance(polls, bool) or not isinstance(polls, int) or polls < 0:
            raise ValueError(f"Imagen poll event 'polls' must be a non-negative integer, got {polls!r}")
        return cls(status=status, tasks=tasks, message=message, polls=polls)
