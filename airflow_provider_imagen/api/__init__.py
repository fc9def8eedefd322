"""The reAPI image contract as a small client library. Never imports Airflow.

Airflow-facing code (hooks, operators, triggers) adapts these pieces; everything here also works in a
plain script or another orchestrator. One concern per module:

- ``models``: requests, tasks, sizes and prices; ``errors``: the exception hierarchy;
- ``settings``: :class:`ClientSettings`; ``urls``: base URLs and their redaction in errors and logs;
- ``flows``: every call written once (request, retry loop, error mapping), driven by both clients;
- ``retry``: when a failed call is tried again; ``error_mapping``: which exception a failure becomes;
- ``images``: checking an image body as it streams in;
- ``client``: :class:`ImagenClient` and :class:`AsyncImagenClient`, which only send and sleep;
- ``wire`` and ``aiohttp_sender``: the plain call/reply shapes and the triggerer's aiohttp sender.
"""

from __future__ import annotations

from airflow_provider_imagen.api.client import AsyncImagenClient, ImagenClient
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
from airflow_provider_imagen.api.images import DownloadedImage
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
from airflow_provider_imagen.api.settings import ClientSettings
from airflow_provider_imagen.api.urls import normalize_base_url, redact_url

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
