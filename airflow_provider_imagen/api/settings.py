"""What a client is configured with: one frozen value, built by the hook from a connection or by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow_provider_imagen.api.errors import ImagenError
from airflow_provider_imagen.api.images import DEFAULT_MAX_IMAGE_BYTES
from airflow_provider_imagen.api.retry import RetryPolicy
from airflow_provider_imagen.api.urls import DEFAULT_BASE_URL, normalize_base_url, scheme_assumed


@dataclass(frozen=True)
class ClientSettings:
    """Everything a client needs; built by the hook from an Airflow connection, or by hand."""

    #: Bearer key. Excluded from ``repr`` so a logged settings object cannot leak it.
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    #: Seconds to wait for one HTTP answer.
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    #: The host as given had no scheme and ``https://`` was put in front (errors then say so).
    https_assumed: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.api_key or not self.api_key.strip():
            raise ImagenError("no API key: set the connection's password (API key) field")
        object.__setattr__(self, "https_assumed", scheme_assumed(self.base_url))
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
