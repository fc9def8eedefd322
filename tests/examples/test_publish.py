"""The publish package on its own (no DAG runs): content keys, planning, the index, sheet and gallery."""

from __future__ import annotations

import datetime as dt
import io
import itertools
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from airflow_provider_imagen.batch.manifest import read_manifest, write_manifest
from airflow_provider_imagen.batch.specs import expand_specs
from airflow_provider_imagen.batch.table import read_prompt_table
from airflow_provider_imagen.publish.contact_sheet import (
    Tile,
    contact_sheet_png,
    fit_box,
    render_contact_sheet,
    sheet_layout,
)
from airflow_provider_imagen.publish.gallery import GalleryItem, InvalidRow, render_gallery
from airflow_provider_imagen.publish.index import (
    IndexState,
    absorb_manifest,
    content_key,
    plan_increment,
    read_index,
    write_index,
    write_plan_table,
)
from airflow_provider_imagen.publish.runs import (
    OutputLayout,
    merge_manifests,
    partition_layout,
    plan_run,
    publish_run,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def manifest_rows(
    *rows: tuple[str, str, str, str], at: dt.datetime = T0, run: str = "r1"
) -> list[dict[str, Any]]:
    """(prompt_id, prompt, size, status) → manifest rows."""
    out = []
    for number, (pid, prompt, size, status) in enumerate(rows):
        completed = status == "completed"
        out.append(
            {
                "prompt_id": pid,
                "variation": 0,
                "prompt": prompt,
                "size": size,
                "status": status,
                "error_code": 80006 if status == "moderated" else None,
                "task_id": f"task_{run}_{number}",
                "image_uri": f"/img/{pid}-{size.replace(':', 'x')}-{run}.png" if completed else None,
                "sha256": f"{run}{number}" if completed else None,
                "credits": 46 if completed else 0,
                "submitted_at": at,
                "completed_at": at + dt.timedelta(seconds=10),
                "row": number,
                "dag_id": "d",
                "run_id": run,
                "airflow_task_id": "generate",
                "map_index": -1,
            }
        )
    return out


def as_frame(rows: list[dict[str, Any]], tmp_path: Path, name: str = "m.parquet") -> pd.DataFrame:
    return read_manifest(write_manifest(rows, tmp_path / name))


# -- content keys and planning -----------------------------------------------------------------------


def test_content_key_changes_with_every_field_and_nothing_else() -> None:
    base = content_key("a teapot", "1:1", 0)
    assert base == content_key("a teapot", "1:1", 0) and len(base) == 32
    others = [
        content_key("a teapot!", "1:1", 0),
        content_key("a teapot", "16:9", 0),
        content_key("a teapot", "1:1", 1),
        content_key("a teapot", "1:1", 0, model="imagen-5"),
    ]
    assert len({base, *others}) == 5


def catalog() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c"],
            "prompt": ["apple", "banana", "cherry"],
            "sizes": [["1:1", "16:9"], ["9:16"], ["1:1", "3:4", "4:3"]],
        }
    )


def index_of(frame: pd.DataFrame, tmp_path: Path, status: str = "completed") -> IndexState:
    rows = [
        (r.prompt_id, r.prompt, size, status)
        for r in frame.itertuples()
        for size in (r.sizes if isinstance(r.sizes, list) else list(r.sizes))
    ]
    return absorb_manifest(IndexState.empty(), as_frame(manifest_rows(*rows), tmp_path), "m1")


def test_plan_on_an_empty_index_asks_for_everything() -> None:
    plan = plan_increment(catalog(), IndexState.empty(), size_column="sizes")
    assert (plan.rows, plan.requested, plan.images, plan.unchanged) == (3, 6, 6, 0)
    assert plan.to_generate["sizes"].tolist() == [["1:1", "16:9"], ["9:16"], ["1:1", "3:4", "4:3"]]
    assert plan.to_generate["source_row"].tolist() == [0, 1, 2]
    assert plan.credits == 6 * 46


