"""The plugin's parts without a server: scrubbing, foreign rows, the summaries, turning it off."""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_imagen.batch.manifest import write_manifest
from airflow_provider_imagen.ui.sources import ImageTask, public_row, read_run_rows, scrub
from airflow_provider_imagen.ui.summary import spend_summary


def row(status: str, **extra: Any) -> dict[str, Any]:
    return {
        "prompt_id": extra.pop("prompt_id", status),
        "variation": 0,
        "size": "1:1",
        "status": status,
        "credits": 46 if status in ("completed", "timeout") else 0,
        "dag_id": "d",
        "run_id": "r",
        **extra,
    }


def test_signed_urls_lose_their_query_and_keys_are_masked() -> None:
    url = "https://cdn.example/img/a.png?X-Amz-Signature=abc&exp=1"
    key = "rk_live_" + secrets.token_hex(8)  # made here: no key-shaped string sits in the repository
    text = f"download failed: 403 for {url} with {key}"
    cleaned = scrub(text)
    assert cleaned is not None
    assert "X-Amz-Signature" not in cleaned and key not in cleaned
    assert "https://cdn.example/img/a.png?…" in cleaned and scrub(None) is None


def test_a_public_row_names_no_location_and_no_reapi_task() -> None:
    shown = public_row(
        row(
            "completed",
            sha256="a" * 64,
            image_uri="s3://bucket/x.png",
            task_id="task_123",
            error_message=None,
        )
    )
    assert shown["key"] == "a" * 64 and "image_uri" not in shown and "task_id" not in shown
    assert public_row(row("completed", sha256="../etc"))["key"] is None  # only a real sha256 becomes a key


def test_rows_of_another_dag_or_run_are_left_out(tmp_path: Path) -> None:
    uri = write_manifest(
        [row("completed", prompt_id="mine"), row("completed", prompt_id="theirs", dag_id="other")],
        str(tmp_path / "m.parquet"),
    )
    found = read_run_rows([ImageTask("d", "r", "generate", -1, "batch", manifest_uri=uri, state="success")])
    assert [r["prompt_id"] for r in found.rows] == ["mine"]
    assert found.problems == ["generate: 1 row(s) of another DAG or run were left out"]


def test_a_missing_manifest_of_a_finished_task_is_a_problem_but_not_of_a_running_one(tmp_path: Path) -> None:
    uri = str(tmp_path / "none.parquet")
    ended = ImageTask("d", "r", "generate", -1, "batch", manifest_uri=uri, state="failed")
    running = ImageTask("d", "r", "generate", -1, "batch", manifest_uri=uri, state="deferred")
    assert read_run_rows([ended]).problems == ["generate: no manifest was written"]
    assert read_run_rows([running]).problems == []


def test_spend_per_day_counts_shares_of_sent_requests_only() -> None:
    day = dt.datetime(2026, 3, 1, 23, 0, tzinfo=dt.timezone.utc)
    task = ImageTask("d", "r", "generate", -1, "batch", run_start=day)
    rows = [
        row("completed"),
        row("moderated"),
        row("failed"),
        row("timeout"),
        row("invalid"),
        row("skipped_budget"),
    ]
    spend = spend_summary([(task, rows)])
    (only,) = spend["days"]
    assert only["day"] == "2026-03-01" and only["sent"] == 4 and only["requested"] == 6
    assert only["moderated_share"] == 0.25 and only["failed_share"] == 0.5
    assert only["credits"] == 92 and only["usd"] == 0.092 and only["images"] == 1
    assert spend["dags"] == [
        {"dag_id": "d", "runs": 1, "requested": 6, "images": 1, "credits": 92, "usd": 0.092}
    ]


@pytest.mark.parametrize("enabled", ["True", "False"])
def test_the_plugin_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, enabled: str) -> None:
    from airflow_provider_imagen.ui.plugin import ImagenUIPlugin

    monkeypatch.setenv("AIRFLOW__IMAGEN__UI_ENABLED", enabled)
    plugin = ImagenUIPlugin()
    if enabled == "True":
        assert [v["url_route"] for v in plugin.external_views] == ["imagen-gallery", "imagen-spend"]
        assert [a["url_prefix"] for a in plugin.fastapi_apps] == ["/imagen"]
    else:
        assert plugin.external_views == [] and plugin.fastapi_apps == []


def test_the_plugin_is_registered_by_the_package() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="airflow.plugins") if e.name == "imagen"]
    assert entry.value == "airflow_provider_imagen.ui.plugin:ImagenUIPlugin"
