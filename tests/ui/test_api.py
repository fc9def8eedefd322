"""The plugin's API on Airflow's own FastAPI app (test client), after real runs against the emulator.

Users: ``admin`` (reads everything), ``nobody`` (a valid token without a role: authenticated, allowed
nothing), ``only:<dag>`` (reads that one DAG; see :mod:`tests.ui.auth`), and no token at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import pytest
from PIL import Image

from tests.airflow_helpers import run_dag, task_states, xcoms

BATCH_DAG = "imagen_test_ui_batch"
SINGLE_DAG = "imagen_test_ui_single"
ROWS = [
    {"prompt_id": "tea-1", "prompt": "A ceramic teapot, morning light", "size": "1:1"},
    {"prompt_id": "tea-2", "prompt": "一只陶瓷茶壶，柔和的晨光", "size": "16:9"},
    {"prompt_id": "pan-1", "prompt": "A copper saucepan on marble", "size": "9:16"},
    {"prompt_id": "pan-2", "prompt": "A copper saucepan, top view", "size": "1:1"},
    {"prompt_id": "fake-1", "prompt": "A replica designer handbag [[moderate]]", "size": "1:1"},
    {"prompt_id": "bad-1", "prompt": "", "size": "1:1"},
]


@pytest.fixture(scope="module")
def runs(emulator_server: Any, airflow_db: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One batch run (4 completed, 1 moderated, 1 invalid) and one single-image run, both real."""
    emulator_server.reset()
    conn = {"conn_type": "imagen", "host": emulator_server.base_url, "password": emulator_server.api_key}
    saved = os.environ.get("AIRFLOW_CONN_IMAGEN_DEFAULT")
    os.environ["AIRFLOW_CONN_IMAGEN_DEFAULT"] = json.dumps(conn)
    root = tmp_path_factory.mktemp("ui")
    try:
        prompts = root / "prompts.parquet"
        pd.DataFrame(ROWS).to_parquet(prompts)
        batch = run_dag(
            BATCH_DAG,
            prompts=str(prompts),
            output_path=str(root / "batch"),
            journal_path=str(root / "journal-batch"),
        )
        single = run_dag(
            SINGLE_DAG, output_path=str(root / "single"), journal_path=str(root / "journal-single")
        )
    finally:
        if saved is None:
            os.environ.pop("AIRFLOW_CONN_IMAGEN_DEFAULT", None)
        else:
            os.environ["AIRFLOW_CONN_IMAGEN_DEFAULT"] = saved
    assert task_states(batch) == {"generate": "success"}
    assert task_states(single) == {"hero": "success"}
    result = xcoms(batch)[("generate", "return_value")]
    yield {
        "root": root,
        "batch": batch,
        "single": single,
        "manifest": pd.read_parquet(result["manifest_uri"]),
        "batch_xcoms": xcoms(batch),
        "single_xcoms": xcoms(single),
    }


@pytest.fixture(scope="module")
def client(runs: dict) -> Iterator[Any]:
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from fastapi.testclient import TestClient

    env = {
        "AIRFLOW__CORE__AUTH_MANAGER": "tests.ui.auth.DagScopedAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": "imagen-ui-tests-" + "s" * 64,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    purge_cached_app()
    try:
        with TestClient(create_app("core")) as test_client:
            yield test_client
    finally:
        purge_cached_app()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def token(username: str, role: str | None) -> dict[str, str]:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    jwt = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))
    return {"Authorization": f"Bearer {jwt}"}


def run_path(dag_run: Any) -> str:
    return f"/imagen/api/dags/{dag_run.dag_id}/runs/{quote(dag_run.run_id, safe='')}"


def completed_sha(runs: dict) -> str:
    manifest = runs["manifest"]
    return str(manifest.loc[manifest["status"] == "completed", "sha256"].iloc[0])


def endpoints(runs: dict) -> list[str]:
    batch = runs["batch"]
    sha = completed_sha(runs)
    return [
        f"/imagen/dags/{batch.dag_id}/runs/{quote(batch.run_id, safe='')}/gallery",
        run_path(batch),
        f"{run_path(batch)}/images/{sha}",
        f"{run_path(batch)}/thumbs/{sha}",
    ]


