"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point.

Since Airflow 3.2 the connection form is declared here (``ui-field-behaviour``, ``conn-fields``),
not in hook methods, so the UI can render it without importing the hook.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_imagen import __version__

#: The Airflow connection type this provider registers.
CONN_TYPE = "imagen"


def get_provider_info() -> dict[str, Any]:
    """Return the provider's metadata in the shape of Airflow's ``provider.yaml`` schema."""
    return {
        "package-name": "airflow-provider-imagen",
        "name": "Imagen (reAPI)",
        "description": "Google Imagen 4 image generation through reAPI's async image API.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Imagen",
                "external-doc-url": "https://reapi.ai/docs",
                "tags": ["ai"],
            }
        ],
        "hooks": [
            {"integration-name": "Imagen", "python-modules": ["airflow_provider_imagen.hooks.imagen"]},
        ],
        "operators": [
            {
                "integration-name": "Imagen",
                "python-modules": [
                    "airflow_provider_imagen.operators.generate",
                    "airflow_provider_imagen.operators.batch",
                ],
            }
        ],
        "sensors": [
            {"integration-name": "Imagen", "python-modules": ["airflow_provider_imagen.sensors.imagen"]},
        ],
        "triggers": [
            {"integration-name": "Imagen", "python-modules": ["airflow_provider_imagen.triggers.imagen"]},
        ],
        "extra-links": [
            "airflow_provider_imagen.operators.generate.ImagenImageLink",
            "airflow_provider_imagen.ui.links.ImagenGalleryLink",
            "airflow_provider_imagen.ui.links.ImagenImageGalleryLink",
        ],
        "config": {
            "imagen": {
                "description": "Settings of the Imagen (reAPI) provider.",
                "options": {
                    "journal_root": {
                        "description": "Where the exactly-once journals of the Imagen operators live, "
                        "as an absolute path or an ObjectStoragePath URI. It must be storage every "
                        "worker sees, or a retry on another worker cannot find what an earlier try "
                        "paid for. An operator's journal_path argument overrides it. Unset: a _journal "
                        "folder in the operator's output folder, else $AIRFLOW_HOME/imagen/journal.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://aws_default@my-bucket/imagen/journal",
                        "default": None,
                    },
                    "min_deferral_seconds": {
                        "description": "Seconds a deferral of an Imagen operator lasts at least: a "
                        "trigger whose condition is met sooner holds its event until then. A resume "
                        "before the scheduler has heard of the deferring process's exit is failed by "
                        "it (a stale success); a worker's supervisor may take up to "
                        "[workers] min_heartbeat_interval to notice that exit. Unset: that interval "
                        "plus 2 s (7 s with Airflow's defaults). 0 turns the hold off.",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "3",
                        "default": None,
                    },
                    "ui_enabled": {
                        "description": "Serve the Imagen gallery and spend pages in Airflow's UI (the "
                        "plugin this provider installs). False turns the pages and their API off.",
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    },
                },
            },
        },
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_imagen.hooks.imagen.ImagenHook",
                "hook-name": "Imagen (reAPI)",
                "connection-type": CONN_TYPE,
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "port"],
                    "relabeling": {"host": "Base URL", "password": "API key"},
                    "placeholders": {
                        "host": "https://reapi.ai",
                        "password": "rk_live_…",
                    },
                },
                "conn-fields": {
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "description": "Seconds to wait for one HTTP answer from the API. Default 30.",
                        "schema": {"type": ["number", "null"], "minimum": 1},
                    },
                    "max_retries": {
                        "label": "Retries for safe calls",
                        "description": "How many times a poll, balance read or download is retried on "
                        "429, 5xx or a network error. Submits are never retried when they may have "
                        "created a paid task.",
                        "schema": {"type": ["integer", "null"], "minimum": 0},
                    },
                },
            }
        ],
    }