def test_plan_sends_only_changed_prompts_and_added_sizes(tmp_path: Path) -> None:
    index = index_of(catalog(), tmp_path)
    assert plan_increment(catalog(), index, size_column="sizes").images == 0

    edited = catalog()
    edited.loc[1, "prompt"] = "a ripe banana"  # changed prompt: all of b's sizes
    edited.at[2, "sizes"] = ["1:1", "3:4", "4:3", "9:16"]  # added surface: just the new size
    edited.loc[3] = ["d", "date", ["16:9"]]  # new row
    plan = plan_increment(edited, index, size_column="sizes")
    assert plan.to_generate["prompt_id"].tolist() == ["b", "c", "d"]
    assert plan.to_generate["sizes"].tolist() == [["9:16"], ["9:16"], ["16:9"]]
    assert plan.to_generate["source_row"].tolist() == [1, 2, 3]
    assert (plan.images, plan.unchanged) == (3, 5)

    # A dropped size costs nothing and changes nothing else.
    fewer = catalog()
    fewer.at[0, "sizes"] = ["1:1"]
    assert plan_increment(fewer, index, size_column="sizes").images == 0


def test_plan_does_not_resend_moderated_prompts_unless_asked(tmp_path: Path) -> None:
    index = index_of(catalog(), tmp_path, status="moderated")
    plan = plan_increment(catalog(), index, size_column="sizes")
    assert (plan.images, plan.known_moderated) == (0, 6)
    assert plan_increment(catalog(), index, size_column="sizes", retry_moderated=True).images == 6
    edited = catalog()
    edited.loc[0, "prompt"] = "a green apple"  # a changed prompt is a new request
    assert plan_increment(edited, index, size_column="sizes").images == 2


def test_budget_defers_the_rest_in_table_order() -> None:
    plan = plan_increment(catalog(), IndexState.empty(), size_column="sizes", max_images=4)
    assert plan.to_generate["sizes"].tolist() == [["1:1", "16:9"], ["9:16"], ["1:1"]]
    assert (plan.images, plan.deferred) == (4, 2)
    assert plan_increment(catalog(), IndexState.empty(), size_column="sizes", max_images=0).images == 0


def test_invalid_rows_are_listed_never_planned_and_duplicates_do_not_flip_flop(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "prompt_id": ["a", "a", "x", "y"],
            "prompt": ["apple", "another apple", "", "yam"],
            "sizes": [["1:1"], ["1:1"], ["1:1"], ["1:1", "billboard"]],
        }
    )
    plan = plan_increment(table, IndexState.empty(), size_column="sizes")
    assert plan.to_generate["prompt_id"].tolist() == ["a", "y"]
    assert plan.to_generate["sizes"].tolist() == [["1:1"], ["1:1"]]
    reasons = [spec.invalid_reason for spec in plan.invalid]
    assert len(reasons) == 3 and "duplicates row 0" in reasons[0] and "billboard" in reasons[2]
    # Once "a" is made, the duplicate row stays invalid: it is never sent in its place.
    index = absorb_manifest(
        IndexState.empty(), as_frame(manifest_rows(("a", "apple", "1:1", "completed")), tmp_path), "m"
    )
    assert plan_increment(table, index, size_column="sizes").to_generate["prompt_id"].tolist() == ["y"]


def test_the_written_plan_expands_in_the_operator_to_exactly_the_planned_images(tmp_path: Path) -> None:
    table = catalog()
    table["surfaces"] = [["grid", "hero"], ["banner"], ["grid", "pdp", "lookbook"]]
    table["ints"] = pd.array([1, None, 3], dtype="Int64")
    plan = plan_increment(table, IndexState.empty(), size_column="sizes", max_images=5)
    uri = write_plan_table(plan.to_generate, tmp_path / "plan.parquet", size_column="sizes")
    specs = expand_specs(read_prompt_table(uri), size_column="sizes")
    assert [s.key for s in specs] == ["a|1:1|v0", "a|16:9|v0", "b|9:16|v0", "c|1:1|v0", "c|3:4|v0"]
    assert all(s.valid for s in specs)


