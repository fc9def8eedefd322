"""What every system test checks: the manifest against the emulator's ledger, and artefacts for secrets.

The emulator is the bill: ``/_emulator/tasks`` lists every task it created (each one charged 46 credits
at submit, refunded once if it failed), ``/_emulator/ledger`` the totals. A manifest is right when
- no prompt was paid for twice (every test uses one distinct prompt per row);
- every task the emulator created is accounted for by a manifest row: its ``task_id``, or an
  ``unknown_submit`` row for the same prompt (the POST created a task whose id never came back);
- the manifest's credits equal the ledger's net credits, except that an ``unknown_submit`` row whose POST
  created nothing (a 5xx answered before the task existed, or a crash before the POST left) is charged
  46 in the manifest and 0 in the ledger: the provider cannot tell the two apart, so it assumes the worst.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.batch.status import credits_for

#: Every status that means "this row is finished" for a run that was not cut short.
EMULATOR_TO_MANIFEST = {"completed": "completed", "failed": "failed", "moderated": "moderated"}
#: A signed media URL of the emulator, or just its signature parameter.
SIGNED_URL = re.compile(rb"_emulator/media/task_[0-9a-f]+\.png\?|[?&]sig=[0-9a-f]{16,}")


def write_table(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows)).to_parquet(path)
    return str(path)


def local_manifest(output: Path) -> pd.DataFrame:
    """The one manifest under a local output folder (found on disk: a failed task pushes no XCom)."""
    from airflow_provider_imagen.batch.manifest import read_manifest

    found = sorted((output / "manifests").rglob("*.parquet"))
    assert len(found) == 1, f"expected one manifest under {output}, found {found}"
    return read_manifest(str(found[0]))


def s3_objects(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """key → size of every object under ``prefix``."""
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = obj["Size"]
    return found


def s3_manifest(client: Any, bucket: str, prefix: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    keys = [k for k in s3_objects(client, bucket, prefix + "manifests/") if k.endswith(".parquet")]
    assert len(keys) == 1, f"expected one manifest under s3://{bucket}/{prefix}, found {keys}"
    body = client.get_object(Bucket=bucket, Key=keys[0])["Body"].read()
    return pq.read_table(io.BytesIO(body)).to_pandas()


def reconcile(
    manifest: pd.DataFrame, ledger: dict[str, Any], tasks: list[dict[str, Any]], tag: str
) -> dict[str, int]:
    """Assert the money rules of the module docstring; return the counts the docs table reports.

    ``tag`` starts every prompt of the test: tasks of another test's run (one that failed and was
    aborted) are left out, and the ledger totals are then checked only if there were none.
    """
    ours = [t for t in tasks if t["prompt"].startswith(tag)]
    by_prompt = Counter(t["prompt"] for t in ours)
    duplicates = {p: n for p, n in by_prompt.items() if n > 1}
    assert not duplicates, f"prompts paid for more than once: {duplicates}"
    net = CREDITS_PER_IMAGE * sum(1 for t in ours if not t["refunded"])
    if len(ours) == len(tasks):
        assert ledger["tasks_created"] == len(ours) and ledger["net_credits"] == net, ledger

    rows_by_task = {r.task_id: r for r in manifest.itertuples() if isinstance(r.task_id, str)}
    unknown = manifest[manifest["status"] == "unknown_submit"]
    unknown_prompts = set(unknown["prompt"])
    for task in ours:
        row = rows_by_task.get(task["id"])
        if row is None:
            assert task["prompt"] in unknown_prompts, f"a paid task is in no manifest row: {task}"
            continue
        assert row.prompt == task["prompt"] and row.size == task["size"], (row, task)
        expected = EMULATOR_TO_MANIFEST[task["outcome"]]
        if expected == "completed":
            assert row.status in ("completed", "expired", "download_failed"), (row, task)
        else:
            assert row.status == expected, (row, task)
    unknown_without_task = sum(1 for p in unknown_prompts if by_prompt[p] == 0)
    credits = int(manifest["credits"].sum())
    assert credits - CREDITS_PER_IMAGE * unknown_without_task == net, (credits, unknown_without_task, net)
    return {
        "rows": len(manifest),
        "tasks_created": len(ours),
        "unknown_submit": len(unknown),
        "unknown_without_task": unknown_without_task,
        "manifest_credits": credits,
        "ledger_net_credits": net,
    }


def leaks(paths: Iterable[Path], secrets: Iterable[bytes]) -> list[str]:
    """Return ``file: what`` for every file under ``paths`` holding a secret or a signed image URL."""
    needles = [s for s in secrets if s]
    found = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for needle in needles:
                if needle in data:
                    found.append(f"{path}: the secret {needle[:8]!r}…")
            match = SIGNED_URL.search(data)
            if match:
                found.append(f"{path}: signed URL {match.group()[:60]!r}")
    return found


def all_local_manifests(output: Path) -> list[pd.DataFrame]:
    """Every manifest under a local output folder (one per task instance that wrote one)."""
    from airflow_provider_imagen.batch.manifest import read_manifest

    return [read_manifest(str(p)) for p in sorted((output / "manifests").rglob("*.parquet"))]


def sha256_of(uri: str) -> str | None:
    """The sha256 of the local file ``uri`` names (``file://`` or a plain path), or None if it is gone."""
    import hashlib

    path = Path(uri.removeprefix("file://"))
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


#: Manifest statuses that say a charged, completed render was not filed as an image, and why.
NOT_FILED = ("unknown_submit", "expired", "download_failed", "wrong_size", "timeout")


def audit(
    manifests: Sequence[pd.DataFrame], ledger: dict[str, Any], tasks: list[dict[str, Any]], tag: str
) -> dict[str, Any]:
    """The money rules of a run (or of several runs of one table) that Airflow interrupted.

    ``manifests``: every manifest the runs wrote. Asserted, for the emulator tasks whose prompt starts
    with ``tag``:
    - no task is named by two rows; a row names a task of its own prompt and size;
    - a task no row names is accounted for: its prompt has an ``unknown_submit`` row, or its prompt's
      rows bill every charged task of that prompt (a resubmit, a raced stale try), or a row's
      ``error_message`` names it (an image of a prompt the user has since edited). So no prompt is
      charged twice unless a row says so;
    - a moderated or failed task's row keeps the API's code and message and costs nothing;
    - a charged, completed render is ``completed``, or its row says why not (a status of
      :data:`NOT_FILED` and an ``error_message``); an image of the wrong pixel size is never
      ``completed``; every file a row names exists with the row's sha256 (nothing overwrote it);
    - the manifests' credits are at least the ledger's net charge, and equal to it when no row is
      ``unknown_submit``.
    """
    ours = [t for t in tasks if t["prompt"].startswith(tag)]
    net = CREDITS_PER_IMAGE * sum(1 for t in ours if not t["refunded"])
    if len(ours) == len(tasks):
        assert ledger["net_credits"] == net, (ledger["net_credits"], net)
    rows = pd.concat(list(manifests), ignore_index=True) if manifests else pd.DataFrame()
    assert len(rows), "no manifest row at all"
    named = Counter(t for t in rows["task_id"] if isinstance(t, str))
    twice = {t: n for t, n in named.items() if n > 1}
    assert not twice, f"tasks named by more than one manifest row: {twice}"
    rows_by_task = {r.task_id: r for r in rows.itertuples() if isinstance(r.task_id, str)}
    # Rows whose bill includes a POST of unknown fate: unknown submits, and rows that also bill another
    # possibly-paid POST (after a crash or a resubmit) and say so in their message. A row that bills the
    # request an edited prompt replaced is known, not flagged, and stays checked to the credit.
    flagged = (
        rows["error_message"]
        .fillna("")
        .str.contains("other POST(s) of this request may have been paid", regex=False)
    )
    extra = (rows["credits"] > rows["status"].map(credits_for)) & flagged
    unknown = rows[(rows["status"] == "unknown_submit") | extra]
    messages = " ".join(m for m in rows["error_message"] if isinstance(m, str))
    billed = rows.groupby("prompt")["credits"].sum().to_dict()
    charged = Counter(t["prompt"] for t in ours if not t["refunded"])
    unnamed: list[dict[str, Any]] = []
    mirrored = 0
    for task in ours:
        row = rows_by_task.get(task["id"])
        if row is None:
            unnamed.append(task)
            prompt = task["prompt"]
            assert (
                prompt in set(unknown["prompt"])
                or billed.get(prompt, 0) >= CREDITS_PER_IMAGE * charged[prompt]
                or task["id"] in messages
            ), f"a paid task is in no manifest row, and no row bills it or names it: {task}"
            continue
        assert row.prompt == task["prompt"] and row.size == task["size"], (row, task)
        outcome = task["outcome"]
        if outcome in ("moderated", "failed"):
            code, message = {
                "moderated": (80006, "Request violates content policy"),
                "failed": (60001, "Generation failed"),
            }[outcome]
            assert (row.status, row.error_code, row.error_message) == (outcome, code, message), (row, task)
            continue
        if row.status == "completed":
            assert not task.get("wrong_size"), f"an image of the wrong pixel size was filed: {row}"
            mirrored += 1
        else:
            assert row.status in NOT_FILED and isinstance(row.error_message, str), (row, task)
    for row in rows.itertuples():
        if isinstance(row.image_uri, str):
            assert sha256_of(row.image_uri) == row.sha256, f"{row.image_uri} is gone or not {row.sha256}"
    credits = int(rows["credits"].sum())
    assert credits >= net, (credits, net)
    if not len(unknown):
        assert credits == net, (credits, net)
    by_prompt = Counter(t["prompt"] for t in ours)
    return {
        "rows": len(rows),
        "tasks_created": len(ours),
        "prompts_paid_more_than_once": sum(1 for n in by_prompt.values() if n > 1),
        "unknown_submit": len(unknown),
        "unnamed_tasks": len(unnamed),
        "mirrored": mirrored,
        "manifest_credits": credits,
        "ledger_net_credits": net,
    }
