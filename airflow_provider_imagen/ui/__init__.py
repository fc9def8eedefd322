"""The Imagen view in Airflow's UI: a gallery per DAG run and a spend overview, as an Airflow plugin.

Why a package of its own: the operators only need :mod:`~airflow_provider_imagen.ui.links` (a URL
builder, no web framework), while the plugin's API pulls in FastAPI and Airflow's API server. Keeping
them apart means a worker that runs a batch task never imports the web side.

- :mod:`~airflow_provider_imagen.ui.links`: the operator extra links that lead to a run's gallery;
- :mod:`~airflow_provider_imagen.ui.plugin`: the ``AirflowPlugin`` registered by the package;
- :mod:`~airflow_provider_imagen.ui.sources`: where a run's manifests and images are (from Airflow's DB);
- :mod:`~airflow_provider_imagen.ui.files`: reading listed images and their cached thumbnails safely;
- :mod:`~airflow_provider_imagen.ui.app`: the FastAPI app: the pages and the data they show.

Nothing is imported here.
"""

from __future__ import annotations
