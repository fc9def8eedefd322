"""Fake Imagen 4 output: a real PNG at Imagen 4's pixel size that shows its prompt.

A human looking at a demo's output (or a test checking a mirrored file) must be able to tell which prompt
produced which image, so the prompt is drawn large and wrapped on a background whose colour is a hash of the
prompt. Rendering costs tens of milliseconds, so it happens only on download and results are kept in a small
LRU cache; the poll path never renders.

Prompts are often Chinese. An installed CJK font is used when there is one (every character it has);
otherwise the font shipped in ``fonts/``: a subset of WenQuanYi Micro Hei (Apache License 2.0, see
``fonts/NOTICE``) with Latin, general and CJK punctuation, full-width forms and the 3,755 common Chinese
characters of GB 2312 level 1, which covers every prompt of the sample data. A rarer character (or kana,
hangul…) draws as a box with it; no system package is needed at run time.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from airflow_provider_imagen.emulator.config import MARKER_WRONG_SIZE, MODEL, SIZES

FontType = ImageFont.FreeTypeFont | ImageFont.ImageFont

#: The font shipped with the package: Latin and common Chinese, for machines without a CJK font.
BUNDLED_FONT = Path(__file__).resolve().parent / "fonts" / "WenQuanYiMicroHei-subset.ttf"

_CJK_FONT_PATTERNS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/**/*CJK*.tt[cf]",
    "/usr/share/fonts/**/*CJK*.otf",
    "/usr/share/fonts/**/NotoSans[SJTK]C*.[ot]tf",
    "/usr/share/fonts/**/wqy-*.tt[cf]",
    "/usr/share/fonts/**/DroidSansFallback*.ttf",
    "/usr/local/share/fonts/**/*CJK*.tt[cf]",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


def pixel_size(size: str, scale: float = 1.0) -> tuple[int, int]:
    """Return the (width, height) in pixels of an image of aspect ratio ``size`` scaled by ``scale``."""
    width, height = SIZES[size]
    return max(1, round(width * scale)), max(1, round(height * scale))


def rendered_size(prompt: str, size: str, scale: float = 1.0) -> tuple[int, int]:
    """Return the (width, height) the emulator renders for ``prompt`` at ``size``.

    Imagen 4's size for the ratio, or, when the prompt contains ``[[wrong_size]]``, a size of another
    aspect ratio (the other orientation; 16:9 for a square), so a client that checks what it was sent
    can catch it.
    """
    width, height = pixel_size(size, scale)
    if MARKER_WRONG_SIZE not in prompt.lower():
        return width, height
    return (height, width) if width != height else pixel_size("16:9", scale)


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> str | None:
    """Return the path of an installed font with Chinese glyphs, else of the bundled subset."""
    for pattern in _CJK_FONT_PATTERNS:
        for path in sorted(glob.glob(pattern, recursive=True)):
            try:
                ImageFont.truetype(path, 12)
            except OSError:
                continue
            return path
    return str(BUNDLED_FONT) if BUNDLED_FONT.is_file() else None


@functools.lru_cache(maxsize=32)
def load_font(size: int) -> FontType:
    """Return a font of ``size`` pixels: a CJK font (installed or bundled), else Pillow's built-in one."""
    path = find_cjk_font()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font is all there is.
        return ImageFont.load_default()


