r"""Backfill Google Imagen 4 images over a date-partitioned prompt dataset, one partition per run.

The dataset is Hive-style: ``<dataset>/ds=YYYY-MM-DD/*.parquet`` (columns ``prompt_id``, ``prompt`` and an
optional ``size``: a ratio or a list of ratios). The run of date ``ds`` (its logical date, or the ``ds``
param of a manual run):

1. ``plan`` reads only ``ds=<ds>/`` and compares it with that partition's own index of images already
   made (content key: model + prompt + size + variation, the digest the operator's journal checks too).
   A date that already completed plans nothing, so its rerun costs zero credits and makes zero
   requests; an edited prompt is planned, and sent, once. A date with no folder is skipped.
2. ``generate`` (:class:`ImagenBatchGenerateOperator`) makes what is missing into the partition's own
   folder, ``<output_root>/partitions/ds=<ds>/`` (images, journal, run manifests, index): runs of
   different dates never write the same file, so they can run side by side.
3. ``publish`` folds the run into the partition's index and writes the partition's manifest,
   ``<output_root>/manifests/ds=<ds>/manifest.parquet`` (per image, its latest outcome), with a contact
   sheet and a gallery beside it. When no run manifest changed (by content: a rerun under the same run
   id rewrites its run's manifest) it keeps the manifest as it is, and skips, so no Asset event is sent
   twice for the same data. The manifests folder is the Asset
   ``imagen_prompt_backfill_manifests``.
4. ``watcher`` fails the run when any task failed.

Run it over a range with Airflow 3 backfills; ``max_active_runs`` (2 here, or ``--max-active-runs``)
is the concurrency knob::

    airflow backfill create --dag-id imagen_prompt_backfill \
        --from-date 2026-01-01 --to-date 2026-01-03 --max-active-runs 2

To make a date again after editing prompts, reprocess it with the edited data (in Airflow 3 this
clears the date's run, under the same run id)::

    airflow backfill create --dag-id imagen_prompt_backfill --from-date 2026-01-02 --to-date 2026-01-02 \
        --reprocess-behavior completed --dag-run-conf '{"dataset": "<a copy with the edits>"}'

Connection: ``imagen_default`` (type ``imagen``). Params: ``dataset``, ``output_root``, ``max_credits``
(budget per run), ``imagen_conn_id``, ``ds`` (the date of a manual run, which has no logical date).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator, manifests_asset_uri

#: The bundled sample dataset: three days, 2026-01-01 to 2026-01-03.
SAMPLE_DATASET = Path(__file__).resolve().parent / "data" / "prompt_dataset"
OUTPUT_ROOT = (
    os.environ.get("IMAGEN_EXAMPLES_OUTPUT", "/tmp/airflow-imagen-examples").rstrip("/") + "/backfill"
)
#: Seconds after a submit of its first poll (Imagen 4: ~10 s; the demo and tests use faster emulators).
EXPECTED_RENDER = float(os.environ.get("IMAGEN_EXAMPLES_EXPECTED_RENDER", "10"))

#: The published partition manifests, one ``ds=…`` folder each.
BACKFILL_MANIFESTS = Asset(name="imagen_prompt_backfill_manifests", uri=manifests_asset_uri(OUTPUT_ROOT))


def run_date(context: Any) -> str:
    """Return the date a run works on: the ``ds`` param when set, else the run's logical date.

    Airflow keeps one run per logical date, so a second run of a date that has one is a manual run with
    no logical date (or another one) and the ``ds`` param naming the date.
    """
    ds = context["params"].get("ds") or context.get("ds")
    if not ds:
        raise AirflowFailException("this run has no logical date: set the ds param (YYYY-MM-DD)")
    return str(ds)


with DAG(
    dag_id="imagen_prompt_backfill",
    description="Imagen 4 over a ds-partitioned prompt dataset; reruns of finished dates cost nothing",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "dataset": Param(str(SAMPLE_DATASET), type="string", description="Folder of ds=YYYY-MM-DD/ parts"),
        "output_root": Param(OUTPUT_ROOT, type="string", description="Folder or URI for all output"),
        "max_credits": Param(
            None, type=["null", "integer"], minimum=0, description="Budget per run (46 per image)"
        ),
        "imagen_conn_id": Param("imagen_default", type="string"),
        "ds": Param(
            None,
            type=["null", "string"],
            pattern=r"^\d{4}-\d{2}-\d{2}$",
            description="The date to make, for a manual run; default: the run's logical date",
        ),
    },
    tags=["imagen", "example"],
) as dag:
    # [START howto_imagen_backfill_plan]
    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def plan(**context: Any) -> bool:
        """Plan this run's own partition (``ds`` of its date) against that partition's index."""
        from airflow.sdk import ObjectStoragePath

        from airflow_provider_imagen.batch.table import read_prompt_table
        from airflow_provider_imagen.publish.runs import partition_layout, plan_run

        params, ti, ds = context["params"], context["ti"], run_date(context)
        partition = f"ds={ds}"
        source = ObjectStoragePath(params["dataset"].rstrip("/") + f"/{partition}")
        if not source.exists():
            raise AirflowSkipException(f"no partition {source}: nothing to generate for {ds}")
        layout, _ = partition_layout(params["output_root"], partition, ti.dag_id)
        summary = plan_run(
            read_prompt_table(source),
            layout,
            ti.run_id,
            size_column="size",
            max_credits=params["max_credits"],
        )
        ti.xcom_push(key="plan", value={**summary, "output_path": str(layout.root)})
        return summary["images"] > 0

    # [END howto_imagen_backfill_plan]

    generate = ImagenBatchGenerateOperator(
        task_id="generate",
        prompts="{{ ti.xcom_pull(task_ids='plan', key='plan')['to_generate_uri'] }}",
        output_path="{{ ti.xcom_pull(task_ids='plan', key='plan')['output_path'] }}",
        imagen_conn_id="{{ params.imagen_conn_id }}",
        size_column="size",
        deferrable=True,
        expected_render=EXPECTED_RENDER,
        poll_interval=max(0.1, min(2.0, EXPECTED_RENDER / 5)),
    )

    # [START howto_imagen_backfill_publish]
    @task(trigger_rule=TriggerRule.ALL_DONE, multiple_outputs=False, outlets=[BACKFILL_MANIFESTS])
    def publish(**context: Any) -> dict[str, Any]:
        """Merge the partition's runs into its manifest and draw it; skip when nothing changed."""
        from airflow_provider_imagen.publish.runs import partition_layout, publish_run

        params, ti, ds = context["params"], context["ti"], run_date(context)
        layout, manifest = partition_layout(params["output_root"], f"ds={ds}", ti.dag_id)
        result = publish_run(
            layout, ti.run_id, partition_manifest=manifest, title=f"Prompt backfill · ds={ds}"
        )
        if not result["published"]:
            raise AirflowSkipException(result["reason"])
        context["outlet_events"][BACKFILL_MANIFESTS].extra = {
            "ds": ds,
            "manifest_uri": result["manifest_uri"],
            "counts": result["counts"],
            "credits": result["credits"],
        }
        return result

    # [END howto_imagen_backfill_publish]

    @task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
    def watcher() -> None:
        """Fail the run when a task failed: ``publish`` runs after failures and would hide them."""
        raise AirflowFailException(
            "a task of this run failed; see its log (publish indexed what was paid for)"
        )

    published = publish()
    plan() >> generate >> published
    [generate, published] >> watcher()
