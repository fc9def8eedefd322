"""The manifest: its pinned schema, how a journal entry becomes a status and a price, and safe writing."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch.journal import JournalEntry
from airflow_provider_imagen.batch.manifest import (
    CHARGED_STATUSES,
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    STATUSES,
    RunIdentity,
    credits_for,
    manifest_counts,
    manifest_credits,
    manifest_path,
    manifest_row,
    read_manifest,
    write_manifest,
)
from airflow_provider_imagen.batch.specs import ImageSpec, expand_specs
from airflow_provider_imagen.batch.table import read_prompt_table

IDENTITY = RunIdentity("catalog", "manual__2026-01-01T00:00:00+00:00", "generate", 3)
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
IMAGE = {
    "uri": "file:///out/sku-1.png",
    "sha256": "ab" * 32,
    "width": 1024,
    "height": 1024,
    "size_bytes": 54321,
    "content_type": "image/png",
}


def spec(prompt: str = "a red bicycle", **record: Any) -> ImageSpec:
    specs = expand_specs([{"prompt_id": "sku-1", "prompt": prompt, **record}])
    assert len(specs) == 1
    return specs[0]


def entry(**fields: Any) -> JournalEntry:
    return JournalEntry("sku-1|16:9|v0", **fields)


def submitted(**fields: Any) -> JournalEntry:
    return entry(task_ids=["task_0123"], submitted_at=T0, **fields)


class TestSchema:
    def test_the_schema_is_pinned(self) -> None:
        # A change here must be deliberate: bump SCHEMA_VERSION and tell the users.
        assert [(f.name, str(f.type), f.nullable) for f in MANIFEST_SCHEMA] == [
            ("prompt_id", "string", False),
            ("variation", "int32", False),
            ("prompt", "string", True),
            ("size", "string", False),
            ("status", "string", False),
            ("error_code", "int64", True),
            ("error_message", "string", True),
            ("task_id", "string", True),
            ("image_uri", "string", True),
            ("sha256", "string", True),
            ("width", "int32", True),
            ("height", "int32", True),
            ("bytes", "int64", True),
            ("credits", "int64", False),
            ("submitted_at", "timestamp[us, tz=UTC]", True),
            ("completed_at", "timestamp[us, tz=UTC]", True),
            ("row", "int64", True),
            ("dag_id", "string", True),
            ("run_id", "string", True),
            ("airflow_task_id", "string", True),
            ("map_index", "int32", True),
        ]
        assert SCHEMA_VERSION == 1
        assert MANIFEST_SCHEMA.metadata == {SCHEMA_VERSION_KEY: b"1"}

    def test_the_status_vocabulary_is_pinned(self) -> None:
        assert STATUSES == (
            "completed",
            "failed",
            "moderated",
            "invalid",
            "unknown_submit",
            "timeout",
            "skipped_budget",
            "expired",
            "not_found",
            "download_failed",
            "not_submitted",
            "rejected",
            "wrong_size",
        )

    def test_the_credits_rule(self) -> None:
        assert {s: credits_for(s) for s in STATUSES} == {
            "wrong_size": 46,
            "completed": 46,
            "unknown_submit": 46,
            "timeout": 46,
            "expired": 46,
            "download_failed": 46,
            "failed": 0,
            "moderated": 0,
            "invalid": 0,
            "skipped_budget": 0,
            "not_found": 0,
            "not_submitted": 0,
            "rejected": 0,
        }
        assert {s for s in STATUSES if credits_for(s)} == CHARGED_STATUSES
        with pytest.raises(ValueError, match="unknown manifest status 'done'"):
            credits_for("done")


class TestStatusDerivation:
    @pytest.mark.parametrize(
        ("journal", "status", "extra"),
        [
            (
                submitted(status="completed", completed_at=T0 + 12, mirrored=IMAGE),
                "completed",
                {"image_uri": IMAGE["uri"], "sha256": IMAGE["sha256"], "width": 1024, "bytes": 54321},
            ),
            (
                submitted(status="completed", completed_at=T0 + 12),
                "download_failed",
                {"error_message": "completed but not mirrored to storage yet"},
            ),
            (
                submitted(status="failed", error_code=80006, error_message="Request violates content policy"),
                "moderated",
                {"error_code": 80006, "error_message": "Request violates content policy"},
            ),
            (
                submitted(status="failed", error_code=60099, error_message="render crashed"),
                "failed",
                {"error_code": 60099, "error_message": "render crashed"},
            ),
            (
                submitted(status="not_found", error_code=404, error_message="unknown task"),
                "not_found",
                {"error_code": 404},
            ),
            (
                submitted(timed_out_at=T0 + 600),
                "timeout",
                {"error_message": "still processing when the deadline passed (2026-01-01 00:10:00 UTC)"},
            ),
            (submitted(), "timeout", {"error_message": "still processing when the run ended"}),
            (
                entry(attempts={"a1": "ambiguous"}, ambiguous_reason="timeout after the request was sent"),
                "unknown_submit",
                {"task_id": None, "error_message": "timeout after the request was sent"},
            ),
            (
                # A second POST left without an answer (a zombie try's) beside a known task: the row
                # follows the task, and its credits count both POSTs.
                submitted(attempts={"a1": "submitted", "a2": "pending"}, status="completed", mirrored=IMAGE),
                "completed",
                {"task_id": "task_0123", "credits": 92},
            ),
        ],
    )
    def test_from_the_journal(self, journal: JournalEntry, status: str, extra: dict[str, Any]) -> None:
        row = manifest_row(spec(), journal, identity=IDENTITY)
        assert row["status"] == status
        assert row["credits"] == extra.get("credits", credits_for(status))
        for name, value in extra.items():
            assert row[name] == value, name
        expected_task = None if journal.task_id is None else "task_0123"
        assert row["task_id"] == expected_task

    def test_identity_and_spec_columns(self) -> None:
        row = manifest_row(
            spec(),
            submitted(status="completed", completed_at=T0 + 12, mirrored=IMAGE),
            identity=IDENTITY,
        )
        assert {k: row[k] for k in ("prompt_id", "variation", "prompt", "size", "row")} == {
            "prompt_id": "sku-1",
            "variation": 0,
            "prompt": "a red bicycle",
            "size": "16:9",
            "row": 0,
        }
        assert row["submitted_at"] == dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        assert row["completed_at"] == dt.datetime(2026, 1, 1, 0, 0, 12, tzinfo=dt.timezone.utc)
        assert (row["dag_id"], row["run_id"], row["airflow_task_id"], row["map_index"]) == (
            "catalog",
            "manual__2026-01-01T00:00:00+00:00",
            "generate",
            3,
        )

    def test_an_invalid_spec_is_invalid_whatever_else_is_said(self) -> None:
        bad = spec(prompt="")
        for journal, override in ((None, None), (submitted(status="completed"), "expired")):
            row = manifest_row(bad, journal, identity=IDENTITY, override_status=override)
            assert row["status"] == "invalid" and row["credits"] == 0
            assert row["error_message"] == bad.invalid_reason
            assert row["task_id"] is None

    @pytest.mark.parametrize("status", ["skipped_budget", "expired", "download_failed"])
    def test_overrides(self, status: str) -> None:
        journal = None if status == "skipped_budget" else submitted(status="completed", completed_at=T0 + 5)
        row = manifest_row(
            spec(), journal, identity=IDENTITY, override_status=status, override_reason=f"because {status}"
        )
        assert row["status"] == status
        assert row["error_message"] == f"because {status}"
        assert row["credits"] == credits_for(status)
        assert row["task_id"] == (None if journal is None else "task_0123")

    def test_an_unknown_override_is_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown manifest status 'lost'"):
            manifest_row(spec(), None, identity=IDENTITY, override_status="lost")

    @pytest.mark.parametrize("journal", [None, entry()], ids=["no entry", "rejected submit"])
    def test_never_submitted_needs_the_caller_to_say_why(self, journal: JournalEntry | None) -> None:
        with pytest.raises(ValueError, match=r"'sku-1\|16:9\|v0' \(row 0\) was never submitted"):
            manifest_row(spec(), journal, identity=IDENTITY)


def sample_rows() -> list[dict[str, Any]]:
    specs = expand_specs(
        [
            {"prompt_id": "sku-1", "prompt": "a red bicycle", "size": ["1:1", "16:9"]},
            {"prompt_id": "sku-2", "prompt": "一只熊猫"},
            {"prompt_id": "sku-3", "prompt": "", "size": "2:1"},
            {"prompt_id": "sku-4", "prompt": "a blue car"},
        ]
    )
    journals = [
        submitted(status="completed", completed_at=T0 + 12, mirrored=IMAGE),
        submitted(status="failed", error_code=80006, error_message="Request violates content policy"),
        submitted(timed_out_at=T0 + 600),
        None,
        None,
    ]
    overrides = [None, None, None, None, "skipped_budget"]
    return [
        manifest_row(s, j, identity=IDENTITY, override_status=o)
        for s, j, o in zip(specs, journals, overrides, strict=True)
    ]


class TestWriteAndRead:
    def test_round_trip(self, tmp_path: Path) -> None:
        rows = sample_rows()
        uri = write_manifest(rows, ObjectStoragePath(f"file://{tmp_path}/m.parquet"))
        assert uri == f"file://{tmp_path}/m.parquet"
        on_disk = pq.read_schema(tmp_path / "m.parquet")
        assert on_disk.equals(MANIFEST_SCHEMA, check_metadata=False)
        assert on_disk.metadata[SCHEMA_VERSION_KEY] == b"1"

        frame = read_manifest(uri)
        assert frame.attrs["schema_version"] == 1
        assert list(frame.columns) == MANIFEST_SCHEMA.names
        assert frame["status"].tolist() == ["completed", "moderated", "timeout", "invalid", "skipped_budget"]
        assert frame["prompt"].tolist()[:2] == ["a red bicycle", "a red bicycle"]
        assert frame["prompt_id"].tolist() == ["sku-1", "sku-1", "sku-2", "sku-3", "sku-4"]
        assert frame["credits"].tolist() == [46, 0, 46, 0, 0]
        assert frame["width"].tolist()[0] == 1024 and frame["width"].isna().tolist()[1:] == [True] * 4
        assert frame["error_code"].tolist()[1] == 80006
        assert str(frame["submitted_at"].dtype) == "datetime64[us, UTC]"
        assert frame["submitted_at"][0].isoformat() == "2026-01-01T00:00:00+00:00"
        assert frame["map_index"].tolist() == [3] * 5

        assert manifest_counts(frame) == manifest_counts(rows)
        assert manifest_counts(rows) == {
            "wrong_size": 0,
            "completed": 1,
            "failed": 0,
            "moderated": 1,
            "invalid": 1,
            "unknown_submit": 0,
            "timeout": 1,
            "skipped_budget": 1,
            "expired": 0,
            "not_found": 0,
            "download_failed": 0,
            "not_submitted": 0,
            "rejected": 0,
            "total": 5,
        }
        assert manifest_credits(rows) == manifest_credits(frame) == 92

    def test_plain_local_paths_and_an_empty_manifest(self, tmp_path: Path) -> None:
        uri = write_manifest([], str(tmp_path / "deep" / "empty.parquet"))
        frame = read_manifest(uri)
        assert len(frame) == 0 and list(frame.columns) == MANIFEST_SCHEMA.names

    def test_an_unknown_status_is_rejected_and_nothing_is_written(self, tmp_path: Path) -> None:
        rows = sample_rows()
        rows[2] = {**rows[2], "status": "done"}
        with pytest.raises(ValueError, match=r"manifest row 2 has unknown status 'done'"):
            write_manifest(rows, tmp_path / "m.parquet")
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(ValueError, match=r"unknown manifest status 'done'"):
            manifest_counts(rows)

    def test_unknown_fields_and_missing_required_ones_are_rejected(self, tmp_path: Path) -> None:
        row = sample_rows()[0]
        with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
            write_manifest([{**row, "colour": "red"}], tmp_path / "m.parquet")
        with pytest.raises(ValueError, match=r"'size' must not be null"):
            write_manifest([{**row, "size": None}], tmp_path / "m.parquet")
        with pytest.raises(ValueError, match=r"manifest column 'width'"):
            write_manifest([{**row, "width": "wide"}], tmp_path / "m.parquet")

    def test_a_rewrite_replaces_the_file_whole_and_leaves_no_temp_files(self, tmp_path: Path) -> None:
        dest = tmp_path / "out" / "m.parquet"
        rows = sample_rows()
        write_manifest(rows[:2], dest)
        write_manifest(rows, dest)
        assert sorted(p.name for p in dest.parent.iterdir()) == ["m.parquet"]
        assert pq.read_metadata(dest).num_rows == 5

    def test_invalid_text_reaches_the_manifest_escaped(self, tmp_path: Path) -> None:
        specs = expand_specs([{"prompt_id": "bad\ud800", "prompt": "x\udcff"}])
        uri = write_manifest([manifest_row(specs[0], None, identity=IDENTITY)], tmp_path / "m.parquet")
        frame = read_manifest(uri)
        assert frame["prompt_id"].tolist() == ["bad\\ud800"]
        assert frame["status"].tolist() == ["invalid"]


class TestManifestPath:
    def test_layout(self, tmp_path: Path) -> None:
        path = manifest_path(ObjectStoragePath(f"file://{tmp_path}"), identity=IDENTITY)
        relative = path.relative_to(ObjectStoragePath(f"file://{tmp_path}")).parts
        assert relative == (
            "manifests",
            "dag_id=catalog",
            "run_id=manual__2026-01-01T00%3A00%3A00%2B00%3A00",
            "generate__3.parquet",
        )
        unmapped = manifest_path(str(tmp_path), identity=RunIdentity("catalog", "scheduled__x", "generate"))
        assert unmapped.name == "generate.parquet"

    @pytest.mark.parametrize(
        "identity",
        [
            RunIdentity("../../etc", "../../..", "..", -1),
            RunIdentity("a/b", "run/../../x", "t\\..\\u", 0),
            RunIdentity(".", ".hidden", "_private", -1),
            RunIdentity("", "", "", -1),
        ],
    )
    def test_ids_cannot_escape_or_hide(self, tmp_path: Path, identity: RunIdentity) -> None:
        root = tmp_path / "out"
        path = manifest_path(str(root), identity=identity)
        parts = Path(path.path).relative_to(root).parts
        assert len(parts) == 4 and parts[0] == "manifests"
        for part in parts:
            assert part not in ("", ".", "..") and "/" not in part and not part.startswith((".", "_"))
        assert Path(path.path).resolve().is_relative_to(root.resolve())
        write_manifest(sample_rows(), path)  # the file really lands there
        assert Path(path.path).is_file()


def test_100k_rows_build_and_write_correctly(tmp_path: Path) -> None:
    n = 100_000
    specs = expand_specs([{"prompt_id": f"sku-{i}", "prompt": f"item {i}"} for i in range(n)])
    journal = submitted(status="completed", completed_at=T0 + 12, mirrored=IMAGE)
    started = time.perf_counter()
    rows = [manifest_row(s, journal, identity=IDENTITY) for s in specs]
    built = time.perf_counter()
    uri = write_manifest(rows, manifest_path(str(tmp_path), identity=IDENTITY))
    written = time.perf_counter()
    print(f"\nmanifest rows for {n}: {built - started:.2f} s; Parquet write: {written - built:.2f} s")
    frame = read_manifest(uri)
    assert len(frame) == n
    assert manifest_counts(frame)["completed"] == n
    assert manifest_credits(frame) == 46 * n
    assert frame["prompt_id"].iloc[-1] == f"sku-{n - 1}"
    assert pa.types.is_timestamp(pq.read_schema(Path(ObjectStoragePath(uri).path)).field("completed_at").type)


def test_table_and_manifest_on_s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {
        "conn_type": "aws",
        "login": "k",
        "password": "s",
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_S3_TEST", json.dumps(conn))
    root = ObjectStoragePath("s3://imagen/prompts/", conn_id="imagen_s3_test")
    for day, ids in (("2026-01-02", ["c"]), ("2026-01-01", ["a", "b"])):
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"prompt {i}" for i in ids]}), buffer)
        (root / f"ds={day}" / "part-0.parquet").write_bytes(buffer.getvalue().to_pybytes())

    table = read_prompt_table(root)
    assert table["prompt_id"].tolist() == ["a", "b", "c"]
    assert table["ds"].tolist() == ["2026-01-01", "2026-01-01", "2026-01-02"]

    out = ObjectStoragePath("s3://imagen/out/", conn_id="imagen_s3_test")
    dest = manifest_path(out, identity=IDENTITY)
    rows = [
        manifest_row(s, None, identity=IDENTITY, override_status="skipped_budget")
        for s in expand_specs(table)
    ]
    uri = write_manifest(rows, dest)
    assert "run_id=manual__2026-01-01T00%3A00%3A00%2B00%3A00" in uri
    frame = read_manifest(dest)
    assert frame["prompt_id"].tolist() == ["a", "b", "c"]
    assert manifest_counts(frame)["skipped_budget"] == 3
    assert [p.name for p in dest.parent.iterdir()] == ["generate__3.parquet"]


class TestMerge:
    def test_a_rerun_with_fewer_rows_keeps_the_rows_it_does_not_replace(self, tmp_path: Path) -> None:
        """A rerun of the run id sends only the edited row: the manifest keeps the five others and
        takes the new row in place of the old one."""
        from airflow_provider_imagen.batch.manifest import merge_rows, read_manifest, write_manifest

        def row(pid: str, prompt: str, sha: str) -> dict[str, Any]:
            return {
                "prompt_id": pid,
                "variation": 0,
                "prompt": prompt,
                "size": "1:1",
                "status": "completed",
                "credits": 46,
                "sha256": sha,
                "image_uri": f"/img/{pid}-{sha}.png",
            }

        dest = tmp_path / "manifests" / "generate.parquet"
        write_manifest([row(f"q{i}", f"prompt {i}", "old") for i in range(6)], str(dest))
        merged = merge_rows([row("q3", "prompt 3, edited", "new")], str(dest))
        write_manifest(merged, str(dest))
        frame = read_manifest(str(dest))
        assert len(frame) == 6
        assert sorted(frame["prompt_id"]) == [f"q{i}" for i in range(6)]
        edited = frame[frame["prompt_id"] == "q3"].iloc[0]
        assert (edited["prompt"], edited["sha256"]) == ("prompt 3, edited", "new")
        assert merge_rows([row("a", "p", "s")], str(tmp_path / "absent.parquet")) == [row("a", "p", "s")]


def test_a_streamed_manifest_is_the_merged_manifest_written_whole(tmp_path) -> None:
    """Row groups of 3, over an earlier manifest of the same run: the same rows, counts and credits as
    ``merge_rows`` then ``write_manifest``, and the earlier rows not replaced are kept."""
    import pyarrow.parquet as pq

    from airflow_provider_imagen.batch.manifest import (
        manifest_counts,
        manifest_credits,
        merge_rows,
        write_manifest,
        write_manifest_stream,
    )

    def row(i: int, status: str, credits: int) -> dict:
        return {
            "prompt_id": f"p{i}",
            "variation": 0,
            "size": "1:1",
            "status": status,
            "credits": credits,
            "row": i,
        }

    earlier = [row(i, "timeout", 46) for i in range(10)]
    now = [row(i, "completed", 46) for i in range(3, 10)] + [row(i, "invalid", 0) for i in range(10, 14)]
    write_manifest(earlier, tmp_path / "a.parquet")
    write_manifest(earlier, tmp_path / "b.parquet")
    expected = merge_rows(now, tmp_path / "a.parquet")
    write_manifest(expected, tmp_path / "a.parquet")
    written = write_manifest_stream(iter(now), tmp_path / "b.parquet", chunk=3)
    assert (
        pq.read_table(tmp_path / "b.parquet").to_pylist() == pq.read_table(tmp_path / "a.parquet").to_pylist()
    )
    assert written.counts == manifest_counts(expected) and written.credits == manifest_credits(expected)
    assert written.written == len(now) and written.counts["total"] == 14
    assert pq.ParquetFile(tmp_path / "b.parquet").metadata.num_row_groups >= 3
