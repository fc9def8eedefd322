"""The fake Imagen 4 renderer: sizes, colours, wrapping and the LRU cache (no server needed)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from airflow_provider_imagen.emulator.config import SIZES
from airflow_provider_imagen.emulator.images import (
    ImageCache,
    background_colour,
    load_font,
    pixel_size,
    render_png,
    wrap_text,
)


def test_pixel_sizes_match_imagen_4() -> None:
    assert {size: pixel_size(size) for size in SIZES} == {
        "1:1": (1024, 1024),
        "3:4": (896, 1280),
        "4:3": (1280, 896),
        "9:16": (768, 1408),
        "16:9": (1408, 768),
    }
    assert pixel_size("16:9", 0.25) == (352, 192)


@pytest.mark.parametrize("size", ["16:9", "9:16"])
def test_render_is_a_real_png_of_the_right_size(size: str) -> None:
    data = render_png("a lighthouse in a storm", size)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size == pixel_size(size)
        image.load()
        corner = image.getpixel((2, 2))
        assert corner == background_colour("a lighthouse in a storm")
        # Text was drawn: the image is not a single flat colour.
        assert len(image.getcolors(maxcolors=1_000_000) or []) > 2


def test_background_is_derived_from_the_prompt() -> None:
    assert background_colour("a") == background_colour("a")
    assert background_colour("a") != background_colour("b")


@pytest.mark.parametrize("prompt", ["word " * 800, "猫" * 4000, "x" * 4000, "line one\n\nline two"])
def test_wrapping_fits_the_width_and_long_prompts_still_render(prompt: str) -> None:
    font = load_font(24)
    lines = wrap_text(prompt, font, 300)
    assert lines and all(font.getlength(line) <= 300 + 1 for line in lines)
    with Image.open(io.BytesIO(render_png(prompt, "1:1", 0.25))) as image:
        assert image.size == (256, 256)


def test_cache_is_bounded_lru() -> None:
    cache = ImageCache(maxsize=2)
    first = cache.get("a", "1:1", 0.1)
    cache.get("b", "1:1", 0.1)
    assert cache.get("a", "1:1", 0.1) is first  # a hit, and now the most recent
    cache.get("c", "1:1", 0.1)  # evicts "b"
    assert len(cache) == 2
    assert cache.get("a", "1:1", 0.1) is first


def test_chinese_prompts_draw_their_characters_without_a_system_font(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no CJK font installed, the bundled subset draws every character of the sample data's prompts."""
    import glob as glob_module

    import pandas as pd

    from airflow_provider_imagen.emulator import images

    monkeypatch.setattr(images, "_CJK_FONT_PATTERNS", ())
    images.find_cjk_font.cache_clear()
    images.load_font.cache_clear()
    try:
        assert images.find_cjk_font() == str(images.BUNDLED_FONT)
        font = images.load_font(32)
        box = bytes(font.getmask("\uffff"))  # a code point no font draws: its "tofu" box
        prompts = set()
        for path in glob_module.glob("dags/data/**/*.parquet", recursive=True):
            prompts |= set(pd.read_parquet(path)["prompt"].dropna().astype(str))
        text = {ch for prompt in prompts for ch in prompt if not ch.isspace()}
        assert any(ord(ch) > 0x2E80 for ch in text)  # the sample data has Chinese prompts
        drawn = {ch: bytes(font.getmask(ch)) for ch in text}
        assert not [ch for ch, mask in drawn.items() if mask == box or not any(mask)]
        assert drawn["茶"] != drawn["的"] != drawn["a"]
    finally:
        images.find_cjk_font.cache_clear()
        images.load_font.cache_clear()
