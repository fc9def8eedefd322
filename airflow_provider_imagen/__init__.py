"""Apache Airflow provider for Google Imagen 4 through reAPI's async image API."""

from __future__ import annotations

__version__ = "0.1.0"
