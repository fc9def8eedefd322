"""Where a DAG run's images are: its batch tasks' manifests and its single-image tasks' results.

How they are found (no configured root, no scan of storage): from what Airflow itself recorded about
the run's task instances, in its metadata DB.

1. the task's XCom return value: the batch operator returns ``{"manifest_uri", "counts", "credits"}``,
   the single-image operator ``{"image_uri", "sha256", "width", …}``;
2. when there is no return value (the task failed after writing its manifest, e.g. over
   ``fail_on_error_rate``, or it is still running), the task's *rendered* ``output_path``: the manifest's
   path depends only on the output folder and the task instance (see
   :func:`~airflow_provider_imagen.batch.manifest.manifest_path`), so it is found without a return value.

Why not the manifest Asset's events: an operator whose ``output_path`` is templated has no Asset
outlet by default, and a task that fails after writing its manifest emits no event; the return value
and the rendered fields exist for every batch task. Both are written by the DAG's own tasks, which is
what ties a manifest to the DAG whose readers may see it; the rows must also name that DAG and run
(:func:`read_run_rows`), so a manifest of another DAG is never served under this one.

Invariants:
- nothing here trusts a value from the request beyond ``dag_id``/``run_id`` used as DB filters;
- rows given to the page carry no storage location, no reAPI task URL and no key
  (:func:`public_row`, :func:`scrub`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

#: A task instance: (dag_id, run_id, task_id, map_index).
TaskKey = tuple[str, str, str, int]

#: Statuses whose row has an image on storage (``wrong_size`` too: paid, mirrored, not the asked size).
WITH_IMAGE: Final = frozenset({"completed", "wrong_size"})
#: Statuses of rows that were never sent, so they count in no failure or moderation share.
NOT_SENT: Final = frozenset({"invalid", "skipped_budget", "not_submitted", "rejected"})

_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")
_URL: Final = re.compile(r"(https?://[^\s?#'\"<>]+)[?#][^\s'\"<>]*")
_KEY: Final = re.compile(r"\b(rk_[A-Za-z0-9_]{6,})")


@dataclass
class ImageTask:
    """One task instance of the run that makes images, and where its result is."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    #: ``batch`` (a manifest) or ``single`` (one image, from the return value).
    kind: str
    state: str | None = None
    start_date: dt.datetime | None = None
    end_date: dt.datetime | None = None
    run_start: dt.datetime | None = None
    manifest_uri: str | None = None
    #: The single-image operator's return value.
    result: dict[str, Any] = field(default_factory=dict)
    #: The single-image operator's rendered prompt and size.
    prompt: str | None = None
    size: str | None = None


def find_image_tasks(
    session: Session,
    *,
    dag_id: str | None = None,
    run_id: str | None = None,
    dag_ids: Iterable[str] | None = None,
    since: dt.datetime | None = None,
) -> list[ImageTask]:
    """Return the image-making task instances of the runs that match, from XCom and rendered fields."""
    from airflow.models.dagrun import DagRun
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.xcom import XComModel
    from sqlalchemy import and_, select

    def runs(query: Any, dag_col: Any, run_col: Any) -> Any:
        query = query.join(DagRun, and_(DagRun.dag_id == dag_col, DagRun.run_id == run_col))
        if dag_id is not None:
            query = query.where(DagRun.dag_id == dag_id)
        if run_id is not None:
            query = query.where(DagRun.run_id == run_id)
        if dag_ids is not None:
            query = query.where(DagRun.dag_id.in_(list(dag_ids)))
        if since is not None:
            query = query.where(DagRun.start_date >= since)
        return query

    returns: dict[TaskKey, Any] = {}
    query = select(
        XComModel.dag_id, XComModel.run_id, XComModel.task_id, XComModel.map_index, XComModel.value
    )
    for row in session.execute(
        runs(query, XComModel.dag_id, XComModel.run_id).where(XComModel.key == "return_value")
    ):
        returns[(row.dag_id, row.run_id, row.task_id, row.map_index)] = _xcom_value(row.value)
    rendered: dict[TaskKey, Mapping[str, Any]] = {}
    query = select(RTIF.dag_id, RTIF.run_id, RTIF.task_id, RTIF.map_index, RTIF.rendered_fields)
    for row in session.execute(runs(query, RTIF.dag_id, RTIF.run_id)):
        if isinstance(row.rendered_fields, Mapping):
            rendered[(row.dag_id, row.run_id, row.task_id, row.map_index)] = row.rendered_fields
    query = select(
        TI.dag_id,
        TI.run_id,
        TI.task_id,
        TI.map_index,
        TI.state,
        TI.start_date,
        TI.end_date,
        DagRun.start_date,
    )
    found = []
    for row in session.execute(runs(query, TI.dag_id, TI.run_id).order_by(TI.task_id, TI.map_index)):
        key: TaskKey = (row[0], row[1], row[2], row[3])
        task = classify(key, returns.get(key), rendered.get(key, {}))
        if task is not None:
            task.state, task.start_date, task.end_date, task.run_start = row[4], row[5], row[6], row[7]
            found.append(task)
    return found


