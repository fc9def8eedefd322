"""Fencing: at most one try of a task instance sends paid POSTs at a time.

Why: Airflow can run two tries of one task instance at once. A worker that lost its heartbeat keeps
running while the scheduler starts the retry beside it (a zombie), and a hand-run ``airflow tasks test``
runs beside the scheduled try. Both read the same journal; without a fence both could plan the same rows
and pay for them twice.

How: every try claims the next *epoch* when it starts, by creating ``<journal>/_leases/<epoch>.json``
only if it is absent. A try owns the journal while no lease of a higher epoch exists. Epochs are claimed
in order (a claim that finds its number taken takes the next), so "is there a newer try?" is one
existence check of ``<epoch + 1>``, made right before each paid POST. A try that finds a newer lease stops
without paying (:class:`FencedError`).

What each store guarantees for the claim:
- local disk: ``O_CREAT | O_EXCL`` is atomic; the lease is fsynced with its folder;
- S3: a conditional PUT (``If-None-Match: *``, s3fs' ``"xb"`` mode) is atomic and S3 reads are strongly
  consistent, so the existence check sees a claim as soon as it returned;
- GCS (gcsfs' ``"xb"`` mode writes with ``ifGenerationMatch=0``): the same;
- a store without an exclusive create: the claim checks, then writes; two claims within the same instant
  could both succeed. A warning says so once per process.

The window that remains: a newer try can claim between an older try's check and its POST, so each
submitter thread of the older try can send at most one more POST. Its intent was journalled before the
check, so the newer try, which reads the journal only after claiming, sees it as an unknown submit and
does not send it again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Final

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch.storage import fsync_folder, local_file

log = logging.getLogger(__name__)

#: Folder of the leases, inside the journal's folder.
LEASES: Final = "_leases"
_SUFFIX: Final = ".json"
#: Claims tried before giving up (each lost race moves to the next epoch).
_CLAIM_ATTEMPTS: Final = 50


class FencedError(RuntimeError):
    """A newer try of this task instance owns the journal: this try must not send anything more.

    Safe: nothing was paid by the refusal. The newer try carries on with every row.
    """


@dataclass(frozen=True)
class Lease:
    """The claim of one try on a journal: checked before every paid POST."""

    folder: ObjectStoragePath
    epoch: int
    #: Who claimed it: the Airflow task instance try's id, or a label for code outside Airflow.
    owner: str

    @functools.cached_property
    def _newer(self) -> ObjectStoragePath:
        """The lease a newer try would write (built once: :meth:`check` runs before every POST)."""
        return self.folder / _name(self.epoch + 1)

    def check(self) -> None:
        """Raise :class:`FencedError` when a newer try has claimed the journal."""
        if _exists(self._newer):
            raise FencedError(
                f"another try of this task instance claimed the journal at {self.folder} (lease "
                f"{self.epoch + 1}, after this try's lease {self.epoch}); this try stops here and sends "
                "nothing more, the newer try carries on with every row"
            )


def claim(journal_folder: ObjectStoragePath, *, owner: str, **facts: Any) -> Lease:
    """Claim the next epoch of the journal in ``journal_folder`` for ``owner`` and return the lease."""
    folder = journal_folder / LEASES
    epoch = latest_epoch(folder) + 1
    body = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "claimed_at": time.time()}
    for _ in range(_CLAIM_ATTEMPTS):
        data = json.dumps({**body, **facts, "epoch": epoch}, default=str).encode()
        try:
            create_exclusive(folder / _name(epoch), data)
        except FileExistsError:
            epoch += 1
            continue
        return Lease(folder, epoch, owner)
    raise FencedError(f"could not claim a lease at {folder}: {_CLAIM_ATTEMPTS} epochs taken in a row")


def find(journal_folder: ObjectStoragePath, *, owner: str, epoch: int | None = None) -> Lease | None:
    """Return the lease ``owner`` claimed (``epoch`` when known, else its latest), or ``None``.

    A resumed try finds its lease here: the epoch rides the deferral's kwargs where Airflow keeps them,
    and is looked up by owner where it does not (``dag.test()`` runs the trigger in-line).
    """
    folder = journal_folder / LEASES
    if epoch is not None:
        return Lease(folder, epoch, owner)
    for number in sorted(_epochs(folder), reverse=True):
        try:
            claimed = json.loads((folder / _name(number)).read_bytes())
        except (FileNotFoundError, ValueError):
            continue
        if claimed.get("owner") == owner:
            return Lease(folder, number, owner)
    return None


def latest_epoch(folder: ObjectStoragePath) -> int:
    """Return the highest epoch claimed in ``folder`` (``0`` when none)."""
    return max(_epochs(folder), default=0)


def create_exclusive(path: ObjectStoragePath, data: bytes) -> None:
    """Write ``data`` to ``path`` only if nothing is there; raise ``FileExistsError`` otherwise."""
    name = local_file(path)
    if name is not None:
        folder = os.path.dirname(name)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_folder(folder)
        return
    if path.protocol not in _EXCLUSIVE_STORES:
        _warn_not_atomic(path.protocol)
        if path.exists():
            raise FileExistsError(str(path))
        path.write_bytes(data)
        return
    try:
        with path.fs.open(path.path, "xb") as handle:
            handle.write(data)
    except FileExistsError:
        raise
    except Exception as exc:  # stores answer a failed precondition in their own words
        if "PreconditionFailed" in repr(exc) or "412" in str(exc) or path.exists():
            raise FileExistsError(str(path)) from exc
        raise


#: Object stores whose fsspec file system honours the ``"xb"`` mode with a conditional write.
_EXCLUSIVE_STORES: Final = frozenset({"s3", "s3a", "gs", "gcs"})


#: Stores already warned about in this process (one warning each).
_WARNED: set[str] = set()


def _warn_not_atomic(protocol: str) -> None:
    if protocol not in _WARNED:
        _WARNED.add(protocol)
        log.warning(
            "Storage %r offers no create-if-absent write known to this provider: two tries claiming the "
            "journal at the same instant could both win. Keep journals on local disk, S3 or GCS.",
            protocol,
        )


def _name(epoch: int) -> str:
    return f"{epoch:010d}{_SUFFIX}"


def _epochs(folder: ObjectStoragePath) -> list[int]:
    if local_file(folder) is None:
        folder.fs.invalidate_cache(folder.path)  # a cached listing would hide a newer claim
    try:
        names = [p.name for p in folder.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [int(n[: -len(_SUFFIX)]) for n in names if n.endswith(_SUFFIX) and n[: -len(_SUFFIX)].isdigit()]


def _exists(path: ObjectStoragePath) -> bool:
    name = local_file(path)
    if name is not None:
        return os.path.exists(name)
    path.fs.invalidate_cache(path.path)  # ask the store, not a listing cached earlier
    return path.exists()
