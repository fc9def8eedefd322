"""The contact sheet: one PNG that shows a run's images as a grid of captioned thumbnails.

Why: a nightly job that makes a hundred images is checked by a person in seconds only if the output can
be seen at once. Every requested image gets a tile, in the given order: the thumbnail when the image
was made, a labelled placeholder when it was not (moderated, failed, timed out…), so what is missing is
as visible as what is there.

Invariants:
- Pillow only (no Airflow, no pandas): callers pass decoded images or bytes, from wherever they live;
- the geometry is decided by :func:`sheet_layout` alone (a pure function of the tile count and the
  settings), so tests and callers find tile ``i`` at ``layout.slots[i]`` without parsing pixels;
- a thumbnail keeps its aspect ratio inside a square picture area (:func:`fit_box`); a placeholder has
  the aspect of the size that was asked for, so a missing 9:16 banner looks like a missing 9:16 banner;
- an image that cannot be decoded becomes an ``unreadable`` placeholder; it never breaks the sheet.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from PIL import Image, ImageDraw, ImageFont

FontType = ImageFont.FreeTypeFont | ImageFont.ImageFont

#: Sheet background, card, picture area and text colours.
BACKGROUND: Final = (236, 238, 241)
CARD: Final = (255, 255, 255)
PICTURE_AREA: Final = (246, 247, 249)
INK: Final = (32, 33, 36)
MUTED: Final = (95, 99, 104)
HEADER: Final = (32, 33, 36)
HEADER_INK: Final = (255, 255, 255)
#: Colour of each status (dot in the caption, tint of placeholders); others use ``MUTED``.
STATUS_COLOURS: Final[dict[str, tuple[int, int, int]]] = {
    "completed": (30, 142, 62),
    "moderated": (227, 116, 0),
    "failed": (217, 48, 37),
    "unreadable": (217, 48, 37),
}
#: Tiles drawn at most; a longer run's sheet says how many were left out (the gallery lists all).
DEFAULT_MAX_TILES: Final = 400

_FONT_CANDIDATES: Final = (
    "DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:/Windows/Fonts/arial.ttf",
)
_BOLD_CANDIDATES: Final = (
    "DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "Arial Bold.ttf",
    "/System/Library/Fonts/Supplemental/Arial Bold.ttf",
    "C:/Windows/Fonts/arialbd.ttf",
)


@dataclass(frozen=True)
class Box:
    """A rectangle in sheet pixels: left, top, width, height."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        """Return the first column right of the box."""
        return self.x + self.width

    @property
    def bottom(self) -> int:
        """Return the first row below the box."""
        return self.y + self.height

    @property
    def center(self) -> tuple[int, int]:
        """Return the middle pixel."""
        return self.x + self.width // 2, self.y + self.height // 2

    def corners(self) -> tuple[int, int, int, int]:
        """Return ``(left, top, right, bottom)`` as Pillow wants it (right and bottom inclusive)."""
        return self.x, self.y, self.right - 1, self.bottom - 1


@dataclass(frozen=True)
class Slot:
    """Where one tile goes: its card, the square picture area in it, and the caption below."""

    card: Box
    picture: Box
    caption: Box


@dataclass(frozen=True)
class SheetLayout:
    """The geometry of a whole sheet."""

    width: int
    height: int
    columns: int
    rows: int
    header: Box
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class Tile:
    """One requested image, as the sheet shows it.

    :ivar title: first caption line (e.g. the prompt id).
    :ivar size: the aspect ratio asked for (``"16:9"``); shapes a placeholder and is shown in the caption.
    :ivar status: ``completed`` shows ``image``; anything else draws a placeholder labelled with it.
    :ivar image: the picture (decoded, or encoded bytes); ``None`` when there is none.
    :ivar note: a short reason under a placeholder's label (e.g. ``"content policy (80006)"``).
    """

    title: str
    size: str
    status: str
    image: Image.Image | bytes | None = None
    note: str | None = None


def sheet_layout(
    count: int,
    *,
    columns: int | None = None,
    thumb: int = 200,
    gap: int = 14,
    caption_height: int = 44,
    header_height: int = 76,
    padding: int = 8,
) -> SheetLayout:
    """Return the layout of a sheet with ``count`` tiles, filled row by row, left to right.

    :param columns: tiles per row; by default a near-landscape grid of 1 to 10 columns.
    :param thumb: side of each square picture area, in pixels.
    """
    if count < 0:
        raise ValueError(f"count={count}: must be >= 0")
    if columns is None:
        columns = max(1, min(10, count, math.ceil(math.sqrt(count * 1.6)))) if count else 1
    if columns < 1:
        raise ValueError(f"columns={columns}: must be >= 1")
    rows = math.ceil(count / columns) if count else 0
    card_w = thumb + 2 * padding
    card_h = thumb + 2 * padding + caption_height
    width = max(gap + columns * (card_w + gap), 640)
    left = (width - (columns * (card_w + gap) - gap)) // 2
    height = header_height + gap + rows * (card_h + gap) + (0 if rows else gap)
    slots = []
    for index in range(count):
        row, column = divmod(index, columns)
        x = left + column * (card_w + gap)
        y = header_height + gap + row * (card_h + gap)
        card = Box(x, y, card_w, card_h)
        picture = Box(x + padding, y + padding, thumb, thumb)
        caption = Box(x + padding, picture.bottom + 4, thumb, caption_height - 4)
        slots.append(Slot(card, picture, caption))
    return SheetLayout(width, height, columns, rows, Box(0, 0, width, header_height), tuple(slots))


def ratio(size: str) -> tuple[int, int]:
    """Return ``"16:9"`` as ``(16, 9)``; anything unparsable as a square."""
    try:
        w, h = (int(part) for part in size.split(":"))
    except (AttributeError, ValueError):
        return 1, 1
    return (w, h) if w > 0 and h > 0 else (1, 1)


def fit_box(area: Box, aspect: tuple[int, int]) -> Box:
    """Return the largest box of ``aspect`` (width, height) centred in ``area``."""
    aw, ah = aspect
    scale = min(area.width / aw, area.height / ah)
    width, height = max(1, round(aw * scale)), max(1, round(ah * scale))
    return Box(area.x + (area.width - width) // 2, area.y + (area.height - height) // 2, width, height)


def render_contact_sheet(
    tiles: Sequence[Tile],
    *,
    title: str,
    subtitle: str = "",
    columns: int | None = None,
    thumb: int = 200,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> Image.Image:
    """Return the contact sheet of ``tiles`` (the first ``max_tiles`` of them) as an RGB image."""
    shown = list(tiles[:max_tiles])
    if len(tiles) > len(shown):
        subtitle = f"{subtitle} · showing the first {len(shown)} of {len(tiles)}".lstrip(" ·")
    layout = sheet_layout(len(shown), columns=columns, thumb=thumb)
    sheet = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _draw_header(draw, layout.header, title, subtitle, shown)
    for tile, slot in zip(shown, layout.slots, strict=True):
        _draw_tile(sheet, draw, tile, slot)
    if not shown:
        draw.text((24, layout.header.bottom + 4), "nothing to show", fill=MUTED, font=_font(16))
    return sheet


def contact_sheet_png(tiles: Sequence[Tile], **kwargs: object) -> bytes:
    """Return :func:`render_contact_sheet` as PNG bytes (same arguments)."""
    buffer = io.BytesIO()
    render_contact_sheet(tiles, **kwargs).save(buffer, format="PNG", optimize=False)  # type: ignore[arg-type]
    return buffer.getvalue()


def thumbnail(image: Image.Image | bytes, side: int) -> Image.Image:
    """Return an RGB copy of ``image`` that fits in a ``side``×``side`` square (never upscaled).

    Call it where the bytes are read (in worker threads, say) to keep only small images in memory.
    """
    picture = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    picture.draft("RGB", (side, side))  # JPEG decodes at a lower scale; a no-op for PNG
    picture = picture.convert("RGB")
    picture.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return picture


# -- drawing -------------------------------------------------------------------------------------------


def _draw_header(
    draw: ImageDraw.ImageDraw, box: Box, title: str, subtitle: str, tiles: Sequence[Tile]
) -> None:
    draw.rectangle(box.corners(), fill=HEADER)
    draw.text(
        (24, 14),
        _ellipsize(title, _font(22, bold=True), box.width - 48),
        fill=HEADER_INK,
        font=_font(22, bold=True),
    )
    small = _font(14)
    draw.text((24, 46), _ellipsize(subtitle, small, box.width - 48), fill=(200, 203, 208), font=small)
    # A legend of the statuses present, right-aligned on the title line.
    present = list(dict.fromkeys(tile.status for tile in tiles))
    x = box.width - 24
    for status in reversed(present):
        label = f"{status} {sum(1 for t in tiles if t.status == status)}"
        x -= int(small.getlength(label))
        draw.text((x, 20), label, fill=HEADER_INK, font=small)
        x -= 16
        draw.ellipse((x, 23, x + 10, 33), fill=STATUS_COLOURS.get(status, (154, 160, 166)))
        x -= 18


def _draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, tile: Tile, slot: Slot) -> None:
    draw.rounded_rectangle(slot.card.corners(), radius=8, fill=CARD, outline=(218, 220, 224))
    draw.rectangle(slot.picture.corners(), fill=PICTURE_AREA)
    status, note = tile.status, tile.note
    picture: Image.Image | None = None
    if status == "completed":
        if tile.image is None:
            status, note = "unreadable", "image missing"
        else:
            try:
                picture = thumbnail(tile.image, slot.picture.width)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                status, note = "unreadable", type(exc).__name__
    if picture is not None:
        box = fit_box(slot.picture, picture.size)
        if picture.size != (box.width, box.height):
            picture = picture.resize((box.width, box.height), Image.Resampling.LANCZOS)
        sheet.paste(picture, (box.x, box.y))
    else:
        _draw_placeholder(draw, fit_box(slot.picture, ratio(tile.size)), status, note)
    colour = STATUS_COLOURS.get(status, MUTED)
    bold, small = _font(14, bold=True), _font(12)
    x, y = slot.caption.x, slot.caption.y
    draw.text((x, y + 2), _ellipsize(tile.title, bold, slot.caption.width), fill=INK, font=bold)
    draw.ellipse((x, y + 25, x + 8, y + 33), fill=colour)
    detail = _ellipsize(f"{tile.size} · {status}", small, slot.caption.width - 14)
    draw.text((x + 14, y + 22), detail, fill=MUTED, font=small)


def _draw_placeholder(draw: ImageDraw.ImageDraw, box: Box, status: str, note: str | None) -> None:
    colour = STATUS_COLOURS.get(status, MUTED)
    fill = tuple(round(255 - (255 - c) * 0.18) for c in colour)
    hatch = tuple(round(255 - (255 - c) * 0.32) for c in colour)
    draw.rectangle(box.corners(), fill=fill)
    step = 14
    for offset in range(-box.height, box.width, step):  # diagonal hatching, clipped to the box
        x0, y0 = box.x + offset, box.y
        x1, y1 = x0 + box.height, box.bottom - 1
        if x0 < box.x:
            y0, x0 = y0 + (box.x - x0), box.x
        if x1 > box.right - 1:
            y1, x1 = y1 - (x1 - (box.right - 1)), box.right - 1
        if y1 >= y0:
            draw.line((x0, y0, x1, y1), fill=hatch, width=3)
    draw.rectangle(box.corners(), outline=colour, width=2)
    label_font = _font(15, bold=True)
    label = _ellipsize(status.upper().replace("_", " "), label_font, box.width - 12)
    lines = [(label, label_font, colour)]
    if note:
        note_font = _font(11)
        lines.append((_ellipsize(note, note_font, box.width - 12), note_font, INK))
    heights = [(f.getbbox(t)[3] - f.getbbox(t)[1]) if t else 0 for t, f, _ in lines]
    y = box.y + (box.height - sum(heights) - 6 * (len(lines) - 1)) // 2
    for (text, font, fill_colour), height in zip(lines, heights, strict=True):
        width = int(font.getlength(text))
        x = box.x + (box.width - width) // 2
        top = font.getbbox(text)[1]
        draw.rectangle((x - 5, y - 3, x + width + 4, y + height + 3), fill=(255, 255, 255))
        draw.text((x, y - top), text, fill=fill_colour, font=font)
        y += height + 6


def _ellipsize(text: str, font: FontType, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


@functools.lru_cache(maxsize=16)
def _font(size: int, *, bold: bool = False) -> FontType:
    """Return a TrueType font of ``size`` pixels if one is installed, else Pillow's built-in one."""
    for candidate in _BOLD_CANDIDATES if bold else _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)