def classify(key: TaskKey, value: Any, rendered: Mapping[str, Any]) -> ImageTask | None:
    """Return what a task instance made, from its return value and rendered fields (``None``: no images)."""
    dag_id, run_id, task_id, map_index = key

    def task(kind: str, **found: Any) -> ImageTask:
        return ImageTask(
            dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index, kind=kind, **found
        )

    if _is_batch_result(value):
        return task("batch", manifest_uri=value["manifest_uri"])
    output = rendered.get("output_path")
    if "prompts" in rendered and isinstance(output, str) and output:
        from airflow_provider_imagen.batch.manifest import RunIdentity, manifest_path

        identity = RunIdentity(dag_id, run_id, task_id, map_index)
        return task("batch", manifest_uri=str(manifest_path(output, identity=identity)))
    if "prompt" in rendered and isinstance(value, Mapping) and value.get("image_uri"):
        prompt, size = rendered.get("prompt"), rendered.get("size")
        return task(
            "single",
            result=dict(value),
            prompt=prompt if isinstance(prompt, str) else None,
            size=size if isinstance(size, str) else None,
        )
    return None


def _is_batch_result(value: Any) -> bool:
    """Return whether ``value`` is the batch operator's return value (other tasks may name a manifest too)."""
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("manifest_uri"), str)
        and isinstance(value.get("counts"), Mapping)
        and "credits" in value
    )


def _xcom_value(value: Any) -> Any:
    from airflow.models.xcom import XComModel

    try:
        return XComModel.deserialize_value(type("Row", (), {"value": value})())
    except Exception:
        return value


# -- rows ----------------------------------------------------------------------------------------------


@dataclass
class RunRows:
    """The rows of a run's images, and the problems met reading them (shown on the page)."""

    rows: list[dict[str, Any]]
    problems: list[str]


