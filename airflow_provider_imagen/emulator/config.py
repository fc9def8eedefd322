"""Behaviour knobs of the reAPI emulator and the fixed facts of the API it imitates.

Everything a test, a demo or a user's CI may want to tune (keys, credits, latency, faults, rate limits) lives
in one validated dataclass, so the server, the CLI and ``POST /_emulator/config`` all share one definition and
one set of checks. The constants are the reAPI contract's facts (model name, sizes, price), kept here so the
other emulator modules never hard-code them twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_API_KEY = "rk_emulator_key"
"""The API key the emulator accepts unless told otherwise. Deliberately not shaped like a live key."""

MODEL = "imagen-4-0"
CREDITS_PER_IMAGE = 46
MAX_PROMPT_CHARS = 4000
DEFAULT_SIZE = "16:9"
SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "3:4": (896, 1280),
    "4:3": (1280, 896),
    "9:16": (768, 1408),
    "16:9": (1408, 768),
}
"""Imagen 4's documented pixel size (width, height) for each aspect ratio reAPI accepts."""

MIN_LATENCY = 0.05

MARKER_MODERATE = "[[moderate]]"
MARKER_FAIL = "[[fail]]"
MARKER_AMBIGUOUS = "[[ambiguous]]"
MARKER_SLOW = "[[slow]]"
MARKER_HTML = "[[html]]"
MARKER_LATE = "[[late]]"
MARKER_WRONG_SIZE = "[[wrong_size]]"
#: How images are made: each prompt drawn on its image, or one stock image per ratio drawn once.
IMAGE_MODES = ("prompt", "stock")

_RATE_FIELDS = ("moderation_rate", "failure_rate", "ambiguous_submit_rate", "error_rate_5xx")
_NON_NEGATIVE_FIELDS = (
    "latency_mean",
    "latency_jitter",
    "response_delay",
    "submit_answer_delay",
    "late_submit_delay",
    "image_ttl",
)
_KEY_TUPLE_FIELDS = ("api_keys", "revoked_keys", "moderated_words")


def _as_str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of strings")
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name} must be a list of strings")
    return items


def _as_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulated reAPI behaves. Immutable: change it with :meth:`updated` or ``configure``.

    Latency of a task is uniform in ``latency_mean ± latency_jitter`` (never below 0.05 s), multiplied by
    ``slow_factor`` for prompts containing ``[[slow]]``. Rates are probabilities in 0..1 drawn per task
    (moderation, failure, ambiguous submit) or per ``/api/v1`` request (``error_rate_5xx``).
    ``rate_limit_rps`` is a per-key token bucket over all ``/api/v1`` requests, with a burst of
    ``rate_limit_burst`` (default: ``max(1, rate_limit_rps)``); ``None`` disables it.
    ``max_concurrent_renders`` caps the tasks one key may have rendering at once, as an account-wide
    limit: a submit beyond it answers 429 (code 50001, ``Retry-After`` until the key's next task ends)
    and is not charged; ``None`` disables it. ``image_mode="stock"`` serves one image per ratio (drawn
    once, at Imagen 4's size) instead of drawing each prompt, so a benchmark of 10^5 images measures the
    client, not the drawing.
    ``submit_answer_delay`` holds back the answer of every submit after its task was created and charged
    (``late_submit_delay`` for prompts containing ``[[late]]``): a client that gives up meanwhile has paid
    for a task whose id it never learns.
    """

    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    revoked_keys: tuple[str, ...] = ()
    starting_balance: int = 1_000_000
    latency_mean: float = 3.0
    latency_jitter: float = 1.0
    slow_factor: float = 10.0
    seed: int | None = None
    image_ttl: float = 86400.0
    image_scale: float = 1.0
    moderation_rate: float = 0.0
    failure_rate: float = 0.0
    ambiguous_submit_rate: float = 0.0
    error_rate_5xx: float = 0.0
    response_delay: float = 0.0
    submit_answer_delay: float = 0.0
    late_submit_delay: float = 20.0
    rate_limit_rps: float | None = None
    rate_limit_burst: float | None = None
    max_concurrent_renders: int | None = None
    image_mode: str = "prompt"
    moderated_words: tuple[str, ...] = field(default=(MARKER_MODERATE,))

    def __post_init__(self) -> None:
        """Coerce JSON-ish values (lists, ints) to the declared types and reject nonsense early."""
        for name in _KEY_TUPLE_FIELDS:
            object.__setattr__(self, name, _as_str_tuple(name, getattr(self, name)))
        if not self.api_keys:
            raise ValueError("api_keys must name at least one key")
        if any(not key or any(ch.isspace() for ch in key) for key in self.api_keys + self.revoked_keys):
            raise ValueError("API keys must be non-empty and contain no whitespace")
        if any(not word for word in self.moderated_words):
            raise ValueError("moderated_words must not contain empty strings")
        balance = self.starting_balance
        if isinstance(balance, bool) or not isinstance(balance, int) or balance < 0:
            raise ValueError(f"starting_balance must be a non-negative integer, got {balance!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")
        for name in _NON_NEGATIVE_FIELDS:
            value = _as_number(name, getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            object.__setattr__(self, name, value)
        for name in _RATE_FIELDS:
            value = _as_number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")
            object.__setattr__(self, name, value)
        for name in ("image_scale", "slow_factor"):
            value = _as_number(name, getattr(self, name))
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            object.__setattr__(self, name, value)
        if self.image_scale > 4:
            raise ValueError(f"image_scale must be <= 4, got {self.image_scale}")
        for name in ("rate_limit_rps", "rate_limit_burst"):
            raw = getattr(self, name)
            if raw is None:
                continue
            value = _as_number(name, raw)
            if value <= 0:
                raise ValueError(f"{name} must be > 0 or null, got {value}")
            object.__setattr__(self, name, value)
        cap = self.max_concurrent_renders
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_concurrent_renders must be a positive integer or null, got {cap!r}")
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {', '.join(IMAGE_MODES)}, got {self.image_mode!r}")

    @classmethod
    def fast(cls, **overrides: Any) -> EmulatorConfig:
        """Return a config for quick tests: tasks finish in 0.2 ± 0.1 s.

        Images keep Imagen 4's pixel sizes (~15 ms each to draw): clients check them, as they should.
        """
        settings: dict[str, Any] = {"latency_mean": 0.2, "latency_jitter": 0.1}
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every knob, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def updated(self, fields: Mapping[str, Any] | None = None, /, **more: Any) -> EmulatorConfig:
        """Return a copy with some fields changed; unknown field names raise ``ValueError``."""
        changes = dict(fields or {})
        changes.update(more)
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready data (tuples become lists)."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @property
    def burst(self) -> float:
        """Capacity of the per-key token bucket (meaningful only when ``rate_limit_rps`` is set)."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1.0, self.rate_limit_rps or 1.0)
