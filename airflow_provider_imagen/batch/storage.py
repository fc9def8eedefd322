"""Small storage helpers over ``ObjectStoragePath``, so no code assumes a local disk.

Why one place: writing "whole or not at all" differs between a local file system (write aside, then
rename) and an object store (one PUT is already atomic); the journal, the mirror and the manifest all
need it.
"""

from __future__ import annotations

import uuid
from typing import Final

from airflow.sdk import ObjectStoragePath

#: Protocols that are a plain local file system.
LOCAL_PROTOCOLS: Final = frozenset({"", "file", "local"})


def as_path(location: ObjectStoragePath | str) -> ObjectStoragePath:
    """Return ``location`` as an ``ObjectStoragePath`` (plain paths mean the local disk)."""
    return location if isinstance(location, ObjectStoragePath) else ObjectStoragePath(str(location))


def write_whole(dest: ObjectStoragePath, data: bytes) -> None:
    """Write ``data`` so that readers see no file or the whole file, never a part."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.protocol in LOCAL_PROTOCOLS:
        scratch = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        scratch.write_bytes(data)
        scratch.rename(dest)
    else:
        dest.write_bytes(data)  # one PUT: object stores never show half an object
