"""Values of the reAPI image contract for Imagen 4: requests, tasks, sizes and price.

Invariants:
- an :class:`ImageRequest` that exists is valid: every rule is checked in ``__post_init__``, before any
  network call, and a violation names the field, the value and the rule;
- only ``completed`` and ``failed`` end a task; any other status, documented or not, means "not finished";
- a :class:`Task`'s ``repr`` never shows the signed image URL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from airflow_provider_imagen.api.errors import RequestValidationError

#: The only model this provider speaks to.
MODEL: Final = "imagen-4-0"

Size = Literal["1:1", "4:3", "3:4", "16:9", "9:16"]
#: The aspect ratios Imagen 4 accepts, in the contract's order.
SIZES: Final[tuple[str, ...]] = get_args(Size)
#: The API's default when ``size`` is omitted.
DEFAULT_SIZE: Final = "16:9"
#: Pixel size (width, height) Google documents for each ratio; reAPI does not document them.
PIXEL_SIZES: Final[dict[str, tuple[int, int]]] = {
    "1:1": (1024, 1024),
    "3:4": (896, 1280),
    "4:3": (1280, 896),
    "9:16": (768, 1408),
    "16:9": (1408, 768),
}
#: How far (a share of each side) a delivered image may differ from :data:`PIXEL_SIZES` and still count
#: as the size that was asked for. Imagen 4 delivers the documented sizes exactly; the margin only keeps
#: a re-encoded image that lost an edge row from being refused.
PIXEL_SIZE_TOLERANCE: Final = 0.02
#: Prompt length limit, in characters (code points), not bytes.
MAX_PROMPT_CHARS: Final = 4000
#: Credits charged per image at submit, any ratio; refunded when the task fails.
CREDITS_PER_IMAGE: Final = 46
#: Dollars per credit.
USD_PER_CREDIT: Final = 0.001

TaskStatus = Literal["processing", "completed", "failed"]
#: Statuses that end a task. Everything else, including statuses the docs never mention, is "not yet".
TERMINAL_STATUSES: Final[frozenset[str]] = frozenset({"completed", "failed"})


def request_digest(prompt: str, size: str, variation: int = 0, model: str = MODEL) -> str:
    r"""Return 32 hex digits of sha256 over exactly what one paid request asks for.

    Two requests with the same digest would get the same kind of image, so a journal may re-attach one
    to the other's task and an index may call one "already made" for the other. The fields are joined
    with ``\x1f``, a control character prompts may not hold, so different tuples never hash alike.
    """
    text = "\x1f".join((model, prompt, size, str(int(variation))))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def pixel_size_mismatch(
    size: str, width: int | None, height: int | None, *, tolerance: float = PIXEL_SIZE_TOLERANCE
) -> str | None:
    """Return why an image of ``width`` × ``height`` is not what ratio ``size`` yields, or ``None``.

    An image whose size could not be read, or a ratio without a documented size, is not judged.
    """
    expected = PIXEL_SIZES.get(size)
    if expected is None or width is None or height is None:
        return None
    want_w, want_h = expected
    if abs(width - want_w) <= tolerance * want_w and abs(height - want_h) <= tolerance * want_h:
        return None
    return (
        f"the image is {width}x{height} px; Imagen 4 makes {want_w}x{want_h} px for {size} "
        f"(within {tolerance:.0%} per side)"
    )


def estimate_credits(images: int) -> int:
    """Return what ``images`` submits cost up front (failed ones are refunded later)."""
    return images * CREDITS_PER_IMAGE


def credits_to_usd(credits: int) -> float:
    """Return the dollar value of ``credits``."""
    return round(credits * USD_PER_CREDIT, 3)


@dataclass(frozen=True)
class ImageRequest:
    """One paid text-to-image request. Constructing it validates it; nothing is sent."""

    prompt: str
    size: str = DEFAULT_SIZE
    #: Fixed at 1 by the API: variations are separate (separately paid) requests.
    n: int = 1
    model: str = MODEL

    def __post_init__(self) -> None:
        validate_prompt(self.prompt)
        validate_size(self.size)
        if self.n != 1 or isinstance(self.n, bool):
            raise RequestValidationError(
                "n", self.n, "must be 1 for imagen-4-0; send one request per variation"
            )
        if self.model != MODEL:
            raise RequestValidationError("model", self.model, f"must be {MODEL!r}")

    def to_json(self) -> dict[str, Any]:
        """Return the request body of ``POST /images/generations``."""
        return {"model": self.model, "prompt": self.prompt, "size": self.size, "n": self.n}

    def digest(self, variation: int = 0) -> str:
        """Return the :func:`request_digest` of this request as its ``variation``-th copy."""
        return request_digest(self.prompt, self.size, variation, self.model)


def validate_prompt(prompt: object) -> None:
    """Raise :class:`RequestValidationError` unless ``prompt`` is text the API accepts."""
    if not isinstance(prompt, str):
        raise RequestValidationError("prompt", prompt, f"must be a string, not {type(prompt).__name__}")
    if not prompt.strip():
        raise RequestValidationError("prompt", prompt, "must not be empty or only whitespace")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestValidationError(
            "prompt", prompt, f"is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed"
        )
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestValidationError(
            "prompt", prompt, f"is not valid UTF-8 text (character at position {exc.start})"
        ) from None
    if "\x00" in prompt:
        raise RequestValidationError("prompt", prompt, "must not contain NUL characters")


def validate_size(size: object) -> None:
    """Raise :class:`RequestValidationError` unless ``size`` is one of the five ratios."""
    if size not in SIZES:
        raise RequestValidationError("size", size, f"must be one of {', '.join(SIZES)}")


@dataclass(frozen=True)
class Task:
    """A task as the API reports it. Unknown fields are ignored; missing optional ones are ``None``."""

    id: str
    status: str
    model: str | None = None
    created_at: int | None = None
    #: Signed, valid 24 h: never log it, never put it in XCom or a trigger event.
    image_url: str | None = field(default=None, repr=False)
    error_code: int | None = None
    error_message: str | None = None

    @property
    def is_terminal(self) -> bool:
        """Return whether the task has ended (completed or failed)."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, body: Any) -> Task:
        """Parse a submit or poll answer; accept ``id`` or ``task_id``; tolerate null or absent parts."""
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object for a task, got {type(body).__name__}")
        task_id = body.get("id") or body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("the task answer carries no 'id' (nor 'task_id')")
        status = body.get("status")
        output = body.get("output")
        urls = (output.get("image_urls") if isinstance(output, dict) else None) or []
        error = body.get("error")
        if not isinstance(error, dict):
            error = {}
        code = error.get("code")
        created = body.get("created_at")
        return cls(
            id=task_id,
            status=status if isinstance(status, str) else "unknown",
            model=body.get("model"),
            created_at=int(created) if isinstance(created, (int, float)) else None,
            image_url=urls[0] if urls and isinstance(urls[0], str) else None,
            error_code=int(code) if isinstance(code, (int, str)) and str(code).isdigit() else None,
            error_message=error.get("message"),
        )
