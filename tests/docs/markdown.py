"""Read the documentation the way the doc tests need it: fenced blocks, tagged tables, links, headings.

The docs are plain GitHub Markdown. Two conventions make them testable without a site generator:

- a fenced ``python`` block is executed unless its first lines carry a directive comment::

      # doc-test: skip (reason)          compiled only (needs a real bucket, the real API, ...)
      # doc-test: file=tests/conftest.py  one file of an example project, assembled per page and run
                                          with pytest in a subprocess when the project has tests
      # doc-test: include=dags/x.py#name  quotes the ``# [START name]`` … ``# [END name]`` region of a
                                          file, and must stay equal to it
      # doc-test: needs=batch-output      runs after a small real batch was made in ./imagery/catalog
      # doc-test: needs=s3                runs with ``aws_default`` serving ``my-bucket`` (local S3)

- a table is checked against the code when an HTML comment (invisible on GitHub) tags it::

      <!-- doc-test: params airflow_provider_imagen.operators.generate.ImagenGenerateOperator -->
      | Parameter | Default | Templated | Description |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_DIRECTIVE = re.compile(r"^\s*#\s*doc-test:\s*(?P<body>.*)$")
_TAG = re.compile(r"^<!--\s*doc-test:\s*(?P<kind>[\w-]+)\s*(?P<arg>[^>]*?)\s*-->\s*$")
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.+?)\s*#*\s*$")


def doc_files() -> list[Path]:
    """Return every Markdown page of the docs, plus the README (its snippets are docs too)."""
    return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def rel(path: Path) -> str:
    """Return ``path`` relative to the repository, for test ids and messages."""
    return str(path.relative_to(ROOT))


@dataclass
class Block:
    """One fenced code block."""

    path: Path
    line: int
    lang: str
    code: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line}"

    @property
    def skip(self) -> bool:
        return "skip" in self.directives

    @property
    def file(self) -> str | None:
        return self.directives.get("file")


def _directives(code: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in code.splitlines():
        match = _DIRECTIVE.match(line)
        if not match:
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        for word in match.group("body").split():
            if word.startswith("("):
                break  # the rest is a human-readable reason
            key, _, value = word.partition("=")
            found[key] = value
    return found


def blocks(path: Path) -> list[Block]:
    """Return the fenced code blocks of one page, in order."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group("fence"), match.group("info").strip().split(" ")[0].lower()
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        code = "\n".join(lines[start:j]) + "\n"
        out.append(Block(path, start, lang, code, _directives(code)))
        i = j + 1
    return out


def all_blocks(*langs: str) -> list[Block]:
    """Return the blocks of the given languages across every page."""
    return [b for path in doc_files() for b in blocks(path) if b.lang in langs]


def prose(path: Path) -> list[tuple[int, str]]:
    """Return (line number, text) of the lines outside fenced blocks."""
    out: list[tuple[int, str]] = []
    inside: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if inside is None and match:
            inside = match.group("fence")
            continue
        if inside is not None:
            if line.strip().startswith(inside):
                inside = None
            continue
        out.append((number, line))
    return out


# -- tables ---------------------------------------------------------------------------------------


@dataclass
class Table:
    """A Markdown table under a ``<!-- doc-test: kind arg -->`` tag."""

    path: Path
    line: int
    kind: str
    arg: str
    header: list[str]
    rows: list[dict[str, str]]

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line} {self.kind} {self.arg}".strip()

    def column(self, name: str) -> list[str]:
        return [row[name] for row in self.rows]


def _cells(line: str) -> list[str]:
    text = line.strip().strip("|")
    # A pipe inside backticks (``a | b``) is escaped as \| in GitHub tables.
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", text)]


def tables(path: Path) -> list[Table]:
    """Return the tagged tables of one page."""
    out: list[Table] = []
    lines = prose(path)
    for index, (number, line) in enumerate(lines):
        match = _TAG.match(line.strip())
        if not match:
            continue
        rest = [text for _, text in lines[index + 1 :]]
        while rest and not rest[0].strip():
            rest.pop(0)
        body = []
        for text in rest:
            if not text.strip().startswith("|"):
                break
            body.append(text)
        if len(body) < 2:
            raise AssertionError(f"{rel(path)}:{number}: a doc-test tag must be followed by a table")
        header = _cells(body[0])
        rows = [dict(zip(header, _cells(text), strict=False)) for text in body[2:]]
        out.append(Table(path, number, match.group("kind"), match.group("arg"), header, rows))
    return out


def all_tables(kind: str) -> list[Table]:
    """Return the tagged tables of one kind across every page."""
    return [t for path in doc_files() for t in tables(path) if t.kind == kind]


def code_spans(cell: str) -> list[str]:
    """Return the inline code spans of a table cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


# -- links and headings ---------------------------------------------------------------------------


def links(path: Path) -> list[tuple[int, str]]:
    """Return (line, target) of every Markdown link outside code."""
    found: list[tuple[int, str]] = []
    for number, line in prose(path):
        stripped = re.sub(r"`[^`]*`", "", line)
        found += [(number, m.group("target")) for m in _LINK.finditer(stripped)]
    return found


def github_slug(text: str) -> str:
    """Return the anchor GitHub gives a heading (before de-duplication)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](link) → text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Return every heading anchor of a page, with GitHub's ``-1``, ``-2`` suffixes for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose(path):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group("text"))
        count = seen.get(slug, 0)
        out.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return out


def headings(path: Path) -> list[str]:
    """Return the text of every heading of a page."""
    return [m.group("text") for _, line in prose(path) if (m := _HEADING.match(line))]
