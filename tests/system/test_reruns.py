"""Rerunning a date, every way Airflow 3 offers, on a real scheduler and triggerer: the example DAGs as they
ship (``tests/system/dags/imagen_examples.py``), the emulator's ledger as the bill.

After the first run of a date, one prompt is edited before each rerun; each rerun must send exactly one
POST, with the new text, and keep everything that was paid for: every earlier image on disk with its
sha256, every manifest's rows, the index and the published manifest pointing at files that list their
images. A last rerun with nothing edited sends nothing. The routes, and what Airflow 3.3.2 does with the
run (its run id, its conf), are what docs/how-to/backfill.md and docs/journal.md state:

- ``airflow backfill create --reprocess-behavior none|failed`` over a date whose run succeeded: no run;
- ``--reprocess-behavior completed``: the date's existing run is cleared, under the same run id, with the
  new ``--dag-run-conf``;
- clearing the run, or one task and what follows it: the same run id and conf;
- a new manual run: a new run id (Airflow allows one run per logical date, so it has no logical date and
  the backfill DAG takes the date from its ``ds`` param).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pandas as pd
import pytest

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.batch.manifest import read_manifest
from tests.system.stack import BIN, REPO, Stack, wait_until

pytestmark = pytest.mark.system

BACKFILL = "imagen_prompt_backfill"
NIGHTLY = "imagen_catalog_nightly"
DS = "2026-01-02"
DATA = REPO / "dags" / "data"
KEY = ["prompt_id", "size", "variation"]
#: A run of the example DAGs (4 tasks, ~1 s renders) takes 15-40 s on a busy 2-core machine.
RUN_TIMEOUT = 240.0


# -- Airflow, as a user drives it -------------------------------------------------------------------


def api(stack: Stack, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{stack.api_url}/api/v2{path}", json=body, timeout=120)


def cli(stack: Stack, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "airflow"), *args],
        env=stack.env,
        cwd=stack.home,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def wait_for_dag(stack: Stack, dag_id: str) -> None:
    wait_until(
        lambda: stack.sql(
            "SELECT 1 FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
            "WHERE d.dag_id = ? AND NOT d.is_paused AND NOT d.is_stale",
            dag_id,
        ),
        180,
        f"{dag_id} to be parsed",
        interval=1.0,
    )


def runs_of(stack: Stack, dag_id: str) -> list[dict[str, Any]]:
    return stack.sql(
        "SELECT run_id, run_type, state, clear_number, conf, logical_date, backfill_id FROM dag_run "
        "WHERE dag_id = ? ORDER BY id",
        dag_id,
    )


def run_row(stack: Stack, dag_id: str, run_id: str) -> dict[str, Any]:
    return next(r for r in runs_of(stack, dag_id) if r["run_id"] == run_id)


def task_states(stack: Stack, dag_id: str, run_id: str) -> dict[str, str]:
    rows = stack.sql(
        "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id
    )
    return {r["task_id"]: r["state"] for r in rows}


def xcom(stack: Stack, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
    rows = stack.sql(
        "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND key = ?",
        dag_id,
        run_id,
        task_id,
        key,
    )
    if not rows:
        return None
    value = rows[0]["value"]
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def close_backfills(stack: Stack, dag_id: str) -> None:
    """Close the DAG's finished backfills, so that it can have a new one (one active at a time).

    The scheduler closes a backfill whose runs ended every 30 s; cancelling it does the same at once
    (it fails only runs still queued, and there are none).
    """
    for row in stack.sql("SELECT id FROM backfill WHERE dag_id = ? AND completed_at IS NULL", dag_id):
        busy = stack.sql(
            "SELECT r.run_id FROM backfill_dag_run b JOIN dag_run r ON r.id = b.dag_run_id "
            "WHERE b.backfill_id = ? AND r.state NOT IN ('success', 'failed')",
            row["id"],
        )
        assert not busy, f"backfill {row['id']} still has runs going: {busy}"
        reply = api(stack, "PUT", f"/backfills/{row['id']}/cancel")
        assert reply.status_code in (200, 409), reply.text  # 409: the scheduler closed it meanwhile


def wait_success(stack: Stack, dag_id: str, run_id: str) -> None:
    state = stack.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT)
    assert state == "success", (
        state,
        task_states(stack, dag_id, run_id),
        stack.task_logs(dag_id, run_id)[-4000:],
    )


def backfill_api(stack: Stack, behavior: str, conf: dict[str, Any]) -> httpx.Response:
    close_backfills(stack, BACKFILL)
    return api(
        stack,
        "POST",
        "/backfills",
        {
            "dag_id": BACKFILL,
            "from_date": f"{DS}T00:00:00Z",
            "to_date": f"{DS}T00:00:00Z",
            "reprocess_behavior": behavior,
            "dag_run_conf": conf,
            "max_active_runs": 1,
        },
    )


# -- what is on disk, and what must stay there ------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Snapshot:
    """Every image (path → sha256) and every manifest (path → rows) under an output root."""

    images: dict[Path, str] = field(default_factory=dict)
    manifests: dict[Path, pd.DataFrame] = field(default_factory=dict)

    @classmethod
    def of(cls, root: Path) -> Snapshot:
        snap = cls()
        for path in sorted(root.rglob("*.png")):
            if not path.name.startswith("_"):
                snap.images[path] = sha256(path)
        for path in sorted(root.rglob("*.parquet")):
            if "manifests" in path.parts:
                snap.manifests[path] = read_manifest(str(path))
        return snap


@dataclass
class Bill:
    """The emulator's tasks before a rerun: what it created since is what the rerun paid for."""

    stack: Stack
    before: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.before = {t["id"] for t in self.stack.emulator.tasks()}

    def new(self) -> list[dict[str, Any]]:
        return [t for t in self.stack.emulator.tasks() if t["id"] not in self.before]


