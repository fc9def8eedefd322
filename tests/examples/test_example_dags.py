"""The example DAGs, run end to end with ``dag.test()`` against the emulator; the ledger is the bill."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from airflow_provider_imagen.batch.manifest import read_manifest
from airflow_provider_imagen.emulator.images import background_colour
from airflow_provider_imagen.publish.contact_sheet import STATUS_COLOURS, fit_box, ratio, sheet_layout
from airflow_provider_imagen.publish.index import read_index
from airflow_provider_imagen.publish.runs import THUMB, OutputLayout, partition_layout
from tests.airflow_helpers import task_states, xcoms
from tests.examples.conftest import ROOT, SAMPLE, Sample, dag_test

NIGHTLY = "imagen_catalog_nightly"
BACKFILL = "imagen_prompt_backfill"
DATES = [datetime(2026, 1, day, tzinfo=timezone.utc) for day in (1, 2, 3)]


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def night(sample: Sample) -> tuple[Any, dict[tuple[str, str], Any]]:
    dr = dag_test(NIGHTLY, catalog=str(sample.catalog), output_root=str(sample.catalog_out))
    return dr, xcoms(dr)


def backfill(sample: Sample, when: datetime) -> tuple[Any, dict[tuple[str, str], Any]]:
    dr = dag_test(
        BACKFILL, logical_date=when, dataset=str(sample.dataset), output_root=str(sample.backfill_out)
    )
    return dr, xcoms(dr)


def asset_events(name: str, run_id: str) -> list[dict[str, Any]]:
    """Return the ``extra`` of every event of the Asset ``name`` emitted by ``run_id``."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent.extra)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .filter(AssetModel.name == name, AssetEvent.source_run_id == run_id)
            .all()
        )
        return [row.extra for row in rows]


# -- parsing -----------------------------------------------------------------------------------------


def test_dag_files_import_without_errors_or_warnings() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert bag.captured_warnings == {}
    assert sorted(bag.dag_ids) == [NIGHTLY, BACKFILL]
    # Only the two DAG files are parsed: the sample-data generator beside them is not a DAG file.
    assert sorted(Path(s.file).name for s in bag.dagbag_stats) == sorted([f"{BACKFILL}.py", f"{NIGHTLY}.py"])

    nightly = bag.dags[NIGHTLY]
    assert nightly.max_active_runs == 1 and not nightly.catchup
    assert {t.task_id for t in nightly.tasks} == {"plan", "generate", "publish", "watcher"}
    outlets = nightly.get_task("generate").outlets
    assert [o.name for o in outlets] == ["imagen_catalog_manifests"]
    assert bag.dags[BACKFILL].get_task("publish").outlets[0].name == "imagen_prompt_backfill_manifests"


def test_dag_files_keep_top_level_imports_light() -> None:
    """A DAG file is parsed on every task start: no pandas, pyarrow or Pillow at its top level."""
    code = (
        "import runpy, sys, warnings\n"
        "import airflow.sdk\n"
        "warnings.simplefilter('error')\n"
        "for name in sys.argv[1:]:\n"
        "    runpy.run_path(name)\n"
        "print(','.join(sorted(m for m in ('pandas', 'pyarrow', 'PIL', 'numpy') if m in sys.modules)))\n"
    )
    files = [str(ROOT / "dags" / f"{dag_id}.py") for dag_id in (NIGHTLY, BACKFILL)]
    out = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the DAG files import {out.stdout.strip()} at parse time"


def test_sample_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    SAMPLE.write_all(tmp_path)
    for written in sorted(tmp_path.rglob("*.parquet")):
        committed = ROOT / "dags" / "data" / written.relative_to(tmp_path)
        pd.testing.assert_frame_equal(pd.read_parquet(written), pd.read_parquet(committed))
    catalog = pd.read_parquet(ROOT / "dags" / "data" / "catalog" / "catalog.parquet")
    assert len(catalog) == 40 and catalog["prompt_id"].is_unique
    from tests.examples.conftest import load_sample_data_module

    surfaces = {s for row in catalog["surfaces"] for s in row}
    nightly = load_dag_module(NIGHTLY)
    assert {nightly.SURFACE_SIZES[s] for s in surfaces} == {"1:1", "3:4", "4:3", "9:16", "16:9"}
    assert (catalog["locale"] == "zh").sum() >= 5
    moderated = [
        p for p in catalog["prompt"] if any(w in p.lower() for w in load_sample_data_module().MODERATED_WORDS)
    ]
    assert len(moderated) == 1
    parts = sorted(p.name for p in (ROOT / "dags" / "data" / "prompt_dataset").iterdir())
    assert parts == ["ds=2026-01-01", "ds=2026-01-02", "ds=2026-01-03"]


