"""Mirror finished images from their 24-hour signed URLs to the user's storage.

Why: the API's image URLs expire after a day, so an image that is not copied in time is paid for and
lost. Downloads happen on the worker (never in the trigger), are checked by the client (content type,
size cap, sha256, pixel size), and land on any ``ObjectStoragePath`` whole or not at all.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Final

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.client import ImagenClient
from airflow_provider_imagen.batch.storage import write_whole

log = logging.getLogger(__name__)

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")
#: Longest readable part of a file name taken from a prompt id.
_MAX_SLUG: Final = 80


@dataclass(frozen=True)
class MirroredImage:
    """Where an image now lives and what it is."""

    uri: str
    sha256: str
    width: int | None
    height: int | None
    size_bytes: int
    content_type: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (for the journal and XCom)."""
        return asdict(self)


def image_file_name(prompt_id: str, size: str, variation: int = 0, task_id: str | None = None) -> str:
    """Return a safe file name for one paid image that no other task's image can take.

    The readable part keeps only ``[A-Za-z0-9._-]`` from the prompt id (so ``../`` or ``/`` cannot
    escape the output folder); a hash of the exact (prompt_id, size, variation) keeps two ids that
    slug alike apart; the reAPI task id (unique per paid task) keeps every run, try and task that
    writes to the same folder from overwriting an image another one paid for and listed.
    """
    slug = _UNSAFE.sub("_", str(prompt_id)).strip("._")[:_MAX_SLUG] or "image"
    digest = hashlib.sha256(f"{prompt_id}\x1f{size}\x1f{variation}".encode()).hexdigest()[:10]
    paid = f"__{_UNSAFE.sub('_', task_id)[:_MAX_SLUG]}" if task_id else ""
    return f"{slug}__{size.replace(':', 'x')}__v{variation}__{digest}{paid}.png"


def mirror_image(client: ImagenClient, url: str, dest: ObjectStoragePath) -> MirroredImage:
    """Download ``url`` and write it to ``dest`` whole.

    The client retries a broken download under its own policy; nothing here retries again.

    :raises ImageExpiredError: the URL is past its life; regenerating would be paid again, so we don't.
    :raises DownloadError: the image could not be fetched or is not acceptable.
    """
    image = client.download_image(url)
    assert image.content is not None
    write_whole(dest, image.content)
    return MirroredImage(
        uri=str(dest),
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        size_bytes=image.size_bytes,
        content_type=image.content_type,
    )