def edit_prompt(table: Path, prompt_id: str, text: str) -> None:
    frame = pd.read_parquet(table)
    assert (frame["prompt_id"] == prompt_id).sum() == 1
    frame.loc[frame["prompt_id"] == prompt_id, "prompt"] = text
    frame.to_parquet(table, index=False)


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def check_index(index_path: Path, manifests_root: Path) -> pd.DataFrame:
    """Every index entry's image is on disk with its sha256, and its manifest lists it."""
    from airflow_provider_imagen.publish.index import read_index

    entries = read_index(str(index_path)).entries
    for entry in entries.itertuples():
        if entry.status != "completed":
            continue
        assert sha256(local(entry.image_uri)) == entry.sha256, entry
        listed = read_manifest(str(manifests_root / entry.manifest_uri))
        assert entry.task_id in set(listed["task_id"]), (entry, listed[[*KEY, "task_id"]])
    return entries.set_index(KEY)


def check_rerun(
    before: Snapshot, after: Snapshot, paid: list[dict[str, Any]], prompt_id: str, text: str, sizes: int
) -> set[str]:
    """Exactly ``sizes`` POSTs, all of the edited text; nothing paid for before is lost or changed.
    Returns the new tasks' ids."""
    assert sorted(t["prompt"] for t in paid) == [text] * sizes, paid
    for path, digest in before.images.items():
        assert path.exists() and sha256(path) == digest, f"a paid image was lost or overwritten: {path}"
    for path, rows in before.manifests.items():
        assert path in after.manifests, f"a manifest disappeared: {path}"
        kept = after.manifests[path].set_index(KEY)
        missing = set(rows.set_index(KEY).index) - set(kept.index)
        assert not missing, f"{path} lost rows {missing}: {len(rows)} rows before, {len(kept)} after"
    new_ids = {t["id"] for t in paid}
    for rows in after.manifests.values():
        mine = rows[rows["task_id"].isin(new_ids)]
        for row in mine.itertuples():
            assert row.prompt_id == prompt_id and row.prompt == text and row.status == "completed", row
            image = local(row.image_uri)
            assert image not in before.images, f"the new image overwrote an older one: {image}"
            assert sha256(image) == row.sha256, row
            # A row's credits are every POST of its image in this run's journal: the edited prompt's
            # and, in a run id reused by the rerun, the old prompt's before it.
            assert row.credits >= CREDITS_PER_IMAGE and row.credits % CREDITS_PER_IMAGE == 0, row
    return new_ids