def test_the_index_and_the_operator_agree_on_what_the_same_image_is(tmp_path: Path) -> None:
    """The plan compares content keys; the operator's journal re-attaches by the spec's digest. One
    function makes both, so an image the plan calls changed is one the journal will not re-attach."""
    table = catalog()
    specs = expand_specs(table, size_column="sizes")
    index = index_of(table, tmp_path)
    keys = {(e.prompt_id, e.size): e.content_key for e in index.entries.itertuples()}
    for spec in specs:
        assert spec.digest == content_key(spec.prompt, spec.size, spec.variation)
        assert spec.digest == keys[(spec.prompt_id, spec.size)]
    edited = table.copy()
    edited.loc[1, "prompt"] = "a ripe banana"
    changed = [s for s in expand_specs(edited, size_column="sizes") if s.digest not in keys.values()]
    planned = plan_increment(edited, index, size_column="sizes")
    assert [(s.prompt_id, s.size) for s in changed] == [("b", "9:16")] and planned.images == 1


# -- the index ---------------------------------------------------------------------------------------


def test_absorbing_is_idempotent_order_independent_and_keeps_only_lasting_outcomes(tmp_path: Path) -> None:
    first = as_frame(
        manifest_rows(
            ("a", "apple", "1:1", "completed"),
            ("b", "banana", "1:1", "moderated"),
            ("c", "cherry", "1:1", "failed"),
            ("d", "date", "1:1", "timeout"),
        ),
        tmp_path,
        "1.parquet",
    )
    later = as_frame(
        manifest_rows(("a", "apple v2", "1:1", "completed"), at=T0 + dt.timedelta(days=1), run="r2"),
        tmp_path,
        "2.parquet",
    )
    one = absorb_manifest(absorb_manifest(IndexState.empty(), first, "m1"), later, "m2")
    two = absorb_manifest(absorb_manifest(IndexState.empty(), later, "m2"), first, "m1")
    pd.testing.assert_frame_equal(one.entries, two.entries)
    assert one.absorbed == two.absorbed == {"m1", "m2"}
    assert one.entries["prompt_id"].tolist() == ["a", "b"]  # failed and timeout are tried again
    assert one.entries.loc[0, "prompt"] == "apple v2" and one.entries.loc[0, "run_id"] == "r2"
    assert absorb_manifest(one, later, "m2") is one

    path = tmp_path / "index" / "index.parquet"
    write_index(one, path)
    back = read_index(path)
    pd.testing.assert_frame_equal(back.entries, one.entries)
    assert back.absorbed == one.absorbed
    assert len(read_index(tmp_path / "missing.parquet")) == 0


def test_plan_absorbs_a_manifest_that_a_failed_publish_left_behind(tmp_path: Path) -> None:
    layout = OutputLayout.at(str(tmp_path / "out"), "nightly")
    write_manifest(
        manifest_rows(("a", "apple", "1:1", "completed"), ("a", "apple", "16:9", "completed")),
        layout.manifest("night-1"),
    )
    summary = plan_run(catalog(), layout, "night-2", size_column="sizes")
    assert summary["recovered_manifests"] == 1
    assert (summary["images"], summary["unchanged"]) == (4, 2)
    assert read_index(layout.index).absorbed == {"dag_id=nightly/run_id=night-1/generate.parquet"}
    planned = pd.read_parquet(summary["to_generate_uri"])
    assert planned["prompt_id"].tolist() == ["b", "c"]
    # Publishing the old run again is harmless: it is already in the index.
    result = publish_run(layout, "night-1")
    assert result["absorbed"] == [] and result["published"] and result["index_entries"] == 2


