"""Operator extra links to a run's Imagen gallery in Airflow's UI.

Why a module of its own: both operators use it, and the worker resolves extra links when a task ends
(Airflow 3 stores the URL in XCom), so it must not import the plugin's web side. The link is the Airflow
UI's own route of the gallery tab of the DAG run, so the gallery opens inside Airflow, beside the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: The plugin's FastAPI app is mounted here, under the API server's base URL.
URL_PREFIX: Final = "/imagen"
#: The UI route of the gallery tab of a DAG run (``/dags/<dag>/runs/<run>/plugin/<route>``).
GALLERY_ROUTE: Final = "imagen-gallery"
#: The UI route of the spend overview (``/plugin/<route>``).
SPEND_ROUTE: Final = "imagen-spend"


def base_url() -> str:
    """Return the API server's public base URL without a trailing slash ("" when not configured)."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def base_path() -> str:
    """Return the path part of the base URL ("" or ``/airflow`` behind a proxy that adds one)."""
    return urlsplit(base_url()).path.rstrip("/")


def gallery_url(dag_id: str, run_id: str) -> str:
    """Return the Airflow UI's URL of the gallery tab of a DAG run."""
    return f"{base_url()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/plugin/{GALLERY_ROUTE}"


def spend_url() -> str:
    """Return the Airflow UI's URL of the spend overview."""
    return f"{base_url()}/plugin/{SPEND_ROUTE}"


class ImagenGalleryLink(BaseOperatorLink):
    """Link a batch task to its run's gallery: every manifest row as a tile, with its status and cost."""

    name = "Imagen gallery"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return gallery_url(ti_key.dag_id, ti_key.run_id)


class ImagenImageGalleryLink(BaseOperatorLink):
    """Link a single-image task to its run's gallery, once its image lives on storage.

    Without ``output_path`` the image is never mirrored, so the gallery would have nothing of it to show:
    the link is then empty, which the UI shows as a disabled button.
    """

    name = "Imagen gallery"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.providers.common.compat.sdk import XCom

        from airflow_provider_imagen.operators.generate import IMAGE_URI_XCOM_KEY

        if not XCom.get_value(key=IMAGE_URI_XCOM_KEY, ti_key=ti_key):
            return ""
        return gallery_url(ti_key.dag_id, ti_key.run_id)
