"""The one vocabulary of what became of a requested image: the manifest's statuses and what each costs.

Why a module of its own: the engine decides some statuses (``skipped_budget``, ``not_submitted``…), the
manifest writes them and the example DAGs read them; all three must speak the same words, and none of
them should need pyarrow to name one.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE

ManifestStatus = Literal[
    "completed",
    "failed",
    "moderated",
    "invalid",
    "unknown_submit",
    "timeout",
    "skipped_budget",
    "expired",
    "not_found",
    "download_failed",
    "not_submitted",
    "rejected",
    "wrong_size",
]
#: Every status a manifest row may have, in this order in counts.
STATUSES: Final[tuple[str, ...]] = get_args(ManifestStatus)

#: The image was rendered and mirrored to storage; ``image_uri`` points at it. Charged.
COMPLETED: Final = "completed"
#: The task ended ``failed`` for a reason other than moderation. Refunded by the API.
FAILED: Final = "failed"
#: The task ended ``failed`` with code 80006 (content policy). Refunded by the API.
MODERATED: Final = "moderated"
#: The row broke a rule of the contract or of the table; it was never sent. Free.
INVALID: Final = "invalid"
#: A POST was sent but its outcome is unknown (timeout, 5xx, dropped answer). Assumed charged; never
#: retried silently, because retrying could pay twice.
UNKNOWN_SUBMIT: Final = "unknown_submit"
#: The task was created (and charged) but had not finished when the deadline passed. It may still
#: finish; a retry of the Airflow task re-attaches to it.
TIMEOUT: Final = "timeout"
#: Not sent because the run's credit budget would have been exceeded. Free.
SKIPPED_BUDGET: Final = "skipped_budget"
#: The image URL expired (24 h) before we could mirror it: paid and lost. Recorded, never silently
#: regenerated, since regenerating pays again.
EXPIRED: Final = "expired"
#: The API no longer knows the task (404): nothing to collect, nothing we can prove was charged.
NOT_FOUND: Final = "not_found"
#: The task completed (charged) but mirroring failed after retries; a later try may still mirror it
#: while the URL lives.
DOWNLOAD_FAILED: Final = "download_failed"

#: Valid and affordable, but never sent: the run's deadline passed or it stopped (out of credits at the
#: API) before its turn came. Free; the next run or a retry sends it.
NOT_SUBMITTED: Final = "not_submitted"
#: The API refused the submit (401 wrong key, 400, or a 429 / refused connection that outlasted the
#: retries): provably nothing was created. Free; ``error_message`` has the API's answer. A retry of the
#: task sends it again.
REJECTED: Final = "rejected"

#: The task completed and the image was mirrored, but its pixel size is not what Imagen 4 makes for the
#: requested ratio; ``error_message`` has both sizes. Charged; kept at ``image_uri`` for a look, and
#: never counted as ``completed``.
WRONG_SIZE: Final = "wrong_size"

#: Statuses that cost :data:`CREDITS_PER_IMAGE`: a task was (or, for an ambiguous POST, may have been)
#: created and not refunded. Every other status costs 0: refunded by the API (failed, moderated), never
#: sent (invalid, skipped_budget), or unknown to the API (not_found).
CHARGED_STATUSES: Final[frozenset[str]] = frozenset(
    {COMPLETED, UNKNOWN_SUBMIT, TIMEOUT, EXPIRED, DOWNLOAD_FAILED, WRONG_SIZE}
)


def credits_for(status: str) -> int:
    """Return the credits a request with ``status`` cost: 46 if charged and not refunded, else 0."""
    check_status(status)
    return CREDITS_PER_IMAGE if status in CHARGED_STATUSES else 0


def check_status(status: object) -> None:
    """Raise ``ValueError`` unless ``status`` is one of :data:`STATUSES`."""
    if status not in STATUSES:
        raise ValueError(f"unknown manifest status {status!r}; expected one of {', '.join(STATUSES)}")