def background_colour(prompt: str) -> tuple[int, int, int]:
    """Derive a stable mid-tone colour from the prompt, so equal prompts give equal images."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return tuple(48 + digest[i] * 160 // 255 for i in range(3))  # type: ignore[return-value]


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return (16, 16, 16) if luminance > 140 else (245, 245, 245)


def _text_width(font: FontType, text: str) -> float:
    return float(font.getlength(text))


def wrap_text(text: str, font: FontType, max_width: float) -> list[str]:
    """Break ``text`` into lines no wider than ``max_width``; words too long (or CJK runs) break by character.

    Widths are summed per word (ignoring kerning across spaces), which keeps a 4000-character prompt cheap.
    """
    space = _text_width(font, " ")
    widths: dict[str, float] = {}

    def width_of(piece: str) -> float:
        if piece not in widths:
            widths[piece] = _text_width(font, piece)
        return widths[piece]

    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current: list[str] = []
        current_width = 0.0
        for word in paragraph.split():
            word_width = width_of(word)
            extra = word_width + (space if current else 0.0)
            if current_width + extra <= max_width:
                current.append(word)
                current_width += extra
                continue
            if current:
                lines.append(" ".join(current))
            if word_width <= max_width:
                current, current_width = [word], word_width
                continue
            # The word alone is too wide: split it into as many characters as fit per line.
            chunk, chunk_width = "", 0.0
            for char in word:
                char_width = width_of(char)
                if chunk and chunk_width + char_width > max_width:
                    lines.append(chunk)
                    chunk, chunk_width = "", 0.0
                chunk += char
                chunk_width += char_width
            current, current_width = ([chunk], chunk_width) if chunk else ([], 0.0)
        if current:
            lines.append(" ".join(current))
    return lines


def _layout(prompt: str, width: int, height: int) -> tuple[FontType, list[str], int]:
    """Pick the largest font size at which the wrapped prompt fits; truncate if even the smallest cannot."""
    max_width = width * 0.88
    max_height = height * 0.78
    size = max(12, int(min(width, height) / 9))
    minimum = max(10, int(min(width, height) / 40))
    while True:
        font = load_font(size)
        line_height = int(size * 1.25)
        lines = wrap_text(prompt, font, max_width)
        if len(lines) * line_height <= max_height or size <= minimum:
            break
        size = max(minimum, int(size * 0.85))
    fitting = max(1, int(max_height // line_height))
    if len(lines) > fitting:
        lines = lines[:fitting]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return font, lines, line_height


def render_png(prompt: str, size: str, scale: float = 1.0, task_id: str = "") -> bytes:
    """Render ``prompt`` as PNG bytes at Imagen 4's pixel size for ``size`` (times ``scale``).

    See :func:`rendered_size` for the ``[[wrong_size]]`` marker.

    The task id goes in the footer: like real renders, two tasks with the same prompt (variations)
    give different images.
    """
    width, height = rendered_size(prompt, size, scale)
    background = background_colour(prompt)
    ink = _text_colour(background)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    font, lines, line_height = _layout(prompt, width, height)
    top = (height - len(lines) * line_height) / 2
    for index, line in enumerate(lines):
        line_width = _text_width(font, line)
        draw.text(((width - line_width) / 2, top + index * line_height), line, fill=ink, font=font)

    footer_size = max(8, int(min(width, height) / 40))
    footer = f"reAPI emulator · {MODEL} · {size} · {width}x{height}" + (f" · {task_id}" if task_id else "")
    footer_font = load_font(footer_size)
    draw.text((footer_size, height - footer_size * 2), footer, fill=ink, font=footer_font)

    if task_id:  # a thin stripe coloured by the task id: distinct bytes even where the footer is clipped
        draw.rectangle((0, 0, width, max(2, height // 100)), fill=background_colour(task_id))

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ImageCache:
    """A thread-safe LRU of rendered PNGs keyed by (prompt, size, scale, task id)."""

    def __init__(self, maxsize: int = 64) -> None:
        """Keep at most ``maxsize`` images."""
        self.maxsize = maxsize
        self._items: OrderedDict[tuple[str, str, float, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Return how many images are cached."""
        with self._lock:
            return len(self._items)

    def get(self, prompt: str, size: str, scale: float = 1.0, task_id: str = "") -> bytes:
        """Return the PNG for these inputs, rendering it on a miss (outside the lock)."""
        key = (prompt, size, scale, task_id)
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                return cached
        data = render_png(prompt, size, scale, task_id)
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return data