class TestWhoMayRead:
    def test_every_endpoint_refuses_a_request_without_a_user(self, client: Any, runs: dict) -> None:
        for path in [*endpoints(runs), "/imagen/spend", "/imagen/api/spend", "/imagen/static/cjk.ttf"]:
            reply = client.get(path)
            assert reply.status_code == 401, (path, reply.status_code)

    def test_a_forged_token_is_refused(self, client: Any, runs: dict) -> None:
        for path in endpoints(runs):
            reply = client.get(path, headers={"Authorization": "Bearer not.a.token"})
            assert reply.status_code in (401, 403), path

    def test_a_user_without_a_role_reads_no_run_and_no_spend(self, client: Any, runs: dict) -> None:
        for path in endpoints(runs):
            assert client.get(path, headers=token("nobody", None)).status_code == 403, path
        spend = client.get("/imagen/api/spend", headers=token("nobody", None))
        assert spend.status_code == 200 and spend.json()["credits"] == 0 and spend.json()["dags"] == []

    def test_a_reader_of_another_dag_cannot_read_this_one(self, client: Any, runs: dict) -> None:
        headers = token(f"only:{SINGLE_DAG}", "viewer")
        for path in endpoints(runs):
            assert client.get(path, headers=headers).status_code == 403, path
        assert client.get(run_path(runs["single"]), headers=headers).status_code == 200

    def test_spend_counts_only_the_dags_the_user_may_read(self, client: Any, runs: dict) -> None:
        spend = client.get("/imagen/api/spend", headers=token(f"only:{SINGLE_DAG}", "viewer")).json()
        assert [d["dag_id"] for d in spend["dags"]] == [SINGLE_DAG]
        assert spend["credits"] == 46


