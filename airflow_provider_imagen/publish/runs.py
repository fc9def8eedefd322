"""Plan and publish: the two steps the example DAGs run around the batch operator, and where files live.

Why: the batch operator turns one prompt table into images and one manifest, and its journal makes a
*retry* exactly-once. A job that runs every night (or once per date of a backfill) needs two more steps:
``plan`` before it, to send only what the index says is new or changed; ``publish`` after it, to fold
the manifest into the index, and to show the run as a contact sheet and a gallery.

Where the files live: :mod:`airflow_provider_imagen.publish.layout`; how a run is drawn:
:mod:`airflow_provider_imagen.publish.render`.

Invariants:
- the index is updated only from manifests, and absorbing one is idempotent (see
  :mod:`airflow_provider_imagen.publish.index`). Both steps first absorb every manifest of the layout
  that the index has not seen, so a publish that failed (or never ran) cannot make the next run pay for
  images that were already made;
- publish writes the index before it draws anything, and every file whole, so a failure while drawing
  loses no money and a retry redoes only the drawing;
- nothing here submits anything: a plan only writes a table; the batch operator is the only payer.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import ImagenInputError
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, DEFAULT_SIZE, MODEL, credits_to_usd
from airflow_provider_imagen.batch.manifest import (
    MANIFEST_COLUMNS,
    manifest_counts,
    manifest_credits,
    read_manifest,
    write_manifest,
)
from airflow_provider_imagen.batch.specs import summarize_invalid
from airflow_provider_imagen.batch.storage import as_path, write_whole
from airflow_provider_imagen.batch.table import ID_COLUMN, PROMPT_COLUMN, SIZE_COLUMN
from airflow_provider_imagen.publish.gallery import InvalidRow
from airflow_provider_imagen.publish.index import (
    KEY_COLUMNS,
    IndexState,
    absorb_manifest,
    plan_increment,
    read_index,
    write_index,
    write_plan_table,
)
from airflow_provider_imagen.publish.layout import (  # noqa: F401 - re-exported: where the DAGs import them
    CONTACT_SHEET_NAME,
    GALLERY_NAME,
    SOURCES_NAME,
    OutputLayout,
    manifest_key,
    manifest_version,
    partition_layout,
    run_manifests,
)
from airflow_provider_imagen.publish.render import THUMB, render_outputs

log = logging.getLogger(__name__)


def sync_index(layout: OutputLayout, *, model: str = MODEL) -> tuple[IndexState, list[str]]:
    """Absorb every run manifest the index has not seen as it is now; return the index and the names.

    Writes the index (whole) only when something was absorbed.
    """
    state = read_index(layout.index)
    absorbed: list[str] = []
    for path in run_manifests(layout):
        key = manifest_key(path)
        version = manifest_version(path)
        if state.has_absorbed(key, version):
            continue
        state = absorb_manifest(state, read_manifest(path), key, version=version, model=model)
        absorbed.append(key)
    if absorbed:
        write_index(state, layout.index)
        log.info("Index %s: absorbed %d manifest(s), %d entries.", layout.index, len(absorbed), len(state))
    return state, absorbed


# -- plan --------------------------------------------------------------------------------------------


def plan_run(
    table: pd.DataFrame,
    layout: OutputLayout,
    run_id: str,
    *,
    id_column: str = ID_COLUMN,
    prompt_column: str = PROMPT_COLUMN,
    size_column: str = SIZE_COLUMN,
    sizes: Sequence[str] | None = None,
    default_size: str = DEFAULT_SIZE,
    variations: int = 1,
    max_credits: int | None = None,
    retry_moderated: bool = False,
    on_invalid: str = "record",
    model: str = MODEL,
) -> dict[str, Any]:
    """Write the table of what ``run_id`` must generate and return the plan's numbers (JSON-safe).

    The to-generate table keeps every column of ``table`` and replaces ``size_column`` by the list of
    sizes still needed; give the batch operator the same ``size_column``. Invalid rows are never in it:
    they are written to ``invalid.parquet`` (and shown in the gallery), or fail the plan when
    ``on_invalid="fail"``. ``to_generate_uri`` is ``None`` when there is nothing to generate.

    :param max_credits: this run's budget; images beyond it wait for the next run (``deferred``).
    """
    if on_invalid not in ("record", "fail"):
        raise ValueError(f"on_invalid={on_invalid!r}: must be 'record' or 'fail'")
    state, recovered = sync_index(layout, model=model)
    if recovered:
        log.warning(
            "The index had not absorbed %d run manifest(s) as they are now (a publish failed or did not "
            "run): %s. Absorbed now, so their images are not paid for again.",
            len(recovered),
            ", ".join(recovered),
        )
    plan = plan_increment(
        table,
        state,
        id_column=id_column,
        prompt_column=prompt_column,
        size_column=size_column,
        sizes=sizes,
        default_size=default_size,
        variations=variations,
        model=model,
        retry_moderated=retry_moderated,
        max_images=None if max_credits is None else max(0, int(max_credits)) // CREDITS_PER_IMAGE,
    )
    if plan.invalid:
        message = summarize_invalid(plan.invalid)
        if on_invalid == "fail":
            raise ImagenInputError(f"the prompt table has invalid rows; nothing was planned.\n{message}")
        log.warning("%s", message)
    folder = layout.plan_dir(run_id)
    to_generate_uri = invalid_uri = None
    if plan.images:
        to_generate_uri = write_plan_table(
            plan.to_generate, folder / "to_generate.parquet", size_column=size_column
        )
    if plan.invalid:
        invalid = pd.DataFrame(
            {
                "row": [s.row for s in plan.invalid],
                "prompt_id": [s.prompt_id for s in plan.invalid],
                "size": [s.size for s in plan.invalid],
                "reason": [s.invalid_reason for s in plan.invalid],
            }
        ).drop_duplicates(["row", "reason"])
        buffer = invalid.to_parquet(index=False)
        write_whole(folder / "invalid.parquet", buffer)
        invalid_uri = str(folder / "invalid.parquet")
    summary = {
        "run_id": run_id,
        **plan.counts(),
        "recovered_manifests": len(recovered),
        "index_entries": len(state),
        "to_generate_uri": to_generate_uri,
        "invalid_uri": invalid_uri,
    }
    write_whole(folder / "plan.json", json.dumps(summary, indent=2).encode())
    log.info(
        "Plan for %s: %d rows ask for %d images; %d unchanged, %d moderated before (not resent), "
        "%d invalid, %d to generate (%d credits, $%.2f)%s.",
        run_id,
        plan.rows,
        plan.requested,
        plan.unchanged,
        plan.known_moderated,
        len(plan.invalid),
        plan.images,
        plan.credits,
        credits_to_usd(plan.credits),
        f", {plan.deferred} deferred by the budget" if plan.deferred else "",
    )
    return summary


# -- publish -----------------------------------------------------------------------------------------


def publish_run(
    layout: OutputLayout,
    run_id: str,
    *,
    title: str | None = None,
    partition_manifest: ObjectStoragePath | str | None = None,
    thumb: int = THUMB,
    model: str = MODEL,
) -> dict[str, Any]:
    """Fold the run's manifest into the index, then draw the contact sheet and the gallery.

    Without ``partition_manifest`` (a nightly job): the sheet and the page go next to the run's manifest
    and ``latest.json`` points at them. With it (a backfill partition): every run manifest of the
    partition is merged into that one manifest (per image, its latest outcome), drawn next to it, and
    the merged manifests with their versions (:func:`manifest_version`) are written beside it; when
    none of them is new or rewritten since, nothing is rewritten (a rerun of a finished date keeps its
    manifest, and a rerun that rewrote its run's manifest under the same run id is published).

    Returns ``published`` (whether anything was written besides the index), the URIs, counts and
    credits (JSON-safe).
    """
    state, absorbed = sync_index(layout, model=model)
    result: dict[str, Any] = {
        "published": False,
        "index_uri": str(layout.index),
        "index_entries": len(state),
        "absorbed": absorbed,
    }
    invalid = _invalid_rows(layout.plan_dir(run_id))
    if partition_manifest is None:
        source = layout.manifest(run_id)
        if not _exists(source):
            result["reason"] = "this run generated nothing (no manifest); the index is up to date"
            return result
        frame = read_manifest(source)
        folder = source.parent
        manifest_uri = str(source)
    else:
        target = as_path(partition_manifest)
        paths = run_manifests(layout)
        sources = {manifest_key(p): manifest_version(p) for p in paths}
        sidecar = target.parent / SOURCES_NAME
        if not sources:
            result["reason"] = "no run of this partition generated anything yet"
            return result
        if _exists(target) and _read_json(sidecar).get("versions") == sources:
            result["reason"] = (
                f"{target} is up to date with {len(sources)} run manifest(s), none changed since it "
                "was written; kept as it is"
            )
            result["manifest_uri"] = str(target)
            return result
        frame = merge_manifests([read_manifest(p) for p in paths])
        manifest_uri = write_manifest(_records(frame), target)
        folder = target.parent
    counts = {k: v for k, v in manifest_counts(frame).items() if v}
    credits = manifest_credits(frame)
    heading = title or f"{layout.dag_id} · {run_id}"
    subtitle = _subtitle(counts, credits, len(invalid))
    sheet_uri, gallery_uri = render_outputs(
        frame,
        folder,
        title=heading,
        subtitle=subtitle,
        invalid=invalid,
        thumb=thumb,
        manifest_uri=manifest_uri,
    )
    result.update(
        published=True,
        manifest_uri=manifest_uri,
        contact_sheet_uri=sheet_uri,
        gallery_uri=gallery_uri,
        counts=counts,
        credits=credits,
        invalid_rows=len(invalid),
    )
    if partition_manifest is None:
        pointer = {"dag_id": layout.dag_id, "run_id": run_id, **result, "published_at": _now_iso()}
        write_whole(layout.latest, json.dumps(pointer, indent=2).encode())
    else:
        # The versions read before merging: a run manifest rewritten meanwhile is merged next time.
        sidecar_body = {"sources": sorted(sources), "versions": sources, "published_at": _now_iso()}
        write_whole(folder / SOURCES_NAME, json.dumps(sidecar_body, indent=2).encode())
    log.info(
        "Published %s: %s; %d credits. Contact sheet %s, gallery %s.",
        manifest_uri,
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        credits,
        sheet_uri,
        gallery_uri,
    )
    return result


def merge_manifests(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Return one manifest from several runs' manifests: per image, its latest outcome.

    A row is dated by its own completion or submit; a row with neither (never sent) by the latest time
    of its manifest, and a manifest that sent nothing counts as the oldest. Rows are compared one by
    one, not run by run: a run id reused by a rerun keeps its old rows beside its new ones, so a run's
    latest time says nothing about its other rows.
    """
    oldest = pd.Timestamp.min.tz_localize("UTC")
    dated = []
    for order, frame in enumerate(frames):
        if not len(frame):
            continue
        own = pd.concat([frame["submitted_at"], frame["completed_at"]]).dropna()
        run_time = own.max() if len(own) else oldest
        row_time = frame["completed_at"].combine_first(frame["submitted_at"]).fillna(run_time)
        dated.append(frame.assign(_at=pd.to_datetime(row_time, utc=True), _order=order))
    if not dated:
        return pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    merged = pd.concat(dated, ignore_index=True).sort_values(["_at", "_order"], kind="stable")
    merged = merged.drop_duplicates(list(KEY_COLUMNS), keep="last").drop(columns=["_at", "_order"])
    return merged.sort_values(list(KEY_COLUMNS), kind="stable").reset_index(drop=True)


def _exists(path: ObjectStoragePath) -> bool:
    try:
        return path.exists()
    except FileNotFoundError:
        return False


def _read_json(path: ObjectStoragePath) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _invalid_rows(folder: ObjectStoragePath) -> list[InvalidRow]:
    path = folder / "invalid.parquet"
    if not _exists(path):
        return []
    with path.open("rb") as handle:
        frame = pd.read_parquet(handle)
    return [
        InvalidRow(row=int(r["row"]), prompt_id=str(r["prompt_id"]), reason=str(r["reason"]))
        for r in frame.to_dict("records")
    ]


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Return manifest rows as plain Python values (``None`` for missing), for the manifest writer."""
    out = []
    for row in frame[list(MANIFEST_COLUMNS)].astype(object).to_dict("records"):
        out.append(
            {k: (None if v is None or v is pd.NA or v is pd.NaT or v != v else v) for k, v in row.items()}
        )
    return out


def _subtitle(counts: Mapping[str, int], credits: int, invalid: int) -> str:
    parts = [f"{counts.get('total', 0)} images"]
    parts += [f"{v} {k}" for k, v in counts.items() if k != "total"]
    if invalid:
        parts.append(f"{invalid} invalid row(s) not sent")
    parts.append(f"{credits:,} credits (${credits_to_usd(credits):.2f})")
    parts.append(dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return " · ".join(parts)
