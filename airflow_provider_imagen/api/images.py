"""Receiving an image body: what is accepted, and what is learnt from it on the way in.

An image is checked while it streams, never after: a body that is not an image or grows past the cap is
refused before it is written in full, and its sha256 and pixel size come from the same single pass.

The pixel size is read from the PNG header directly (the API serves PNG) rather than through Pillow:
Pillow belongs to the ``publish`` extra, and the core install must still check every image's size.
Other formats go through Pillow when it is installed, and are otherwise reported as of unknown size
(which is never judged a wrong size).
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Final

from airflow_provider_imagen.api.errors import ImageRefusedError
from airflow_provider_imagen.api.urls import redact_url

#: Largest image body we accept; Imagen 4 PNGs are 1-3 MB.
DEFAULT_MAX_IMAGE_BYTES: Final = 50 * 1024 * 1024
#: Bytes kept from the start of an image to read its pixel size.
_HEAD_BYTES: Final = 256 * 1024
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class DownloadedImage:
    """What a download produced. ``content`` is set only when no sink was given."""

    content_type: str
    size_bytes: int
    sha256: str
    width: int | None
    height: int | None
    content: bytes | None = field(default=None, repr=False)


class ImageReceiver:
    """Checks an image body as it streams in: type, size cap, sha256, and pixel size from its head.

    :param url: the image's URL, only ever shown redacted.
    :param max_bytes: the body's cap (declared ``Content-Length`` and bytes actually received).
    :param sink: where the body goes; ``None`` keeps it in memory for :attr:`DownloadedImage.content`.
    """

    def __init__(self, url: str, max_bytes: int, sink: IO[bytes] | None) -> None:
        self._url = url
        self._max = max_bytes
        self._memory: io.BytesIO | None = None
        if sink is None:
            sink = self._memory = io.BytesIO()
        self._sink = sink
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._size = 0
        self.content_type = ""

    def start(self, headers: Mapping[str, str]) -> None:
        """Refuse the body from its headers alone: not an image, or declared over the cap."""
        self.content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if not self.content_type.startswith("image/"):
            raise ImageRefusedError(
                f"refusing {redact_url(self._url)}: content type {self.content_type or 'missing'!r} "
                "is not an image"
            )
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self._max:
            raise ImageRefusedError(
                f"refusing {redact_url(self._url)}: {declared} bytes is over the {self._max} cap"
            )

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body."""
        self._size += len(chunk)
        if self._size > self._max:
            raise ImageRefusedError(
                f"refusing {redact_url(self._url)}: body is over the {self._max} byte cap"
            )
        self._hash.update(chunk)
        if len(self._head) < _HEAD_BYTES:
            self._head.extend(chunk[: _HEAD_BYTES - len(self._head)])
        self._sink.write(chunk)

    def finish(self) -> DownloadedImage:
        """Return what was received; an empty body is refused."""
        if self._size == 0:
            raise ImageRefusedError(f"refusing {redact_url(self._url)}: empty body")
        width, height = image_dimensions(bytes(self._head))
        content = self._memory.getvalue() if self._memory is not None else None
        return DownloadedImage(self.content_type, self._size, self._hash.hexdigest(), width, height, content)


def image_dimensions(head: bytes) -> tuple[int | None, int | None]:
    """Return (width, height) from the first bytes of an image; PNG directly, others through Pillow."""
    if head[:8] == _PNG_MAGIC and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    try:
        from PIL import Image
    except ImportError:  # the publish extra is not installed: a non-PNG image is of unknown size
        return None, None
    try:
        with Image.open(io.BytesIO(head)) as image:
            width, height = image.size
            return int(width), int(height)
    except Exception:
        return None, None