def load_dag_module(dag_id: str) -> Any:
    import runpy

    return type("DagModule", (), runpy.run_path(str(ROOT / "dags" / f"{dag_id}.py")))


# -- the nightly catalog -----------------------------------------------------------------------------


def test_nightly_end_to_end_then_an_unchanged_catalog_makes_zero_posts(
    examples_env: Any, sample: Sample
) -> None:
    emulator = examples_env
    catalog = pd.read_parquet(sample.catalog)
    images = sum(len(s) for s in catalog["surfaces"])

    dr, xc = night(sample)
    assert task_states(dr) == {
        "plan": "success",
        "generate": "success",
        "publish": "success",
        "watcher": "skipped",
    }
    plan = xc[("plan", "plan")]
    assert (plan["rows"], plan["images"], plan["unchanged"]) == (40, images, 0)
    ledger = emulator.ledger()
    assert ledger["posts"] == ledger["tasks_created"] == images
    surfaces = dict(zip(catalog["prompt"], (len(s) for s in catalog["surfaces"]), strict=True))
    assert ledger["submissions_by_prompt"] == surfaces  # one POST per (product, surface), no more

    # The manifest is the bill: every image requested, moderated ones refunded.
    result = xc[("generate", "return_value")]
    manifest = read_manifest(result["manifest_uri"])
    assert len(manifest) == images
    moderated = manifest[manifest["status"] == "moderated"]
    assert set(moderated["prompt_id"]) == {"SKU-1031"} and len(moderated) == 2
    assert (manifest["status"] != "moderated").sum() == (manifest["status"] == "completed").sum()
    assert int(manifest["credits"].sum()) == ledger["net_credits"] == result["credits"]
    for row in manifest[manifest["status"] == "completed"].itertuples():
        assert hashlib.sha256(local(row.image_uri).read_bytes()).hexdigest() == row.sha256
        assert local(row.image_uri).parent == sample.catalog_out / "images"
    # Every ratio is there, from a per-row list of surfaces.
    assert set(manifest["size"]) == {"1:1", "3:4", "4:3", "9:16", "16:9"}
    assert sorted(manifest.loc[manifest["prompt_id"] == "SKU-1001", "size"]) == ["16:9", "1:1", "3:4"]

    assert asset_events("imagen_catalog_manifests", dr.run_id) == [result]  # downstream DAGs can follow

    published = xc[("publish", "return_value")]
    assert published["published"] and published["manifest_uri"] == result["manifest_uri"]
    index = read_index(published["index_uri"])
    assert len(index) == images
    assert sorted(index.entries["status"].value_counts().items()) == [
        ("completed", images - 2),
        ("moderated", 2),
    ]
    latest = json.loads((sample.catalog_out / "latest.json").read_text())
    assert latest["run_id"] == dr.run_id and latest["gallery_uri"] == published["gallery_uri"]
    gallery = local(published["gallery_uri"]).read_text()
    assert gallery.count("<figure>") == images and "青花瓷碗" in gallery
    assert local(published["contact_sheet_uri"]).parent == local(result["manifest_uri"]).parent

    # Night two: the catalog did not change, so nothing is sent and nothing is published.
    dr2, xc2 = night(sample)
    assert task_states(dr2) == {
        "plan": "success",
        "generate": "skipped",
        "publish": "success",
        "watcher": "skipped",
    }
    assert emulator.ledger()["posts"] == images  # zero new POSTs
    assert emulator.ledger()["net_credits"] == ledger["net_credits"]
    plan2 = xc2[("plan", "plan")]
    assert (plan2["images"], plan2["unchanged"], plan2["known_moderated"]) == (0, images - 2, 2)
    assert plan2["to_generate_uri"] is None
    assert xc2[("publish", "return_value")]["published"] is False
    assert json.loads((sample.catalog_out / "latest.json").read_text())["run_id"] == dr.run_id
    assert asset_events("imagen_catalog_manifests", dr2.run_id) == []  # nothing new, no event