def read_run_rows(tasks: Iterable[ImageTask]) -> RunRows:
    """Return every manifest row (and single image) of the tasks; rows of another DAG or run are dropped."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for task in tasks:
        if task.kind == "single":
            rows.append(_single_row(task))
            continue
        assert task.manifest_uri is not None
        if task.manifest_uri in seen:
            continue  # two tasks of the run name one manifest: its rows count once
        seen.add(task.manifest_uri)
        try:
            manifest = read_manifest_cached(task.manifest_uri)
        except FileNotFoundError:
            if task.state not in ("running", "deferred", "queued", "scheduled", "up_for_retry", None):
                problems.append(f"{task.task_id}: no manifest was written")
            continue
        except Exception as exc:
            problems.append(f"{task.task_id}: the manifest could not be read ({type(exc).__name__})")
            continue
        foreign = 0
        for row in manifest:
            if row.get("dag_id") != task.dag_id or row.get("run_id") != task.run_id:
                foreign += 1
                continue
            rows.append(row)
        if foreign:
            problems.append(f"{task.task_id}: {foreign} row(s) of another DAG or run were left out")
    return RunRows(rows, problems)


def _single_row(task: ImageTask) -> dict[str, Any]:
    result = task.result
    status = result.get("status")
    return {
        "prompt_id": task.task_id,
        "variation": 0,
        "prompt": task.prompt,
        "size": task.size or "",
        "status": "completed" if status == "completed" else str(status or "completed"),
        "error_message": None,
        "image_uri": result.get("image_uri"),
        "sha256": result.get("sha256"),
        "width": result.get("width"),
        "height": result.get("height"),
        "credits": int(result.get("credits") or 0),
        "dag_id": task.dag_id,
        "run_id": task.run_id,
        "airflow_task_id": task.task_id,
        "map_index": task.map_index,
    }


def public_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Return what the page shows of a row: no storage location, no reAPI task id, no URL query, no key."""
    sha = row.get("sha256")
    has_image = row.get("status") in WITH_IMAGE and isinstance(sha, str) and bool(_SHA256.match(sha))
    return {
        "key": sha if has_image else None,
        "prompt_id": str(row.get("prompt_id") or ""),
        "prompt": row.get("prompt"),
        "size": str(row.get("size") or ""),
        "variation": _int(row.get("variation")),
        "status": str(row.get("status")),
        "credits": _int(row.get("credits")) or 0,
        "width": _int(row.get("width")),
        "height": _int(row.get("height")),
        "message": scrub(row.get("error_message")),
        "task": row.get("airflow_task_id"),
        "map_index": _int(row.get("map_index")),
    }


def scrub(text: Any) -> str | None:
    """Return ``text`` without URL queries (signed URLs carry their signature there) or reAPI keys."""
    if text is None:
        return None
    text = _URL.sub(r"\1?…", str(text))
    return _KEY.sub("rk_…", text)


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value != value else int(value)
    except (TypeError, ValueError):
        return None


def find_listed(rows: Iterable[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    """Return the row with an image whose sha256 is ``key`` (``None``: not listed, so never served)."""
    if not _SHA256.match(key):
        return None
    for row in rows:
        if row.get("sha256") == key and row.get("status") in WITH_IMAGE and row.get("image_uri"):
            return row
    return None


# -- a small cache of manifests --------------------------------------------------------------------------

_CACHE_SIZE: Final = 256
_cache: OrderedDict[tuple[str, Any], list[dict[str, Any]]] = OrderedDict()
_cache_lock = threading.Lock()


def read_manifest_cached(uri: str) -> list[dict[str, Any]]:
    """Return a manifest's rows; read again only when the file changed (size and modification time).

    The pages ask for the same manifests on every load and every image; a manifest is rewritten whole
    when a retry merges into it, which changes its fingerprint.
    """
    from airflow_provider_imagen.batch.manifest import read_manifest

    key = (uri, _fingerprint(uri))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    frame = read_manifest(uri)
    rows = [
        {k: (None if _missing(v) else v) for k, v in record.items()}
        for record in frame.astype(object).to_dict(orient="records")
    ]
    with _cache_lock:
        _cache[key] = rows
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return rows


def _missing(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _fingerprint(uri: str) -> Any:
    from airflow_provider_imagen.batch.storage import as_path, local_file

    path = as_path(uri)
    name = local_file(path)
    if name is not None:
        stat = os.stat(name)
        return (stat.st_size, stat.st_mtime_ns)
    info = path.stat()
    return tuple(sorted((k, str(v)) for k, v in dict(info).items() if k in _REMOTE_FINGERPRINT))


_REMOTE_FINGERPRINT: Final = frozenset(
    {"size", "ETag", "etag", "LastModified", "mtime", "updated", "md5Hash"}
)
