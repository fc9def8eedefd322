"""Airflow connection ``imagen`` → the contract clients of :mod:`airflow_provider_imagen.api`.

The hook only adapts: it reads the connection (sync on workers, ``aget_connection`` in the triggerer
so the event loop never blocks), registers the key with Airflow's secrets masker, and hands back a
client. All HTTP behaviour, retries included, lives in the client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from airflow_provider_imagen.api.client import AsyncImagenClient, ClientSettings, ImagenClient
from airflow_provider_imagen.api.errors import ImagenError
from airflow_provider_imagen.api.retry import RetryPolicy

if TYPE_CHECKING:
    from airflow.sdk import Connection

log = logging.getLogger(__name__)


async def _amask(secret: str) -> None:
    """Mask from the event loop: the sync ``mask_secret`` talks to the supervisor with a blocking send."""
    from airflow.sdk import log

    amask = getattr(log, "amask_secret", None)
    if amask is not None:
        await amask(secret)
    else:  # Airflow releases without it: keep the blocking round trip off the event loop
        await asyncio.to_thread(mask_secret, secret)


def settings_from_connection(conn: Connection, *, retry: RetryPolicy | None = None) -> ClientSettings:
    """Build client settings from an ``imagen`` connection; the caller masks ``api_key``."""
    api_key = (conn.password or "").strip()
    if not api_key:
        raise ImagenError(
            f"connection {conn.conn_id!r} has no API key: put the reAPI key in its password "
            "(API key) field, e.g. AIRFLOW_CONN_IMAGEN_DEFAULT="
            '\'{"conn_type": "imagen", "password": "…"}\''
        )
    extra: dict[str, Any] = conn.extra_dejson or {}
    policy = retry or RetryPolicy()
    if extra.get("max_retries") is not None:
        policy = RetryPolicy(
            max_attempts=int(extra["max_retries"]) + 1,
            base_delay=policy.base_delay,
            max_delay=policy.max_delay,
            max_retry_after=policy.max_retry_after,
        )
    host = conn.host or ""
    if host and conn.port and "://" not in host:
        host = f"{host}:{conn.port}"
    settings = ClientSettings(
        api_key=api_key,
        base_url=host,
        timeout=float(extra.get("timeout") or 30.0),
        retry=policy,
    )
    if settings.https_assumed:
        # Said once here, and again in any connection error: a plain-HTTP server answers TLS with
        # "WRONG_VERSION_NUMBER", which names neither the scheme nor the connection.
        log.info("Connection %r: host %r has no scheme; using %s", conn.conn_id, host, settings.base_url)
    return settings


class ImagenHook(BaseHook):
    """Talk to Imagen 4 on reAPI through an ``imagen`` connection.

    The connection's *Base URL* (host) defaults to ``https://reapi.ai``; its *API key* (password) is
    required. Extras: ``timeout`` (seconds per HTTP answer), ``max_retries`` (retries of safe calls).

    :param imagen_conn_id: the ``imagen`` connection to use.
    :param retry: a retry policy to use instead of the default (the connection's ``max_retries`` still
        wins for the attempt count).
    """

    conn_name_attr = "imagen_conn_id"
    default_conn_name = "imagen_default"
    conn_type = "imagen"
    hook_name = "Imagen (reAPI)"

    def __init__(self, imagen_conn_id: str = default_conn_name, *, retry: RetryPolicy | None = None) -> None:
        super().__init__()
        self.imagen_conn_id = imagen_conn_id
        self.retry = retry
        self._client: ImagenClient | None = None

    def __repr__(self) -> str:
        return f"ImagenHook(imagen_conn_id={self.imagen_conn_id!r})"

    def get_conn(self) -> ImagenClient:
        """Return the blocking client (built once per hook) for use on a worker."""
        if self._client is None:
            conn = self.get_connection(self.imagen_conn_id)
            settings = settings_from_connection(conn, retry=self.retry)
            mask_secret(settings.api_key)
            self._client = ImagenClient(settings)
        return self._client

    async def aget_conn(self, *, max_connections: int = 100) -> AsyncImagenClient:
        """Return a new async client for the triggerer; the caller closes it (``async with``)."""
        conn = await self.aget_connection(self.imagen_conn_id)
        settings = settings_from_connection(conn, retry=self.retry)
        await _amask(settings.api_key)
        # Sends through aiohttp: a trigger polling thousands of renders pays the client's CPU on every poll.
        return AsyncImagenClient(settings, max_connections=max_connections)

    def get_balance(self) -> int:
        """Return the account's credits."""
        return self.get_conn().get_balance()

    def test_connection(self) -> tuple[bool, str]:
        """Read the balance: proves the URL, the key and the network in one free call."""
        try:
            balance = self.get_balance()
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected: balance is {balance} credits"

    def close(self) -> None:
        """Close the blocking client's connection pool, if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None
