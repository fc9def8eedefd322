"""Plan and publish: the two steps the example DAGs run around the batch operator, and where files live.

Why: the batch operator turns one prompt table into images and one manifest, and its journal makes a
*retry* exactly-once. A job that runs every night (or once per date of a backfill) needs two more steps:
``plan`` before it, to send only what the index says is new or changed; ``publish`` after it, to fold
the manifest into the index, and to show the run as a contact sheet and a gallery.

Layout under one output root (:class:`OutputLayout`; a backfill uses one root per partition)::

    <root>/images/…                                                  images (batch operator)
    <root>/_journal/…                                                exactly-once journal (batch operator)
    <root>/manifests/dag_id=<dag>/run_id=<run>/<task>.parquet        the run's manifest (batch operator)
    <root>/manifests/dag_id=<dag>/run_id=<run>/_contact_sheet.png    publish, next to the manifest
    <root>/manifests/dag_id=<dag>/run_id=<run>/_gallery.html         publish, next to the manifest
    <root>/plans/dag_id=<dag>/run_id=<run>/to_generate.parquet       plan: what this run sends
    <root>/plans/dag_id=<dag>/run_id=<run>/invalid.parquet           plan: rows never sent, and why
    <root>/plans/dag_id=<dag>/run_id=<run>/plan.json                 plan: its numbers
    <root>/index/index.parquet                                       the index (publish; plan recovers)
    <root>/latest.json                                               the last run that published output

Files beside a manifest start with ``_`` so that Parquet dataset readers (pyarrow, Spark, this
provider's own table reader) skip them when they read ``manifests/`` as one dataset.

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

import concurrent.futures
import datetime as dt
import hashlib
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import pandas as pd
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import ImagenInputError
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE, DEFAULT_SIZE, MODEL, credits_to_usd
from airflow_provider_imagen.batch.manifest import (
    MANIFEST_COLUMNS,
    RunIdentity,
    manifest_counts,
    manifest_credits,
    manifest_path,
    read_manifest,
    write_manifest,
)
from airflow_provider_imagen.batch.specs import summarize_invalid
from airflow_provider_imagen.batch.storage import LOCAL_PROTOCOLS, as_path, write_whole
from airflow_provider_imagen.batch.table import ID_COLUMN, PROMPT_COLUMN, SIZE_COLUMN
from airflow_provider_imagen.publish.contact_sheet import Tile, contact_sheet_png, thumbnail
from airflow_provider_imagen.publish.gallery import GalleryItem, InvalidRow, render_gallery
from airflow_provider_imagen.publish.index import (
    KEY_COLUMNS,
    IndexState,
    absorb_manifest,
    plan_increment,
    read_index,
    write_index,
    write_plan_table,
)

log = logging.getLogger(__name__)

CONTACT_SHEET_NAME: Final = "_contact_sheet.png"
GALLERY_NAME: Final = "_gallery.html"
#: Beside a partition's manifest: the run manifests it was merged from (also its "done" marker).
SOURCES_NAME: Final = "_sources.json"
#: Side of a thumbnail on the contact sheet, in pixels.
THUMB: Final = 200
#: Parallel image reads while drawing a contact sheet.
READ_CONCURRENCY: Final = 8


@dataclass(frozen=True)
class OutputLayout:
    """Where plan, the batch operator and publish keep their files under one output root.

    :ivar root: the output root, i.e. the batch operator's ``output_path``.
    :ivar dag_id: the DAG the runs belong to (manifests are kept per DAG).
    :ivar task_id: the batch operator's task id.
    """

    root: ObjectStoragePath
    dag_id: str
    task_id: str = "generate"

    @classmethod
    def at(cls, root: ObjectStoragePath | str, dag_id: str, task_id: str = "generate") -> OutputLayout:
        """Return the layout under ``root`` (a path, URI or ``ObjectStoragePath``)."""
        return cls(as_path(str(root).rstrip("/") if isinstance(root, str) else root), dag_id, task_id)

    def manifest(self, run_id: str) -> ObjectStoragePath:
        """Return where the batch operator writes the manifest of ``run_id``."""
        return manifest_path(self.root, identity=RunIdentity(self.dag_id, run_id, self.task_id))

    @property
    def manifests(self) -> ObjectStoragePath:
        """Return the folder holding one ``run_id=…`` folder per run of the DAG."""
        return self.manifest("-").parent.parent

    def plan_dir(self, run_id: str) -> ObjectStoragePath:
        """Return the folder of the plan of ``run_id``."""
        return (
            self.root / "plans" / self.manifest(run_id).parent.parent.name / self.manifest(run_id).parent.name
        )

    @property
    def index(self) -> ObjectStoragePath:
        """Return the index file."""
        return self.root / "index" / "index.parquet"

    @property
    def latest(self) -> ObjectStoragePath:
        """Return the pointer to the last run that published output."""
        return self.root / "latest.json"


def partition_layout(
    output_root: ObjectStoragePath | str, partition: str, dag_id: str, task_id: str = "generate"
) -> tuple[OutputLayout, ObjectStoragePath]:
    """Return a partition's own layout and the path of its published manifest.

    ``partition`` is a ``key=value`` folder name (``ds=2026-01-01``). Each partition has its own root
    (``<output_root>/partitions/<partition>``: images, journal, run manifests, index), so backfill runs
    of different dates never write the same file; the published manifests are
    ``<output_root>/manifests/<partition>/manifest.parquet``, one Hive-style dataset for readers.
    """
    key, sep, value = partition.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"partition={partition!r}: expected a key=value folder name such as ds=2026-01-01")
    name = f"{quote(key, safe='-_.')}={quote(value, safe='-_.')}"
    if name.startswith((".", "_")):
        raise ValueError(f"partition={partition!r}: must not start with '.' or '_'")
    base = as_path(str(output_root).rstrip("/") if isinstance(output_root, str) else output_root)
    return OutputLayout(
        base / "partitions" / name, dag_id, task_id
    ), base / "manifests" / name / "manifest.parquet"


# -- the index, kept in step with the manifests ------------------------------------------------------


def _manifest_key(path: ObjectStoragePath) -> str:
    """Return a manifest's stable name in the index: ``dag_id=…/run_id=…/<task>.parquet``.

    Relative on purpose: the same file listed by a glob or built from an identity may render its
    protocol differently (``/x`` or ``file:///x``), but its last three parts are always the same.
    """
    return "/".join(path.parts[-3:])


def run_manifests(layout: OutputLayout) -> list[ObjectStoragePath]:
    """Return every run manifest of the layout's DAG and task, in name order."""
    folder = layout.manifests
    try:
        if not folder.exists():
            return []
        found = list(folder.glob(f"run_id=*/{layout.manifest('-').name}"))
    except FileNotFoundError:
        return []
    return sorted(found, key=_manifest_key)


#: What :func:`manifest_version` takes from ``fs.info()``: the size, and the markers of a new object on
#: S3 (``ETag``, ``VersionId``, ``LastModified``), GCS (``md5Hash``, ``generation``, ``updated``), Azure
#: (``etag``, ``last_modified``) and file systems (``ino``, ``mtime``).
_VERSION_FIELDS: Final = (
    "size",
    "ETag",
    "VersionId",
    "LastModified",
    "md5Hash",
    "generation",
    "updated",
    "etag",
    "last_modified",
    "ino",
    "mtime",
)


def manifest_version(path: ObjectStoragePath) -> str:
    """Return a short fingerprint of a manifest file's current content, from its store's metadata.

    Why: a rerun that reuses a run id (a cleared task, a reprocessed backfill) rewrites that run's
    manifest under the same name, so the list of names cannot tell whether anything changed. Every
    manifest is written whole (a new file renamed over the old one, or one PUT), so the store's own
    marker of a new object (an ETag or MD5 on S3/GCS, a generation, a new inode and mtime on a file
    system) changes with every write; the size is part of it too. This reads metadata only, never the
    files, so checking every run manifest costs one listing, not the manifests' bytes. A store that
    reports none of these markers is hashed instead.
    """
    info = path.fs.info(path.path)
    marks = {name: info[name] for name in _VERSION_FIELDS if info.get(name) not in (None, "")}
    if set(marks) <= {"size"}:
        marks["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    text = json.dumps({k: str(v) for k, v in marks.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def sync_index(layout: OutputLayout, *, model: str = MODEL) -> tuple[IndexState, list[str]]:
    """Absorb every run manifest the index has not seen as it is now; return the index and the names.

    Writes the index (whole) only when something was absorbed.
    """
    state = read_index(layout.index)
    absorbed: list[str] = []
    for path in run_manifests(layout):
        key = _manifest_key(path)
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
        sources = {_manifest_key(p): manifest_version(p) for p in paths}
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


def render_outputs(
    frame: pd.DataFrame,
    folder: ObjectStoragePath,
    *,
    title: str,
    subtitle: str,
    invalid: Sequence[InvalidRow] = (),
    thumb: int = THUMB,
    manifest_uri: str | None = None,
) -> tuple[str, str]:
    """Draw the contact sheet and the gallery of a manifest into ``folder``; return their URIs."""
    rows = frame.to_dict("records")
    with concurrent.futures.ThreadPoolExecutor(READ_CONCURRENCY) as pool:
        pictures = list(pool.map(lambda row: _load_thumbnail(row, thumb), rows))
    tiles = [
        Tile(
            title=str(row["prompt_id"]),
            size=str(row["size"]),
            status=str(row["status"]),
            image=picture,
            note=_note(row),
        )
        for row, picture in zip(rows, pictures, strict=True)
    ]
    sheet = folder / CONTACT_SHEET_NAME
    write_whole(sheet, contact_sheet_png(tiles, title=title, subtitle=subtitle, thumb=thumb))
    items = [
        GalleryItem(
            prompt_id=str(row["prompt_id"]),
            size=str(row["size"]),
            status=str(row["status"]),
            prompt=row.get("prompt") if isinstance(row.get("prompt"), str) else None,
            href=_link(folder, row.get("image_uri")) if row["status"] == "completed" else None,
            note=None if row["status"] == "completed" else _note(row),
        )
        for row in rows
    ]
    page = render_gallery(
        items,
        title=title,
        summary=subtitle,
        contact_sheet_href=CONTACT_SHEET_NAME,
        manifest_href=_link(folder, manifest_uri),
        invalid=invalid,
    )
    gallery = folder / GALLERY_NAME
    write_whole(gallery, page.encode("utf-8"))
    return str(sheet), str(gallery)


# -- helpers -----------------------------------------------------------------------------------------


def _load_thumbnail(row: Mapping[str, Any], side: int) -> Any:
    uri = row.get("image_uri")
    if row.get("status") != "completed" or not isinstance(uri, str) or not uri:
        return None
    try:
        return thumbnail(as_path(uri).read_bytes(), side)
    except Exception as exc:  # a missing or broken file becomes a labelled tile, never a failed publish
        log.warning("Cannot read %s for the contact sheet: %s", uri, exc)
        return None


def _note(row: Mapping[str, Any]) -> str | None:
    status = row.get("status")
    if status == "completed":
        return None
    code = row.get("error_code")
    code_text = f" ({int(code)})" if code is not None and not pd.isna(code) else ""
    if status == "moderated":
        return f"content policy{code_text}"
    message = row.get("error_message")
    if isinstance(message, str) and message:
        return message[:80]
    return code_text.strip(" ()") or None


def _link(folder: ObjectStoragePath, uri: Any) -> str | None:
    """Return a link from a page in ``folder`` to ``uri``: relative when both live on the same store."""
    if not isinstance(uri, str) or not uri:
        return None
    target = as_path(uri)
    same_store = target.protocol == folder.protocol or (
        target.protocol in LOCAL_PROTOCOLS and folder.protocol in LOCAL_PROTOCOLS
    )
    if same_store and getattr(target, "bucket", "") == getattr(folder, "bucket", ""):
        relative = posixpath.relpath(target.path, folder.path)
        return quote(relative, safe="/._-~")
    return uri


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