def test_partition_manifest_merges_runs_latest_first_and_is_kept_when_nothing_changed(tmp_path: Path) -> None:
    layout, target = partition_layout(str(tmp_path / "out"), "ds=2026-01-01", "backfill")
    assert str(layout.root).endswith("/out/partitions/ds=2026-01-01")
    write_manifest(
        manifest_rows(("a", "apple", "1:1", "completed"), ("b", "banana", "1:1", "failed"), run="run-1"),
        layout.manifest("run-1"),
    )
    first = publish_run(layout, "run-1", partition_manifest=target)
    assert first["published"] and first["counts"] == {"completed": 1, "failed": 1, "total": 2}
    data = Path(str(target)).read_bytes()
    again = publish_run(layout, "run-1", partition_manifest=target)
    assert not again["published"] and Path(str(target)).read_bytes() == data

    write_manifest(
        manifest_rows(("b", "banana", "1:1", "completed"), at=T0 + dt.timedelta(hours=1), run="run-2"),
        layout.manifest("run-2"),
    )
    merged = publish_run(layout, "run-2", partition_manifest=target)
    assert merged["counts"] == {"completed": 2, "total": 2}
    frame = read_manifest(target)
    assert frame["run_id"].tolist() == ["run-1", "run-2"]
    assert len(merge_manifests([])) == 0
    assert merge_manifests([as_frame([], tmp_path, "empty.parquet")]).empty
    with pytest.raises(ValueError, match="key=value"):
        partition_layout(str(tmp_path), "2026-01-01", "backfill")


