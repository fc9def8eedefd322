"""One exception hierarchy for everything that can go wrong between us and reAPI.

Errors are split by *when* they happen, because that decides what a retry costs::

    ImagenError
    ├── ImagenInputError (ValueError)      before anything is sent: free, fix the input
    │   └── RequestValidationError           one field of one request breaks one rule
    ├── ImagenAPIError                     the API answered with an error envelope
    │   ├── AuthenticationError              401, codes 10001-10004; nothing created
    │   ├── InvalidRequestError              400; nothing created
    │   ├── InsufficientCreditsError         402; nothing created
    │   ├── TaskNotFoundError                404; unknown id or another key's task
    │   ├── RateLimitedError                 429, with ``retry_after``; nothing created
    │   └── ServerError                      5xx on a call that is safe to repeat
    ├── ImagenTransportError               the network failed on a call that is safe to repeat
    ├── AmbiguousSubmitError               a submit MAY have created a paid task; never retried silently
    ├── TaskFailedError                    the task ended ``failed`` (refunded by the API)
    │   └── ContentModeratedError            failed with code 80006 (refunded by the API)
    ├── TaskTimeoutError                   our deadline passed while the task was still processing
    ├── WrongImageSizeError                kept, but not the pixel size Imagen 4 makes for the ratio
    ├── LocationNotWritableError           the output or journal location cannot be written (before paying)
    └── DownloadError                      the finished image could not be fetched
        ├── ImageExpiredError                the signed URL is past its 24 h life
        └── ImageRefusedError                the answer is not an acceptable image (type, size)

No message or ``repr`` here ever carries the API key or a signed image URL: errors keep the
method and the API *path* only, and download errors keep a redacted URL.
"""

from __future__ import annotations

#: The documented moderation code of a failed task.
MODERATION_CODE = 80006


class ImagenError(Exception):
    """Base of every error this provider raises about Imagen."""


class ImagenInputError(ImagenError, ValueError):
    """The input is wrong; found before any request, so nothing was paid. Fix it and run again."""


class RequestValidationError(ImagenInputError):
    """One field of a request breaks one rule of the contract."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"{field}={shorten(value)}: {rule}")


class ImagenAPIError(ImagenError):
    """The API answered with an error envelope ``{"error": {"code", "message", "request_id"}}``.

    Which subclass is raised follows the HTTP status, since most codes are undocumented; the server's
    own code and message are kept as they came.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: int | None = None,
        request_id: str | None = None,
        method: str = "",
        path: str = "",
        url: str = "",
    ) -> None:
        self.status_code = status_code
        self.code = code
        self.api_message = message
        self.request_id = request_id
        self.method = method
        self.path = path
        self.url = url
        ident = f" (request_id {request_id})" if request_id else ""
        if not method:
            # Raised by the provider itself to sum up a run, not an HTTP answer: no status to show.
            super().__init__(f"{message}{ident}")
            return
        # The full URL only when asked for: a wrong base URL is invisible in the API path alone.
        answer = f"HTTP {status_code}" + (f", code {code}" if code is not None else "")
        super().__init__(f"{method} {url or path}: {answer}: {message}{ident}")


class AuthenticationError(ImagenAPIError):
    """401: the API key is missing, malformed, invalid or revoked. Nothing was created or charged."""


class InvalidRequestError(ImagenAPIError):
    """400: the API rejected the request. Nothing was created or charged."""


class InsufficientCreditsError(ImagenAPIError):
    """402: the account has too few credits. Nothing was created or charged; top up and retry."""


class TaskNotFoundError(ImagenAPIError):
    """404: no such task for this key (wrong id, or a task created with another key)."""


class RateLimitedError(ImagenAPIError):
    """429: per-user rate limit. Nothing was created; safe to retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class ServerError(ImagenAPIError):
    """5xx on a call that is safe to repeat (poll, balance, download), after the retries ran out."""


class ImagenTransportError(ImagenError):
    """The network failed (connect, timeout, dropped connection) after the retries ran out."""


class AmbiguousSubmitError(ImagenError):
    """A submit may have created a paid task, but we cannot know its id.

    Raised after a timeout once the request was sent, a 5xx, or a connection dropped mid-answer.
    Retrying would risk paying twice, so the client never does; the journal records the intent as
    ``unknown_submit`` and a resubmit needs the caller's explicit consent.
    """

    def __init__(
        self,
        reason: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        earlier_try: bool = False,
    ) -> None:
        self.reason = reason
        self.status_code = status_code
        self.request_id = request_id
        self.earlier_try = earlier_try
        if earlier_try:
            # ``reason`` is what the earlier try learned; wrapping that try's whole message again would
            # nest "submit outcome unknown (…)" once per retry.
            super().__init__(
                f"submit outcome unknown: an earlier try sent this request but never learned its task id "
                f"({reason}); the API may have created and charged it. Not sent again, to avoid paying "
                "twice: set resubmit_unknown=True to pay for a new one"
            )
            return
        super().__init__(
            f"submit outcome unknown ({reason}): the API may have created and charged a task whose id "
            "we never received; not retried, to avoid paying twice"
        )


class TaskFailedError(ImagenError):
    """The task ended ``failed``. The API refunds its credits automatically."""

    def __init__(self, task_id: str, code: int | None, message: str | None) -> None:
        self.task_id = task_id
        self.code = code
        self.api_message = message
        super().__init__(f"task {task_id} failed with code {code}: {message} (credits refunded by the API)")


class ContentModeratedError(TaskFailedError):
    """The task failed on the content policy (code 80006). Refunded; rephrase the prompt."""


class TaskTimeoutError(ImagenError):
    """Our deadline passed while the task was still processing. It may still finish and be paid."""

    def __init__(self, task_ids: list[str], deadline: float) -> None:
        self.task_ids = task_ids
        self.deadline = deadline
        shown = ", ".join(task_ids[:5]) + (f" and {len(task_ids) - 5} more" if len(task_ids) > 5 else "")
        super().__init__(
            f"deadline (epoch {deadline:.0f}) passed with {len(task_ids)} task(s) still processing: {shown}. "
            "They were paid at submit and may still complete; a retry of this task re-attaches to them."
        )


class WrongImageSizeError(ImagenError):
    """The image arrived and was kept, but its pixel size is not Imagen 4's for the requested ratio.

    Paid. A retry re-attaches to the same task and gets the same image: it pays nothing and changes
    nothing.
    """


class LocationNotWritableError(ImagenError):
    """A location the run must write to (output, journal) cannot be written; found before any POST."""


class DownloadError(ImagenError):
    """The finished image could not be downloaded or is not an acceptable image."""


class ImageExpiredError(DownloadError):
    """The signed image URL is past its life (24 h): the image is gone; regenerating would pay again."""


class ImageRefusedError(DownloadError):
    """The URL answered, but not with an acceptable image (not ``image/*``, over the size cap, empty).

    Asking again gives the same answer, so it is not retried.
    """


def task_failure(task_id: str, code: int | None, message: str | None) -> TaskFailedError:
    """Return the typed error for a task that ended ``failed``."""
    cls = ContentModeratedError if code == MODERATION_CODE else TaskFailedError
    return cls(task_id, code, message)


def shorten(value: object, limit: int = 60) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, so one bad 4 KB prompt does not flood a log."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 12]}…{text[-8:]} ({len(value) if hasattr(value, '__len__') else '?'} long)"