def check_bill(stack: Stack, run_manifests: Path) -> int:
    """The run manifests add up to the emulator's bill: every paid POST is in one row's credits."""
    tasks = stack.emulator.tasks()
    ledger = stack.emulator.ledger()
    credits = sum(int(read_manifest(str(p))["credits"].sum()) for p in run_manifests.rglob("*.parquet"))
    assert credits == CREDITS_PER_IMAGE * len(tasks) == ledger["net_credits"], (credits, len(tasks), ledger)
    return credits


@pytest.fixture
def timings() -> Iterator[dict[str, float]]:
    spent: dict[str, float] = {}
    yield spent
    print("\n" + "\n".join(f"{seconds:6.1f} s  {what}" for what, seconds in spent.items()))


# -- the backfill DAG --------------------------------------------------------------------------------


def test_backfill_reruns_of_a_date_pay_once_for_an_edited_prompt_and_lose_nothing(
    stack: Stack, workdir: Path, timings: dict[str, float]
) -> None:
    wait_for_dag(stack, BACKFILL)
    # Inputs under in/, outputs under out/: the session's layout (test_security checks every file).
    dataset = workdir / "in" / "dataset"
    shutil.copytree(DATA / "prompt_dataset" / f"ds={DS}", dataset / f"ds={DS}")
    part = dataset / f"ds={DS}" / "part-000.parquet"
    out = workdir / "out" / "backfill"
    conf = {"dataset": str(dataset), "output_root": str(out)}
    partition = out / "partitions" / f"ds={DS}"
    published = out / "manifests" / f"ds={DS}" / "manifest.parquet"
    sizes = pd.read_parquet(part).set_index("prompt_id")["size"]
    assert all(isinstance(s, str) for s in sizes), "one image per prompt in the sample: one POST per edit"

    # The first run of the date.
    started = time.monotonic()
    reply = backfill_api(stack, "none", conf)
    assert reply.status_code == 200, reply.text
    (run,) = [r for r in runs_of(stack, BACKFILL) if r["logical_date"].startswith(DS)]
    run_id = run["run_id"]
    assert run_id == f"backfill__{DS}T00:00:00+00:00" and run["run_type"] == "backfill"
    wait_success(stack, BACKFILL, run_id)
    timings["first backfill run (6 images)"] = time.monotonic() - started
    assert len(stack.emulator.tasks()) == 6
    assert len(read_manifest(str(published))) == 6
    assert check_bill(stack, partition / "manifests") == 6 * CREDITS_PER_IMAGE
    check_index(partition / "index" / "index.parquet", partition / "manifests")

    # none / failed over a date whose run succeeded: the backfill is made, with no run in it.
    bill = Bill(stack)
    for behavior in ("none", "failed"):
        reply = backfill_api(stack, behavior, conf)
        assert reply.status_code == 200, (behavior, reply.text)
        made = stack.sql(
            "SELECT dag_run_id, exception_reason FROM backfill_dag_run WHERE backfill_id = ?",
            reply.json()["id"],
        )
        assert made == [{"dag_run_id": None, "exception_reason": "already exists"}], (behavior, made)
        assert run_row(stack, BACKFILL, run_id)["clear_number"] == 0
    assert bill.new() == []

    def rerun(route: str, prompt_id: str, action: Any) -> str:
        text = f"{route}: a hand-thrown ceramic vase of dried lavender, soft window light ({prompt_id})"
        edit_prompt(part, prompt_id, text)
        before, bill = Snapshot.of(out), Bill(stack)
        started = time.monotonic()
        rerun_id = action()
        wait_success(stack, BACKFILL, rerun_id)
        timings[route] = time.monotonic() - started
        after = Snapshot.of(out)
        new_ids = check_rerun(before, after, bill.new(), prompt_id, text, 1)
        assert len(after.images) == len(before.images) + 1
        frame = read_manifest(str(published)).set_index("prompt_id")
        assert len(frame) == 6 and frame.loc[prompt_id, "task_id"] in new_ids
        assert frame.loc[prompt_id, "prompt"] == text
        index = check_index(partition / "index" / "index.parquet", partition / "manifests")
        entry = index.loc[(prompt_id, sizes[prompt_id], 0)]
        assert entry["task_id"] in new_ids and entry["prompt"] == text
        assert local(entry["image_uri"]) == local(frame.loc[prompt_id, "image_uri"])
        assert xcom(stack, BACKFILL, rerun_id, "generate")["this_try"] == {
            "submitted": 1,
            "reattached": 0,
            "credits": CREDITS_PER_IMAGE,
        }
        plan = xcom(stack, BACKFILL, rerun_id, "plan", "plan")
        assert (plan["images"], plan["unchanged"]) == (1, 5), plan
        if rerun_id == run_id:  # the same run manifest: its row names the image it replaced
            own = next(p for p in before.manifests if f"run_id={quote(run_id, safe='-_.@,')}" in str(p))
            old = before.manifests[own].set_index("prompt_id").loc[prompt_id]
            new = after.manifests[own].set_index("prompt_id").loc[prompt_id]
            assert f"its image stays at {old['image_uri']}" in new["error_message"], new["error_message"]
            assert sha256(local(old["image_uri"])) == old["sha256"]
        check_bill(stack, partition / "manifests")
        return rerun_id

    # 1. backfill create --reprocess-behavior completed, with a conf (as the guide says): the CLI. The
    # conf given replaces the run's; a budget that fits is added to show it.
    conf = {**conf, "max_credits": 10 * CREDITS_PER_IMAGE}

    def reprocess() -> str:
        close_backfills(stack, BACKFILL)
        cli(
            stack,
            "backfill",
            "create",
            "--dag-id",
            BACKFILL,
            "--from-date",
            DS,
            "--to-date",
            DS,
            "--reprocess-behavior",
            "completed",
            "--dag-run-conf",
            json.dumps(conf),
        )
        row = run_row(stack, BACKFILL, run_id)
        assert row["clear_number"] == 1 and row["state"] in ("queued", "running"), row
        return run_id

    assert rerun("backfill --reprocess-behavior completed", "q-0008", reprocess) == run_id
    assert len(runs_of(stack, BACKFILL)) == 1  # the same run, cleared: same run id, same journal
    assert json.loads(run_row(stack, BACKFILL, run_id)["conf"]) == conf

    # 2. Clear the whole run (the UI's "Clear" on a DAG run).
    def clear_run() -> str:
        reply = api(
            stack, "POST", f"/dags/{BACKFILL}/dagRuns/{quote(run_id, safe='')}/clear", {"dry_run": False}
        )
        assert reply.status_code == 200, reply.text
        return run_id

    assert rerun("clear the run", "q-0009", clear_run) == run_id

    # 3. Clear one task and everything after it.
    def clear_task() -> str:
        reply = api(
            stack,
            "POST",
            f"/dags/{BACKFILL}/clearTaskInstances",
            {
                "dry_run": False,
                "dag_run_id": run_id,
                "task_ids": ["plan"],
                "include_downstream": True,
                "only_failed": False,
                "reset_dag_runs": True,
            },
        )
        assert reply.status_code == 200, reply.text
        return run_id

    assert rerun("clear the task plan (+ downstream)", "q-0010", clear_task) == run_id
    row = run_row(stack, BACKFILL, run_id)
    assert row["clear_number"] == 3 and json.loads(row["conf"]) == conf, row

    # 3b. Clear generate alone: it works from its run's plan (q-0010, made a moment ago), re-attaches
    # to what that plan's try paid, and says so: this try sent nothing and paid nothing.
    before, bill = Snapshot.of(out), Bill(stack)
    started = time.monotonic()
    reply = api(
        stack,
        "POST",
        f"/dags/{BACKFILL}/clearTaskInstances",
        {"dry_run": False, "dag_run_id": run_id, "task_ids": ["generate"], "only_failed": False},
    )
    assert reply.status_code == 200, reply.text
    wait_success(stack, BACKFILL, run_id)
    timings["clear generate alone (nothing to send)"] = time.monotonic() - started
    assert bill.new() == []
    this_try = xcom(stack, BACKFILL, run_id, "generate")["this_try"]
    assert this_try == {"submitted": 0, "reattached": 1, "credits": 0}, this_try
    folder = stack.home / "logs" / f"dag_id={BACKFILL}" / f"run_id={run_id}" / "task_id=generate"
    last = max(folder.glob("attempt=*.log"), key=lambda p: int(p.stem.split("=")[1])).read_text()
    assert "0 request(s) sent, 1 re-attached to tasks paid earlier; paid now 0 credits" in last, last[-3000:]
    after = Snapshot.of(out)
    assert after.images == before.images
    for path, rows in before.manifests.items():
        pd.testing.assert_frame_equal(after.manifests[path], rows)
    check_bill(stack, partition / "manifests")

    # 4. A new manual run of the date: one run per logical date, so it has none and names the date.
    reply = api(stack, "POST", f"/dags/{BACKFILL}/dagRuns", {"logical_date": f"{DS}T00:00:00Z", "conf": conf})
    assert reply.status_code == 409, reply.text

    def manual() -> str:
        return stack.trigger(BACKFILL, **conf, ds=DS)

    manual_id = rerun("a new manual run (ds param)", "q-0011", manual)
    assert manual_id != run_id and manual_id.startswith("manual__")
    run_manifests = sorted((partition / "manifests").rglob("*.parquet"))
    assert len(run_manifests) == 2

    # 5. Nothing edited: a last rerun sends nothing, rewrites no manifest, publishes nothing.
    before, bill = Snapshot.of(out), Bill(stack)
    data = {path: path.read_bytes() for path in before.manifests}
    started = time.monotonic()
    reply = backfill_api(stack, "completed", conf)
    assert reply.status_code == 200, reply.text
    wait_success(stack, BACKFILL, run_id)
    timings["unchanged: backfill --reprocess-behavior completed"] = time.monotonic() - started
    assert bill.new() == []
    assert task_states(stack, BACKFILL, run_id)["generate"] == "skipped"
    assert {path: path.read_bytes() for path in Snapshot.of(out).manifests} == data
    assert len(stack.emulator.tasks()) == 6 + 4


