"""Where plan, the batch operator and publish keep their files under one output root.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch.manifest import (
    RunIdentity,
    manifest_path,
)
from airflow_provider_imagen.batch.storage import as_path

log = logging.getLogger(__name__)


CONTACT_SHEET_NAME: Final = "_contact_sheet.png"
GALLERY_NAME: Final = "_gallery.html"
#: Beside a partition's manifest: the run manifests it was merged from (also its "done" marker).
SOURCES_NAME: Final = "_sources.json"


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


def manifest_key(path: ObjectStoragePath) -> str:
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
    return sorted(found, key=manifest_key)


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
