"""Small storage helpers over ``ObjectStoragePath``, so no code assumes a local disk.

Why one place: writing "whole or not at all" differs between a local file system (write aside, then
rename) and an object store (one PUT is already atomic); the journal, the mirror and the manifest all
need it.

Local files are read and written with the standard library. ``ObjectStoragePath``'s file objects report
every read and write to the hook-lineage collector (one asset per journal segment and per image is noise:
the batch's lineage is its manifest Asset), and their first use in a process discovers every installed
provider's file systems and asset factories (with the Amazon provider: boto3, ~0.7 s). Each batch pass is
a new process, so that was paid on every pass.
"""

from __future__ import annotations

import contextlib
import functools
import io
import mmap
import os
import random
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, Final
from urllib.parse import quote

from airflow.sdk import ObjectStoragePath

if TYPE_CHECKING:
    import pyarrow as pa

#: Protocols that are a plain local file system.
LOCAL_PROTOCOLS: Final = frozenset({"", "file", "local"})


def as_path(location: ObjectStoragePath | str) -> ObjectStoragePath:
    """Return ``location`` as an ``ObjectStoragePath`` (plain paths mean the local disk)."""
    _attach_local_disk()  # before the path exists: building one already looks its file system up
    return location if isinstance(location, ObjectStoragePath) else ObjectStoragePath(str(location))


@functools.cache
def _attach_local_disk() -> None:
    """Give local paths Airflow's built-in local file system without the provider discovery.

    The first file system lookup of a process imports every installed provider's file systems (with
    the Amazon provider: boto3 and its friends, ~0.4 s), even for a local path; each batch pass is a
    new process. Attaching the same built-in ``LocalFileSystem`` Airflow would pick skips that.

    Why not leave it to the library: its lookup has no way to ask for one protocol without the others.
    The process's other code is unaffected: ``attach`` keeps a file system attached earlier under the
    same name, and the one attached here is the one Airflow would have chosen for ``file://`` anyway.
    """
    from airflow.sdk.io import attach
    from fsspec.implementations.local import LocalFileSystem

    for protocol in ("file", "local"):
        attach(protocol, fs=LocalFileSystem())


def local_file(path: ObjectStoragePath) -> str | None:
    """Return the local file name of ``path``, or ``None`` when it is not on the local disk."""
    return path.path if path.protocol in LOCAL_PROTOCOLS and path.conn_id is None else None


def read_bytes(path: ObjectStoragePath) -> bytes:
    """Return the content of ``path`` (``FileNotFoundError`` when it does not exist)."""
    name = local_file(path)
    if name is None:
        return path.read_bytes()
    with open(name, "rb") as handle:
        return handle.read()


#: The file mapping under each table :func:`map_arrow_file` returned, by the table's id.
_MAPPINGS: dict[int, mmap.mmap] = {}


def map_arrow_file(name: str) -> pa.Table:
    """Return the Arrow IPC file ``name`` as a table whose rows stay in the file until read.

    Why a mapping of our own rather than ``pyarrow.memory_map``: a page read through a mapping stays
    resident (and counted in the process's memory) until the mapping goes, and a table read whole once
    (a run's end) would keep every page of it; :func:`release_pages` gives them back while the table
    stays usable.
    """
    import pyarrow as pa

    with open(name, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    table = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped))).read_all()
    key = id(table)
    _MAPPINGS[key] = mapped
    weakref.finalize(table, _MAPPINGS.pop, key, None)
    return table


def release_pages(table: pa.Table) -> None:
    """Drop the pages of ``table``'s file mapping from this process (they are read again if used).

    A no-op for a table not read by :func:`map_arrow_file` or where the system cannot drop them; the
    file is only read through the mapping, so nothing is lost.
    """
    mapped = _MAPPINGS.get(id(table))
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(mmap.MADV_DONTNEED)


def write_whole(dest: ObjectStoragePath, data: bytes) -> None:
    """Write ``data`` so that readers see no file or the whole file, never a part."""
    name = local_file(dest)
    if name is None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)  # one PUT: object stores never show half an object
        return
    _write_local(name, lambda handle: handle.write(data))


def write_whole_from(dest: ObjectStoragePath, fill: Callable[[BinaryIO], object]) -> None:
    """Write what ``fill`` writes into the file object it is given, whole, as :func:`write_whole` does.

    Why: a large file (a journal snapshot) built in memory and then copied into ``bytes`` costs twice
    its size at once; on local disk ``fill`` writes straight to the file, so no copy of it is held.
    Object stores still get one PUT of the whole content.
    """
    name = local_file(dest)
    if name is None:
        buffer = io.BytesIO()
        fill(buffer)
        write_whole(dest, buffer.getvalue())
        return
    _write_local(name, fill)


def _write_local(name: str, fill: Callable[[BinaryIO], object]) -> None:
    """Write a local file aside, fsync it, rename it into place and fsync its folder."""
    folder = os.path.dirname(name)
    # A name no other writer (thread, process or host) picks; the pid spares a random syscall per file.
    tag = f"{os.getpid()}-{random.getrandbits(48):012x}"
    scratch = os.path.join(folder, f".{os.path.basename(name)}.{tag}.tmp")
    try:
        handle = open(scratch, "wb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:  # the folder's first file: asking first would cost a stat per write
        os.makedirs(folder, exist_ok=True)
        handle = open(scratch, "wb")  # noqa: SIM115
    try:
        with handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data, before the name: a crash never leaves a named empty file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise
    os.replace(scratch, name)
    fsync_folder(folder)


def fsync_folder(folder: str) -> None:
    """Make a rename or a new name in ``folder`` survive a power cut (no-op where folders cannot be)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and Windows) refuse to fsync a folder; the file itself was synced
    finally:
        os.close(fd)


def path_part(value: object, *, partition: bool = False) -> str:
    """Return ``value`` as one path segment that cannot leave its folder (no ``/``, no ``.``/``..``).

    Two flavours, because two kinds of reader look at the names. A journal's folder keeps ``+ = @ ,``
    readable, and must never change between releases: a retry finds the journal its predecessor paid
    into by this name. A manifest folder is read as a Hive partition (``run_id=…``), so ``partition``
    also quotes ``+`` and ``=``, and a leading ``.`` or ``_``, which such readers skip as hidden.
    """
    if not partition:
        quoted = quote(str(value), safe="-_.+=@,")
        return quoted if quoted not in (".", "..", "") else quoted.replace(".", "%2E") or "%00"
    quoted = quote(str(value), safe="-_.@,", errors="backslashreplace")
    if not quoted:
        return "%00"
    if quoted[0] in "._":
        quoted = f"%{ord(quoted[0]):02X}{quoted[1:]}"  # ".." → "%2E.", "_x" → "%5Fx"
    return quoted