# -- the nightly DAG ---------------------------------------------------------------------------------


def test_nightly_reruns_pay_once_for_an_edited_product_and_lose_nothing(
    stack: Stack, workdir: Path, timings: dict[str, float]
) -> None:
    wait_for_dag(stack, NIGHTLY)
    catalog = workdir / "in" / "catalog.parquet"
    catalog.parent.mkdir()
    frame = pd.read_parquet(DATA / "catalog" / "catalog.parquet").head(3)
    frame.to_parquet(catalog, index=False)
    surfaces = frame.set_index("prompt_id")["surfaces"].map(len)
    out = workdir / "out" / "catalog"
    conf = {"catalog": str(catalog), "output_root": str(out)}

    def index() -> pd.DataFrame:
        return check_index(out / "index" / "index.parquet", out / "manifests")

    started = time.monotonic()
    first = stack.trigger(NIGHTLY, **conf)
    wait_success(stack, NIGHTLY, first)
    timings[f"first nightly run ({surfaces.sum()} images)"] = time.monotonic() - started
    assert len(stack.emulator.tasks()) == surfaces.sum()
    index()

    def rerun(route: str, prompt_id: str, action: Any) -> str:
        text = f"{route}: a linen apron on a hook, kitchen, morning light ({prompt_id})"
        edit_prompt(catalog, prompt_id, text)
        before, bill = Snapshot.of(out), Bill(stack)
        started = time.monotonic()
        run_id = action()
        wait_success(stack, NIGHTLY, run_id)
        timings[route] = time.monotonic() - started
        after = Snapshot.of(out)
        new_ids = check_rerun(before, after, bill.new(), prompt_id, text, surfaces[prompt_id])
        entries = index().loc[prompt_id]
        assert set(entries["task_id"]) == new_ids and (entries["prompt"] == text).all()
        this_try = xcom(stack, NIGHTLY, run_id, "generate")["this_try"]
        assert this_try == {
            "submitted": surfaces[prompt_id],
            "reattached": 0,
            "credits": CREDITS_PER_IMAGE * surfaces[prompt_id],
        }, this_try
        latest = json.loads((out / "latest.json").read_text())
        assert latest["run_id"] == run_id
        assert set(new_ids) <= set(read_manifest(latest["manifest_uri"])["task_id"])
        check_bill(stack, out / "manifests")
        return run_id

    products = list(surfaces.index)
    # 1. The next night: a new run, a new run id, a new journal; the index says what changed.
    second = rerun("a new manual run", products[1], lambda: stack.trigger(NIGHTLY, **conf))
    assert second != first

    # 2. Clear that run: the same run id, so the same journal and the same run manifest (merged).
    def clear_run() -> str:
        reply = api(
            stack, "POST", f"/dags/{NIGHTLY}/dagRuns/{quote(second, safe='')}/clear", {"dry_run": False}
        )
        assert reply.status_code == 200, reply.text
        return second

    assert rerun("clear the run", products[2], clear_run) == second
    merged = read_manifest(
        str(
            out
            / "manifests"
            / f"dag_id={NIGHTLY}"
            / f"run_id={quote(second, safe='-_.@,')}"
            / "generate.parquet"
        )
    )
    assert set(merged["prompt_id"]) == {products[1], products[2]}

    # 3. Nothing edited: the next night sends nothing and skips generate.
    bill = Bill(stack)
    started = time.monotonic()
    last = stack.trigger(NIGHTLY, **conf)
    wait_success(stack, NIGHTLY, last)
    timings["unchanged: a new manual run"] = time.monotonic() - started
    assert bill.new() == [] and task_states(stack, NIGHTLY, last)["generate"] == "skipped"
    assert len(stack.emulator.tasks()) == surfaces.sum() + surfaces[products[1]] + surfaces[products[2]]


def test_the_example_dags_run_from_the_system_dags_folder_and_never_on_their_own(stack: Stack) -> None:
    """Task runners parse the wrapper (its end date, its fast first poll), not the example files, and
    the scheduler starts no run of them: every run of these tests is one the test made."""
    for dag_id in (BACKFILL, NIGHTLY):
        wait_for_dag(stack, dag_id)
        (row,) = stack.sql("SELECT relative_fileloc FROM dag WHERE dag_id = ?", dag_id)
        assert row["relative_fileloc"] == "imagen_examples.py", row
    scheduled = stack.sql(
        "SELECT dag_id, run_id FROM dag_run WHERE dag_id IN (?, ?) AND run_type = 'scheduled'",
        BACKFILL,
        NIGHTLY,
    )
    assert scheduled == []