class TestRunData:
    def test_the_run_lists_every_manifest_row_with_status_size_and_credits(
        self, client: Any, runs: dict
    ) -> None:
        body = client.get(run_path(runs["batch"]), headers=token("admin", "admin")).json()
        tiles = {t["prompt_id"]: t for t in body["tiles"]}
        assert set(tiles) == {r["prompt_id"] for r in ROWS}
        assert {k: t["status"] for k, t in tiles.items()} == {
            "tea-1": "completed",
            "tea-2": "completed",
            "pan-1": "completed",
            "pan-2": "completed",
            "fake-1": "moderated",
            "bad-1": "invalid",
        }
        assert tiles["tea-2"]["prompt"] == "一只陶瓷茶壶，柔和的晨光" and tiles["tea-2"]["size"] == "16:9"
        assert tiles["pan-1"]["width"] == 768 and tiles["pan-1"]["height"] == 1408
        assert all(t["key"] for k, t in tiles.items() if t["status"] == "completed")
        assert tiles["fake-1"]["key"] is None and tiles["bad-1"]["key"] is None
        header = body["header"]
        assert header["counts"] == {"completed": 4, "moderated": 1, "invalid": 1}
        assert header["credits"] == 4 * 46 and header["usd"] == 0.184
        assert header["images"] == 4 and header["rows"] == 6
        assert header["wall_seconds"] is not None and header["wall_seconds"] >= 0
        assert body["sizes"] == {"16:9": 1, "1:1": 4, "9:16": 1}
        assert body["problems"] == []

    def test_no_storage_location_task_id_or_key_reaches_the_page(
        self, client: Any, runs: dict, emulator_server: Any
    ) -> None:
        headers = token("admin", "admin")
        text = client.get(run_path(runs["batch"]), headers=headers).text
        page = client.get(endpoints(runs)[0], headers=headers).text
        reapi_task_ids = [t for t in runs["manifest"]["task_id"].dropna()]
        assert reapi_task_ids
        for secret in [str(runs["root"]), emulator_server.api_key, "http://", "https://", *reapi_task_ids]:
            assert secret not in text, secret
            assert secret not in page, secret

    def test_the_page_draws_chinese_prompts_with_the_bundled_font(self, client: Any, runs: dict) -> None:
        """The page names the font for CJK characters only, and the font it names is served (a TrueType
        file), so a prompt in Chinese reads as text where the browser's machine has no CJK font."""
        headers = token("admin", "admin")
        page = client.get(endpoints(runs)[0], headers=headers)
        assert "font-src 'self'" in page.headers["Content-Security-Policy"]
        assert "/imagen/static/cjk.ttf" in page.text and "unicode-range:U+3000-303F,U+4E00-9FFF" in page.text
        font = client.get("/imagen/static/cjk.ttf", headers=headers)
        assert font.status_code == 200 and font.headers["content-type"] == "font/ttf"
        assert font.content[:4] == b"\x00\x01\x00\x00"  # the TrueType signature

    def test_the_single_image_task_is_a_tile_of_its_run(self, client: Any, runs: dict) -> None:
        body = client.get(run_path(runs["single"]), headers=token("admin", "admin")).json()
        (tile,) = body["tiles"]
        assert tile["status"] == "completed" and tile["size"] == "16:9" and tile["credits"] == 46
        assert tile["prompt"] == "一只陶瓷茶壶，柔和的晨光，产品摄影"
        assert tile["key"] == runs["single_xcoms"][("hero", "return_value")]["sha256"]

    def test_an_unknown_run_is_not_found(self, client: Any, runs: dict) -> None:
        reply = client.get(f"/imagen/api/dags/{BATCH_DAG}/runs/nope", headers=token("admin", "admin"))
        assert reply.status_code == 404

    def test_spend_shows_each_dag_and_the_day_with_its_shares(self, client: Any, runs: dict) -> None:
        spend = client.get("/imagen/api/spend?days=7", headers=token("admin", "admin")).json()
        dags = {d["dag_id"]: d for d in spend["dags"]}
        assert dags[BATCH_DAG]["credits"] == 184 and dags[BATCH_DAG]["images"] == 4
        assert dags[SINGLE_DAG]["credits"] == 46 and dags[SINGLE_DAG]["runs"] == 1
        day = runs["batch"].start_date.date().isoformat()
        (today,) = [d for d in spend["days"] if d["day"] == day]
        assert today["credits"] >= 230 and today["moderated"] >= 1 and 0 < today["moderated_share"] < 1
        assert client.get("/imagen/api/spend?days=0", headers=token("admin", "admin")).status_code == 422


class TestImages:
    def test_a_listed_image_is_served_whole_and_verified(self, client: Any, runs: dict) -> None:
        sha = completed_sha(runs)
        reply = client.get(f"{run_path(runs['batch'])}/images/{sha}", headers=token("admin", "admin"))
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
        assert hashlib.sha256(reply.content).hexdigest() == sha

    def test_a_thumbnail_is_made_once_and_cached_beside_the_images(self, client: Any, runs: dict) -> None:
        manifest = runs["manifest"]
        row = manifest[manifest["status"] == "completed"].iloc[1]
        cached = Path(row["image_uri"]).parent / "_thumbs" / f"{row['sha256']}.jpg"
        url = f"{run_path(runs['batch'])}/thumbs/{row['sha256']}"
        first = client.get(url, headers=token("admin", "admin"))
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(first.content)) as thumb:
            assert max(thumb.size) <= 384 and thumb.width > 0
        assert cached.read_bytes() == first.content
        cached.write_bytes(first.content + b"")  # a later request reads the cache, not the PNG
        stamp = cached.stat().st_mtime_ns
        assert client.get(url, headers=token("admin", "admin")).content == first.content
        assert cached.stat().st_mtime_ns == stamp


