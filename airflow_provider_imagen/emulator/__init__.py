"""A local stand-in for reAPI's async image API (model ``imagen-4-0``), for tests, demos and users' own CI.

It speaks the contract in ``docs`` (submit, poll, balance, signed media URLs with a TTL), charges and refunds
credits like the real service, and can inject every fault a client must survive (moderation, failures,
ambiguous submits, 5xx, 429, slow answers, HTML instead of a PNG). A ledger shows exactly what was charged, so
tests can prove nothing was paid twice. No Airflow imports: it runs anywhere FastAPI and uvicorn do
(the ``emulator`` extra).
"""

from __future__ import annotations

from airflow_provider_imagen._extras import require_extra

require_extra("emulator", feature="The reAPI emulator")

from airflow_provider_imagen.emulator.app import create_app  # noqa: E402  (after the extra's check)
from airflow_provider_imagen.emulator.config import DEFAULT_API_KEY, EmulatorConfig  # noqa: E402
from airflow_provider_imagen.emulator.server import EmulatorServer  # noqa: E402

__all__ = ["DEFAULT_API_KEY", "EmulatorConfig", "EmulatorServer", "create_app"]
