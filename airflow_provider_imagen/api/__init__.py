"""The reAPI image contract as a small client library. Never imports Airflow.

Airflow-facing code (hooks, operators, triggers) adapts these pieces; everything here also works in a
plain script or another orchestrator.
"""

from __future__ import annotations

from airflow_provider_imagen.api.client import (
    AsyncImagenClient,
    ClientSettings,
    DownloadedImage,
    ImagenClient,
    normalize_base_url,
    redact_url,
)
from airflow_provider_imagen.api.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    ContentModeratedError,
    DownloadError,
    ImageExpiredError,
    ImagenAPIError,
    ImagenError,
    ImagenInputError,
    ImagenTransportError,
    ImageRefusedError,
    InsufficientCreditsError,
    InvalidRequestError,
    LocationNotWritableError,
    RateLimitedError,
    RequestValidationError,
    ServerError,
    TaskFailedError,
    TaskNotFoundError,
    TaskTimeoutError,
    WrongImageSizeError,
)
from airflow_provider_imagen.api.models import (
    CREDITS_PER_IMAGE,
    DEFAULT_SIZE,
    MAX_PROMPT_CHARS,
    MODEL,
    PIXEL_SIZES,
    SIZES,
    ImageRequest,
    Task,
)
from airflow_provider_imagen.api.retry import RetryPolicy

__all__ = [
    "CREDITS_PER_IMAGE",
    "DEFAULT_SIZE",
    "MAX_PROMPT_CHARS",
    "MODEL",
    "PIXEL_SIZES",
    "SIZES",
    "AmbiguousSubmitError",
    "AsyncImagenClient",
    "AuthenticationError",
    "ClientSettings",
    "ContentModeratedError",
    "DownloadError",
    "DownloadedImage",
    "ImageExpiredError",
    "ImageRefusedError",
    "ImageRequest",
    "ImagenAPIError",
    "ImagenClient",
    "ImagenError",
    "ImagenInputError",
    "ImagenTransportError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "LocationNotWritableError",
    "RateLimitedError",
    "RequestValidationError",
    "RetryPolicy",
    "ServerError",
    "Task",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "WrongImageSizeError",
    "normalize_base_url",
    "redact_url",
]
