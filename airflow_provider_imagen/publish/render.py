"""Draw a run as people look at it: a contact sheet (PNG) and an HTML gallery beside its manifest.

Why apart from publish: drawing needs Pillow and reads images, and a failure while drawing must cost
nothing — publish has already written the index when it calls :func:`render_outputs`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

import pandas as pd
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch.storage import LOCAL_PROTOCOLS, as_path, write_whole
from airflow_provider_imagen.publish.contact_sheet import Tile, contact_sheet_png, thumbnail
from airflow_provider_imagen.publish.gallery import GalleryItem, InvalidRow, render_gallery
from airflow_provider_imagen.publish.layout import CONTACT_SHEET_NAME, GALLERY_NAME

log = logging.getLogger(__name__)

#: Side of a thumbnail on the contact sheet, in pixels.
THUMB: Final = 200
#: Parallel image reads while drawing a contact sheet.
READ_CONCURRENCY: Final = 8


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