def test_contact_sheet_has_one_tile_per_requested_image_and_shows_every_completed_one(
    examples_env: Any, sample: Sample
) -> None:
    _, xc = night(sample)
    published = xc[("publish", "return_value")]
    manifest = read_manifest(published["manifest_uri"])
    sheet = Image.open(local(published["contact_sheet_uri"])).convert("RGB")
    layout = sheet_layout(len(manifest), thumb=THUMB)
    assert sheet.size == (layout.width, layout.height)  # drawn with this layout: one slot per manifest row

    def close(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 6

    showing_their_image = 0
    for row, slot in zip(manifest.itertuples(), layout.slots, strict=True):
        aspect = (row.width, row.height) if row.status == "completed" else ratio(row.size)
        box = fit_box(slot.picture, aspect)
        # Near the left edge, half-way down: background of the emulator's render (text is centred).
        pixel = sheet.getpixel((box.x + 3, box.y + box.height * 45 // 100))
        if close(pixel, background_colour(row.prompt)):
            showing_their_image += 1
            assert row.status == "completed", row
        else:
            assert row.status != "completed", row
            orange = STATUS_COLOURS["moderated"]
            tints = [tuple(round(255 - (255 - c) * k) for c in orange) for k in (0.18, 0.32)]
            assert any(close(pixel, t) for t in tints) or close(pixel, orange), (row, pixel)
    assert showing_their_image == (manifest["status"] == "completed").sum() == len(manifest) - 2


def test_editing_one_prompt_regenerates_exactly_that_row(examples_env: Any, sample: Sample) -> None:
    emulator = examples_env
    night(sample)
    before = read_index(OutputLayout.at(str(sample.catalog_out), NIGHTLY).index).entries.set_index(
        ["prompt_id", "size"]
    )
    posts = emulator.ledger()["posts"]

    catalog = pd.read_parquet(sample.catalog)
    edited = "A cast iron skillet with roasted autumn squash, rustic wooden table, studio product photography"
    catalog.loc[catalog["prompt_id"] == "SKU-1005", "prompt"] = edited
    catalog.to_parquet(sample.catalog, index=False)

    dr, xc = night(sample)
    assert task_states(dr)["generate"] == "success"
    ledger = emulator.ledger()
    assert ledger["posts"] - posts == 3  # SKU-1005's three surfaces, nothing else
    assert ledger["submissions_by_prompt"][edited] == 3
    manifest = read_manifest(xc[("generate", "return_value")]["manifest_uri"])
    assert set(manifest["prompt_id"]) == {"SKU-1005"}
    assert sorted(manifest["size"]) == ["16:9", "1:1", "4:3"] and (manifest["status"] == "completed").all()

    after = read_index(OutputLayout.at(str(sample.catalog_out), NIGHTLY).index).entries.set_index(
        ["prompt_id", "size"]
    )
    assert after.index.equals(before.index)
    changed = after.index[after["sha256"].fillna("") != before["sha256"].fillna("")]
    assert sorted(changed) == [("SKU-1005", "16:9"), ("SKU-1005", "1:1"), ("SKU-1005", "4:3")]
    # A new image is a new file (named by its task id): the one paid for the old prompt is kept.
    for key in changed:
        old_image, new_image = local(before.loc[key, "image_uri"]), local(after.loc[key, "image_uri"])
        assert old_image != new_image and old_image.exists() and new_image.exists()
        assert hashlib.sha256(old_image.read_bytes()).hexdigest() == before.loc[key, "sha256"]
    assert (after.loc["SKU-1005", "prompt"] == edited).all()
    assert (after.drop(index="SKU-1005")["content_key"] == before.drop(index="SKU-1005")["content_key"]).all()


# -- the backfill ------------------------------------------------------------------------------------


def test_backfill_three_dates_make_three_partitions_and_a_rerun_makes_zero_posts(
    examples_env: Any, sample: Sample
) -> None:
    emulator = examples_env
    manifests = {}
    first_run_ids = {}
    for when in DATES:
        dr, xc = backfill(sample, when)
        first_run_ids[when] = dr.run_id
        ds = f"{when:%Y-%m-%d}"
        assert task_states(dr) == {
            "plan": "success",
            "generate": "success",
            "publish": "success",
            "watcher": "skipped",
        }, ds
        published = xc[("publish", "return_value")]
        path = sample.backfill_out / "manifests" / f"ds={ds}" / "manifest.parquet"
        assert local(published["manifest_uri"]) == path
        manifest = read_manifest(path)
        source = pd.read_parquet(sample.dataset / f"ds={ds}")
        # Each run processed its own partition, and only it.
        assert sorted(manifest["prompt_id"]) == sorted(source["prompt_id"])
        assert sorted(manifest["prompt"]) == sorted(source["prompt"])
        assert (manifest["status"] == "completed").all()
        assert (path.parent / "_contact_sheet.png").exists() and (path.parent / "_gallery.html").exists()
        for uri in manifest["image_uri"]:
            assert f"/partitions/ds={ds}/images/" in uri
        assert [e["manifest_uri"] for e in asset_events("imagen_prompt_backfill_manifests", dr.run_id)] == [
            published["manifest_uri"]
        ]
        manifests[ds] = path.read_bytes()
    assert sorted(p.name for p in (sample.backfill_out / "manifests").iterdir()) == [
        "ds=2026-01-01",
        "ds=2026-01-02",
        "ds=2026-01-03",
    ]
    ledger = emulator.ledger()
    assert ledger["posts"] == ledger["tasks_created"] == 18

    # Rerun a finished date: a new run (its own run id, so its own journal), and the journal is wiped too.
    # The partition's index is what stops it.
    layout, _ = partition_layout(str(sample.backfill_out), "ds=2026-01-02", BACKFILL)
    shutil.rmtree(local(str(layout.root)) / "_journal")
    dr, xc = backfill(sample, DATES[1])
    assert dr.run_id != first_run_ids[DATES[1]]
    assert task_states(dr) == {
        "plan": "success",
        "generate": "skipped",
        "publish": "skipped",
        "watcher": "skipped",
    }
    assert emulator.ledger()["posts"] == 18  # zero new POSTs
    assert asset_events("imagen_prompt_backfill_manifests", dr.run_id) == []  # nothing new, no event
    assert xc[("plan", "plan")]["images"] == 0 and xc[("plan", "plan")]["unchanged"] == 6
    for ds, data in manifests.items():
        assert (sample.backfill_out / "manifests" / f"ds={ds}" / "manifest.parquet").read_bytes() == data


def test_backfill_date_without_a_partition_is_skipped_for_free(examples_env: Any, sample: Sample) -> None:
    dr, _ = backfill(sample, datetime(2026, 1, 4, tzinfo=timezone.utc))
    assert task_states(dr) == {
        "plan": "skipped",
        "generate": "skipped",
        "publish": "skipped",
        "watcher": "skipped",
    }
    assert examples_env.ledger()["posts"] == 0
    assert not (sample.backfill_out / "manifests").exists()


def test_backfill_rerun_after_a_change_in_the_partition_sends_only_the_change(
    examples_env: Any, sample: Sample
) -> None:
    emulator = examples_env
    backfill(sample, DATES[0])
    part = sample.dataset / "ds=2026-01-01" / "part-000.parquet"
    frame = pd.read_parquet(part)
    frame.loc[frame["prompt_id"] == "q-0002", "size"] = "16:9"  # was 4:3
    frame.to_parquet(part, index=False)

    dr, xc = backfill(sample, DATES[0])
    assert task_states(dr)["publish"] == "success"
    assert emulator.ledger()["posts"] == 7
    manifest = read_manifest(xc[("publish", "return_value")]["manifest_uri"])
    # The partition's manifest keeps the five untouched images and adds the new size of q-0002.
    assert len(manifest) == 7 and (manifest["status"] == "completed").all()
    assert sorted(manifest.loc[manifest["prompt_id"] == "q-0002", "size"]) == ["16:9", "4:3"]


def test_a_failed_generate_still_indexes_what_was_paid_for_and_fails_the_run(
    examples_env: Any, sample: Sample
) -> None:
    emulator = examples_env
    emulator.configure(failure_rate=0.5)  # far over the DAG's fail_on_error_rate of 20 %
    dr, xc = night(sample)
    assert task_states(dr) == {
        "plan": "success",
        "generate": "failed",
        "publish": "success",
        "watcher": "failed",
    }
    assert str(dr.state) in ("failed", "DagRunState.FAILED")
    published = xc[("publish", "return_value")]
    manifest = read_manifest(published["manifest_uri"])
    completed = int((manifest["status"] == "completed").sum())
    failed = int((manifest["status"] == "failed").sum())
    assert completed and failed and int(manifest["credits"].sum()) == emulator.ledger()["net_credits"]
    index = read_index(published["index_uri"]).entries
    assert (index["status"] == "completed").sum() == completed  # every paid image is indexed

    # The next night retries the failures, and only them: nothing paid for is paid for again.
    emulator.configure(failure_rate=0.0)
    posts = emulator.ledger()["posts"]
    dr2, xc2 = night(sample)
    assert task_states(dr2)["generate"] == "success"
    assert emulator.ledger()["posts"] - posts == xc2[("plan", "plan")]["images"] == failed
