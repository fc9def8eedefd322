"""Reading the images a manifest lists, and their thumbnails, for the plugin's API.

Why so careful: the API server reads storage with its own rights, and a browser names what it wants.
So the browser never names a file: it names a sha256 that a manifest row of the DAG lists
(:func:`~airflow_provider_imagen.ui.sources.find_listed`), and the file read is the row's ``image_uri``.

Invariants:
- the bytes served are the bytes the manifest hashed: a file that changed, or a name that now points
  elsewhere, is refused (:class:`ImageUnavailable`), never served;
- a local file is opened without following a symlink (``O_NOFOLLOW``) and must be a regular file;
- only PNG, JPEG and WebP are served, with the type read from the bytes, not from the name;
- a thumbnail is made once (Pillow) and cached beside the images, in ``_thumbs/<sha256>.jpg`` (readers
  that skip names starting with ``_`` skip it); where the API server may not write, it is kept in memory.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import threading
from collections import OrderedDict
from typing import Final

from airflow_provider_imagen.batch.storage import as_path, local_file, read_bytes, write_whole

log = logging.getLogger(__name__)

#: The longest side of a thumbnail, in pixels (tiles show them at up to half that, on 2× screens).
THUMB_SIZE: Final = 384
#: The folder of cached thumbnails, beside the images.
THUMB_FOLDER: Final = "_thumbs"
#: Images larger than this are not served (Imagen 4's PNGs are 1-3 MB).
MAX_IMAGE_BYTES: Final = 64 * 1024 * 1024

_MEMORY_THUMBS: Final = 512
_memory: OrderedDict[str, bytes] = OrderedDict()
_memory_lock = threading.Lock()


class ImageUnavailable(Exception):
    """The listed image cannot be served: missing, changed since it was listed, or not an image."""


def image_type(data: bytes) -> str | None:
    """Return the media type of an image from its first bytes (``None`` when not PNG, JPEG or WebP)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def read_listed_image(uri: str, sha256: str) -> tuple[bytes, str]:
    """Return the bytes and media type of the image a manifest lists at ``uri`` with ``sha256``."""
    try:
        data = _read(uri)
    except FileNotFoundError as exc:
        raise ImageUnavailable("the image is no longer on storage") from exc
    except OSError as exc:
        raise ImageUnavailable(f"the image could not be read ({type(exc).__name__})") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ImageUnavailable("the file changed since the manifest listed it")
    kind = image_type(data)
    if kind is None:
        raise ImageUnavailable("the file is not a PNG, JPEG or WebP image")
    return data, kind


def thumbnail(uri: str, sha256: str) -> bytes:
    """Return a JPEG thumbnail of the listed image, made once and cached beside the images."""
    with _memory_lock:
        if sha256 in _memory:
            _memory.move_to_end(sha256)
            return _memory[sha256]
    cached = as_path(uri).parent / THUMB_FOLDER / f"{sha256}.jpg"
    try:
        data = _read(str(cached))
        if image_type(data) == "image/jpeg":
            return data
    except (OSError, ImageUnavailable):
        pass  # not made yet (or unreadable): make it
    image, _ = read_listed_image(uri, sha256)
    data = make_thumbnail(image)
    try:
        write_whole(cached, data)
    except Exception as exc:  # read-only storage for the API server: keep it in memory instead
        log.warning("Could not cache the thumbnail at %s (%s); keeping it in memory", cached, exc)
        with _memory_lock:
            _memory[sha256] = data
            while len(_memory) > _MEMORY_THUMBS:
                _memory.popitem(last=False)
    return data


def make_thumbnail(image: bytes, size: int = THUMB_SIZE) -> bytes:
    """Return ``image`` scaled to fit ``size`` × ``size`` (aspect kept), as a JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as picture:
        picture.thumbnail((size, size))
        rgb = picture.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=82, optimize=True)
    return out.getvalue()


def _read(uri: str) -> bytes:
    path = as_path(uri)
    name = local_file(path)
    if name is None:
        return read_bytes(path)
    # No symlinks: the name the manifest recorded must be the file itself, not a way to another one.
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageUnavailable("not a regular file")
        if info.st_size > MAX_IMAGE_BYTES:
            raise ImageUnavailable(f"larger than {MAX_IMAGE_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)
