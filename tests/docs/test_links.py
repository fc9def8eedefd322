"""Links between the pages resolve (files and heading anchors), and the index lists every page."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.markdown import DOCS, anchors, doc_files, links, rel

PAGES = doc_files()


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for line, target in links(page):
        if "://" in target or target.startswith("mailto:"):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"line {line}: {target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"line {line}: {target} (no heading #{anchor} in {rel(dest)})")
    assert not broken, f"{rel(page)}:\n" + "\n".join(broken)


def test_the_index_lists_every_page() -> None:
    listed = {(DOCS / target.partition("#")[0]).resolve() for _, target in links(DOCS / "index.md")}
    pages = {p.resolve() for p in DOCS.rglob("*.md") if p.name != "index.md"}
    assert pages <= listed, f"pages missing from docs/index.md: {sorted(rel(p) for p in pages - listed)}"
