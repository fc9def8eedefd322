"""The Airflow plugin that puts the Imagen gallery and spend pages in Airflow's UI.

Registered through the ``airflow.plugins`` entry point, so installing the package is enough; it is
loaded by every Airflow process, so this module imports nothing heavy: the FastAPI app is built only
when the API server asks for ``fastapi_apps``.

Turn it off with ``[imagen] ui_enabled = False`` (``AIRFLOW__IMAGEN__UI_ENABLED=False``): the plugin
then registers no app and no view. The operators' extra links still point at the gallery's route,
which the UI then answers with its own "page not found".
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_imagen.ui.links import GALLERY_ROUTE, SPEND_ROUTE, URL_PREFIX, base_path


def ui_enabled() -> bool:
    """Return ``[imagen] ui_enabled`` (default ``True``)."""
    from airflow.configuration import conf

    return conf.getboolean("imagen", "ui_enabled", fallback=True)


def external_views() -> list[dict[str, Any]]:
    """Return the two views: a tab on every DAG run, and an entry in the Browse menu."""
    prefix = base_path() + URL_PREFIX
    return [
        {
            "name": "Imagen gallery",
            "href": prefix + "/dags/{DAG_ID}/runs/{RUN_ID}/gallery",
            "destination": "dag_run",
            "url_route": GALLERY_ROUTE,
        },
        {
            "name": "Imagen spend",
            "href": prefix + "/spend",
            "destination": "nav",
            "category": "browse",
            "url_route": SPEND_ROUTE,
        },
    ]


class ImagenUIPlugin(AirflowPlugin):
    """Serve the Imagen pages and their data from Airflow's API server, and show them in its UI."""

    name = "imagen"

    @property
    def external_views(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Return the gallery tab and the spend menu entry (none when the plugin is turned off)."""
        if not ui_enabled():
            return []
        if self._views is None:
            self._views = external_views()  # one list: Airflow drops invalid views from it in place
        return self._views

    _views: list[dict[str, Any]] | None = None

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Return the app (built on first use: only the API server asks for it)."""
        if not ui_enabled():
            return []
        return [{"app": _app(), "url_prefix": URL_PREFIX, "name": "Imagen gallery and spend"}]


_built: list[Any] = []


def _app() -> Any:
    if not _built:
        from airflow_provider_imagen.ui.app import create_app

        _built.append(create_app())
    return _built[0]