class TestNoPathReachesTheFileSystem:
    @pytest.mark.parametrize(
        "name",
        [
            "..%2F..%2F..%2Fetc%2Fpasswd",
            "%2Fetc%2Fpasswd",
            "..",
            "%2e%2e",
            "etc%252Fpasswd",
            "0" * 63,
            "G" * 64,
            "A" * 64,
        ],
    )
    def test_a_name_that_is_not_a_sha256_is_refused(self, client: Any, runs: dict, name: str) -> None:
        for kind in ("images", "thumbs"):
            reply = client.get(f"{run_path(runs['batch'])}/{kind}/{name}", headers=token("admin", "admin"))
            # A bare ".." is resolved by the client to the run's data, one level up: still no file.
            if name == "..":
                assert reply.headers["content-type"] == "application/json"
            else:
                assert reply.status_code in (404, 422), (name, reply.status_code)
            assert not reply.headers.get("content-type", "").startswith("image/")
            assert b"root:" not in reply.content

    def test_another_dags_image_is_not_served_under_this_dag(self, client: Any, runs: dict) -> None:
        other = runs["single_xcoms"][("hero", "return_value")]["sha256"]
        reply = client.get(f"{run_path(runs['batch'])}/images/{other}", headers=token("admin", "admin"))
        assert reply.status_code == 404

    def test_a_sha256_not_in_the_manifest_is_not_served(self, client: Any, runs: dict) -> None:
        unlisted = hashlib.sha256(b"/etc/passwd").hexdigest()
        reply = client.get(f"{run_path(runs['batch'])}/images/{unlisted}", headers=token("admin", "admin"))
        assert reply.status_code == 404

    def test_a_traversal_in_the_dag_or_run_id_finds_nothing(self, client: Any, runs: dict) -> None:
        sha = completed_sha(runs)
        for path in [
            f"/imagen/api/dags/..%2F..%2Fetc/runs/x/images/{sha}",
            f"/imagen/api/dags/{BATCH_DAG}/runs/..%2F..%2F/images/{sha}",
            f"/imagen/api/dags/{BATCH_DAG}/runs/{quote(runs['single'].run_id, safe='')}%2F..%2F/images/{sha}",
        ]:
            assert client.get(path, headers=token("admin", "admin")).status_code == 404, path

    def test_a_listed_file_replaced_by_a_symlink_is_refused(self, client: Any, runs: dict) -> None:
        manifest = runs["manifest"]
        row = manifest[manifest["status"] == "completed"].iloc[2]
        listed = Path(row["image_uri"])
        moved = listed.with_name("moved.png")
        shutil.move(listed, moved)
        listed.symlink_to(moved)  # same bytes, same sha256: only the symlink is wrong
        try:
            reply = client.get(
                f"{run_path(runs['batch'])}/images/{row['sha256']}", headers=token("admin", "admin")
            )
            assert reply.status_code == 410
        finally:
            listed.unlink()
            shutil.move(moved, listed)

    def test_a_listed_file_that_changed_is_refused(self, client: Any, runs: dict) -> None:
        manifest = runs["manifest"]
        row = manifest[manifest["status"] == "completed"].iloc[3]
        listed = Path(row["image_uri"])
        original = listed.read_bytes()
        listed.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
        try:
            reply = client.get(
                f"{run_path(runs['batch'])}/images/{row['sha256']}", headers=token("admin", "admin")
            )
            assert reply.status_code == 410 and b"root:" not in reply.content
        finally:
            listed.write_bytes(original)


class TestExtraLinks:
    def test_the_batch_task_links_to_its_runs_gallery(self, runs: dict) -> None:
        from airflow_provider_imagen.ui.links import gallery_url

        link = runs["batch_xcoms"][("generate", "_link_ImagenGalleryLink")]
        assert link == gallery_url(BATCH_DAG, runs["batch"].run_id)
        assert link.endswith(
            f"/dags/{BATCH_DAG}/runs/{quote(runs['batch'].run_id, safe='')}/plugin/imagen-gallery"
        )

    def test_the_single_image_task_links_to_its_runs_gallery(self, runs: dict) -> None:
        from airflow_provider_imagen.ui.links import gallery_url

        link = runs["single_xcoms"][("hero", "_link_ImagenImageGalleryLink")]
        assert link == gallery_url(SINGLE_DAG, runs["single"].run_id)