def rerun_rows(run: str = "run-1") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run's manifest before and after a rerun under the same run id that regenerated ``b`` with a
    new prompt: the rerun's writer keeps the rows it did not touch and replaces ``b``'s."""
    before = manifest_rows(("a", "apple", "1:1", "completed"), ("b", "banana", "1:1", "completed"), run=run)
    edited = manifest_rows(("b", "a ripe banana", "1:1", "completed"), at=T0 + dt.timedelta(days=1), run=run)[
        0
    ]
    edited.update(task_id="task_rerun", image_uri="/img/b-1x1-rerun.png", sha256="rerun", row=1)
    return before, [before[0], edited]


def test_a_rerun_under_the_same_run_id_is_absorbed_and_published_again(tmp_path: Path) -> None:
    layout, target = partition_layout(str(tmp_path / "out"), "ds=2026-01-01", "backfill")
    before, after = rerun_rows()
    write_manifest(before, layout.manifest("run-1"))
    first = publish_run(layout, "run-1", partition_manifest=target)
    assert first["published"] and first["absorbed"] == ["dag_id=backfill/run_id=run-1/generate.parquet"]
    assert not publish_run(layout, "run-1", partition_manifest=target)["published"]

    # Same path, same run id, new content: the list of paths is the same, the content is not.
    write_manifest(after, layout.manifest("run-1"))
    second = publish_run(layout, "run-1", partition_manifest=target)
    assert second["published"] and second["absorbed"] == first["absorbed"]
    published = read_manifest(target).set_index("prompt_id")
    assert published.loc["b", "prompt"] == "a ripe banana" and published.loc["b", "task_id"] == "task_rerun"
    assert published.loc["a", "task_id"] == "task_run-1_0" and len(published) == 2
    entries = read_index(layout.index).entries.set_index("prompt_id")
    assert entries.loc["b", "image_uri"] == "/img/b-1x1-rerun.png" and entries.loc["b", "sha256"] == "rerun"
    assert entries.loc["a", "sha256"] == "run-10"
    # Every index entry points at a manifest that lists its image.
    for entry in read_index(layout.index).entries.itertuples():
        listed = read_manifest(str(layout.root / "manifests" / entry.manifest_uri))
        assert entry.task_id in set(listed["task_id"])
    again = publish_run(layout, "run-1", partition_manifest=target)
    assert not again["published"] and "none changed" in again["reason"]
    plan = plan_run(
        pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["apple", "a ripe banana"], "size": ["1:1"] * 2}),
        layout,
        "run-1",
    )
    assert (plan["images"], plan["unchanged"], plan["recovered_manifests"]) == (0, 2, 0)


def test_a_manifest_version_changes_with_every_rewrite_of_the_file(tmp_path: Path) -> None:
    from airflow_provider_imagen.batch.storage import as_path
    from airflow_provider_imagen.publish.runs import manifest_version

    path = as_path(str(tmp_path / "m.parquet"))
    rows = manifest_rows(("a", "apple", "1:1", "completed"))
    write_manifest(rows, path)
    first = manifest_version(path)
    assert manifest_version(path) == first
    write_manifest(rows, path)  # the same bytes, written again: another object
    assert manifest_version(path) != first


def test_a_new_version_of_a_manifest_replaces_only_what_it_gives_to_another_task(tmp_path: Path) -> None:
    before, after = rerun_rows()
    state = absorb_manifest(IndexState.empty(), as_frame(before, tmp_path, "1.parquet"), "m", version="v1")
    assert state.has_absorbed("m", "v1") and not state.has_absorbed("m", "v2")
    assert absorb_manifest(state, as_frame(after, tmp_path, "2.parquet"), "m", version="v1") is state

    # The new version ends b's rerun as failed: the old image is no longer listed by "m", so the index
    # forgets it (its prompt changed: the next plan would send it anyway).
    failed = dict(after[1], status="failed", image_uri=None, sha256=None, credits=0)
    dropped = absorb_manifest(state, as_frame([after[0], failed], tmp_path, "3.parquet"), "m", version="v2")
    assert dropped.entries["prompt_id"].tolist() == ["a"] and dropped.versions == {"m": "v2"}
    # A version that lists fewer rows drops nothing: an image is never forgotten for a missing row.
    fewer = absorb_manifest(state, as_frame([after[1]], tmp_path, "4.parquet"), "m", version="v3")
    assert fewer.entries.set_index("prompt_id").loc["a", "sha256"] == "run-10"
    assert fewer.entries.set_index("prompt_id").loc["b", "sha256"] == "rerun"

    # An index written before versions were kept absorbs each manifest once more, with the same result.
    legacy = IndexState(state.entries, state.absorbed)
    again = absorb_manifest(legacy, as_frame(before, tmp_path, "5.parquet"), "m", version="v1")
    pd.testing.assert_frame_equal(again.entries, state.entries)
    path = tmp_path / "index.parquet"
    write_index(again, path)
    assert read_index(path).versions == {"m": "v1"}


def test_merged_partition_manifest_takes_each_images_latest_outcome_not_its_runs(tmp_path: Path) -> None:
    """A run id reused by a rerun holds old rows beside new ones: its latest time says nothing about
    its old rows, so a row of another run made in between must win over them."""
    old, reused = rerun_rows("run-1")
    between = manifest_rows(
        ("a", "apple v2", "1:1", "completed"), at=T0 + dt.timedelta(hours=12), run="run-2"
    )
    merged = merge_manifests(
        [as_frame(reused, tmp_path, "1.parquet"), as_frame(between, tmp_path, "2.parquet")]
    ).set_index("prompt_id")
    assert merged.loc["a", "run_id"] == "run-2" and merged.loc["a", "prompt"] == "apple v2"
    assert merged.loc["b", "task_id"] == "task_rerun"
    assert len(old) == 2


# -- contact sheet and gallery -----------------------------------------------------------------------


def png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("count", [0, 1, 7, 87, 400])
def test_layout_has_one_slot_per_tile_inside_the_sheet_and_no_overlaps(count: int) -> None:
    layout = sheet_layout(count)
    assert len(layout.slots) == count and layout.columns * layout.rows >= count
    for slot in layout.slots:
        assert slot.card.x >= 0 and slot.card.right <= layout.width and slot.card.bottom <= layout.height
        assert slot.card.y >= layout.header.bottom
        assert slot.picture.bottom <= slot.caption.y and slot.caption.bottom <= slot.card.bottom
    for a, b in itertools.combinations(layout.slots, 2):
        assert (
            a.card.right <= b.card.x
            or b.card.right <= a.card.x
            or a.card.bottom <= b.card.y
            or (b.card.bottom <= a.card.y)
        )


def test_sheet_shows_images_fitted_and_placeholders_shaped_by_their_size() -> None:
    tiles = [
        Tile("wide", "16:9", "completed", png((200, 30, 30), (320, 180))),
        Tile("tall", "9:16", "moderated", None, note="content policy (80006)"),
        Tile("broken", "1:1", "completed", b"not a png"),
        Tile("lost", "1:1", "completed", None),
    ]
    sheet = Image.open(io.BytesIO(contact_sheet_png(tiles, title="t", subtitle="s"))).convert("RGB")
    layout = sheet_layout(4)
    assert sheet.size == (layout.width, layout.height)
    wide = fit_box(layout.slots[0].picture, (16, 9))
    assert sheet.getpixel(wide.center) == (200, 30, 30)
    assert sheet.getpixel((wide.x + 2, wide.y - 3)) != (200, 30, 30)  # letterboxed, not stretched
    tall = fit_box(layout.slots[1].picture, (9, 16))
    assert tall.height > tall.width and sheet.getpixel((tall.x + 1, tall.y + 1)) != (255, 255, 255)
    for slot in layout.slots[2:]:  # unreadable or missing: a labelled placeholder, not a crash
        assert sheet.getpixel((slot.picture.x + 2, slot.picture.y + 2)) != (246, 247, 249)


def test_sheet_caps_the_tiles_it_draws() -> None:
    tiles = [Tile(f"p{i}", "1:1", "failed") for i in range(30)]
    sheet = render_contact_sheet(tiles, title="t", max_tiles=12)
    assert sheet.size == (sheet_layout(12).width, sheet_layout(12).height)
    assert render_contact_sheet([], title="empty").size[0] > 0


def test_gallery_escapes_everything_and_drops_unsafe_links() -> None:
    page = render_gallery(
        [
            GalleryItem(
                "<b>x</b>", "1:1", "completed", "<script>alert(1)</script>", href="../../images/a.png"
            ),
            GalleryItem("y", "1:1", "completed", "p", href="javascript:alert(1)"),
            GalleryItem("z", "9:16", "moderated", "一只熊猫", note="content policy (80006)"),
        ],
        title="T & <T>",
        invalid=[InvalidRow(3, "bad", "size 'billboard' <is not> a ratio")],
    )
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page
    assert 'src="../../images/a.png"' in page and "javascript:" not in page
    assert "一只熊猫" in page and "&lt;is not&gt;" in page and "T &amp; &lt;T&gt;" in page
    assert page.count("<figure>") == 3


def test_invalid_rows_go_to_the_plan_folder_and_the_gallery(tmp_path: Path) -> None:
    layout = OutputLayout.at(str(tmp_path / "out"), "nightly")
    table = catalog()
    table.at[1, "sizes"] = ["9:16", "billboard"]
    summary = plan_run(table, layout, "run-1", size_column="sizes")
    assert summary["invalid"] == 1 and summary["images"] == 6
    invalid = pd.read_parquet(summary["invalid_uri"])
    assert invalid["prompt_id"].tolist() == ["b"] and "billboard" in invalid["reason"].iloc[0]
    with pytest.raises(Exception, match="invalid rows"):
        plan_run(table, layout, "run-2", size_column="sizes", on_invalid="fail")

    write_manifest(manifest_rows(("a", "apple", "1:1", "completed"), run="run-1"), layout.manifest("run-1"))
    result = publish_run(layout, "run-1")
    page = Path(result["gallery_uri"]).read_text()
    assert result["invalid_rows"] == 1 and "1 invalid row(s), never sent" in page and "billboard" in page
