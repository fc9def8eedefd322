"""Nightly catalog imagery with Google Imagen 4: generate only what is new or changed, then publish it.

Every day:

1. ``plan`` reads the catalog (a Parquet table: one row per product, with the list of storefront surfaces
   it needs), turns surfaces into aspect ratios, and compares every (product, ratio) with the index of
   images already made, by a content key of model + prompt + size. It writes the table of what is new or
   changed for this run. When nothing is, the batch is skipped: an unchanged catalog costs nothing.
2. ``generate`` (:class:`ImagenBatchGenerateOperator`) makes those images: journalled so it never pays
   twice, waiting in the triggerer, mirrored to ``<output_root>/images/``, with a manifest. The manifest
   is the Asset ``imagen_catalog_manifests``: schedule downstream DAGs on it.
3. ``publish`` folds the manifest into the index (written whole: atomic), then draws a contact sheet
   (PNG) and an HTML gallery next to the manifest. It runs even when ``generate`` failed, so what was
   paid for is indexed and not paid for again tomorrow.
4. ``watcher`` fails the run when any task failed (``publish`` would otherwise hide it).

Connection: ``imagen_default`` (type ``imagen``: the reAPI key as password; the host defaults to
https://reapi.ai, or points at the local emulator). Params, all with defaults that use the bundled sample
catalog: ``catalog``, ``output_root``, ``max_credits`` (budget per night; what does not fit waits for the
next night), ``imagen_conn_id``, ``retry_moderated``.

Runs one at a time (``max_active_runs=1``): the index is read, then written, by each run.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator, manifests_asset_uri

# [START howto_imagen_catalog_settings]
#: The bundled sample catalog (40 products); point the ``catalog`` param at your own table.
SAMPLE_CATALOG = Path(__file__).resolve().parent / "data" / "catalog" / "catalog.parquet"
#: Where images, manifests and the index go by default (any ObjectStoragePath: s3://…, gs://…).
OUTPUT_ROOT = (
    os.environ.get("IMAGEN_EXAMPLES_OUTPUT", "/tmp/airflow-imagen-examples").rstrip("/") + "/catalog"
)
#: Seconds after a submit of its first poll: Imagen 4 takes about 10 s. The demo's and the tests'
#: emulators render faster, so they lower it through this variable.
EXPECTED_RENDER = float(os.environ.get("IMAGEN_EXAMPLES_EXPECTED_RENDER", "10"))

#: The aspect ratio each storefront surface needs; one scene description, rendered once per surface.
SURFACE_SIZES = {
    "grid_tile": "1:1",
    "hero": "16:9",
    "mobile_banner": "9:16",
    "pdp_portrait": "3:4",
    "lookbook": "4:3",
}
# [END howto_imagen_catalog_settings]

#: The Asset the manifests are published as (its event's ``extra`` holds the manifest URI and counts).
CATALOG_MANIFESTS = Asset(name="imagen_catalog_manifests", uri=manifests_asset_uri(OUTPUT_ROOT))


def surface_sizes(surfaces: Any) -> list[str] | None:
    """Return the ratios of a row's surfaces, in order, once each; unknown surfaces pass through as-is.

    An unknown surface name is not a ratio, so the plan reports that row as invalid (naming the value)
    instead of silently rendering a guess.
    """
    if surfaces is None or isinstance(surfaces, float):
        return None
    names = [surfaces] if isinstance(surfaces, str) else list(surfaces)
    return list(dict.fromkeys(SURFACE_SIZES.get(str(name), str(name)) for name in names))


with DAG(
    dag_id="imagen_catalog_nightly",
    description="Catalog imagery with Imagen 4: only new or changed products, then a contact sheet",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "catalog": Param(str(SAMPLE_CATALOG), type="string", description="Parquet catalog table"),
        "output_root": Param(OUTPUT_ROOT, type="string", description="Folder or URI for all output"),
        "max_credits": Param(
            None, type=["null", "integer"], minimum=0, description="Budget per night (46 per image)"
        ),
        "imagen_conn_id": Param("imagen_default", type="string"),
        "retry_moderated": Param(False, type="boolean", description="Resend prompts refused before"),
    },
    tags=["imagen", "example"],
) as dag:
    # [START howto_imagen_catalog_plan]
    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def plan(**context: Any) -> bool:
        """Write the table of what is new or changed; skip ``generate`` when there is nothing."""
        from airflow_provider_imagen.batch.table import read_prompt_table
        from airflow_provider_imagen.publish.runs import OutputLayout, plan_run

        params, ti = context["params"], context["ti"]
        table = read_prompt_table(params["catalog"])
        if "surfaces" in table.columns:
            table["sizes"] = [surface_sizes(cell) for cell in table["surfaces"]]
        summary = plan_run(
            table,
            OutputLayout.at(params["output_root"], ti.dag_id),
            ti.run_id,
            size_column="sizes",
            max_credits=params["max_credits"],
            retry_moderated=params["retry_moderated"],
        )
        ti.xcom_push(key="plan", value=summary)
        return summary["images"] > 0

    # [END howto_imagen_catalog_plan]

    # [START howto_imagen_catalog_generate]
    generate = ImagenBatchGenerateOperator(
        task_id="generate",
        prompts="{{ ti.xcom_pull(task_ids='plan', key='plan')['to_generate_uri'] }}",
        output_path="{{ params.output_root }}",
        imagen_conn_id="{{ params.imagen_conn_id }}",
        size_column="sizes",
        deferrable=True,
        expected_render=EXPECTED_RENDER,
        poll_interval=max(0.1, min(2.0, EXPECTED_RENDER / 5)),
        fail_on_error_rate=0.2,
        outlets=[CATALOG_MANIFESTS],
    )
    # [END howto_imagen_catalog_generate]

    # [START howto_imagen_catalog_publish]
    @task(trigger_rule=TriggerRule.ALL_DONE, multiple_outputs=False)
    def publish(**context: Any) -> dict[str, Any]:
        """Index the run's manifest atomically, then draw the contact sheet and the gallery beside it."""
        from airflow_provider_imagen.publish.runs import OutputLayout, publish_run

        params, ti = context["params"], context["ti"]
        layout = OutputLayout.at(params["output_root"], ti.dag_id)
        # A run triggered without a logical date (the Airflow 3 default for manual runs) has no ``ds``.
        day = context.get("ds") or f"{context['dag_run'].run_after:%Y-%m-%d}"
        return publish_run(layout, ti.run_id, title=f"Catalog imagery · {day} · {ti.run_id}")

    # [END howto_imagen_catalog_publish]

    @task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
    def watcher() -> None:
        """Fail the run when a task failed: ``publish`` runs after failures and would hide them."""
        raise AirflowFailException(
            "a task of this run failed; see its log (publish indexed what was paid for)"
        )

    published = publish()
    plan() >> generate >> published
    [generate, published] >> watcher()
