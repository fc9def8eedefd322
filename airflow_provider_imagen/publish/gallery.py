"""The gallery: one static HTML page per published run, to browse its images and read their prompts.

Why: the contact sheet shows everything at once but small, and cannot show a prompt (or Chinese text
without a CJK font). The page links the full images, prints each prompt, and lists the rows that were
never sent because they were invalid. It is a single file with no scripts and no external assets, so it
opens from a local folder, an object-store website or an artifact viewer alike.

Invariants:
- standard library only; every value from the data (prompts, ids, reasons, URIs) is HTML-escaped, so a
  prompt holding markup shows as text and cannot inject into the page;
- links are whatever the caller passes (relative links keep the folder portable); a link that is not
  relative, ``http(s)://``, ``file://``, ``s3://`` or ``gs://`` is dropped rather than written.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from airflow_provider_imagen.publish.contact_sheet import STATUS_COLOURS

_SAFE_LINK: Final = re.compile(r"^(?:(?:https?|file|s3|gs|gcs)://|(?![a-zA-Z][a-zA-Z0-9+.-]*:))")

_CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",sans-serif;
margin:0;background:#eceef1;color:#202124}
header{background:#202124;color:#fff;padding:18px 28px}
header h1{font-size:20px;margin:0 0 4px}
header p{margin:0;color:#c8cbd0}
main{padding:20px 28px}
.sheet img{max-width:100%;border-radius:8px;border:1px solid #dadce0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;margin-top:18px}
figure{margin:0;background:#fff;border:1px solid #dadce0;border-radius:8px;padding:8px}
figure .pic{height:200px;display:flex;align-items:center;justify-content:center;background:#f6f7f9}
figure img{max-width:100%;max-height:200px}
.ph{font-weight:700;text-transform:uppercase;padding:6px 10px;border:2px solid;background:#fff}
figcaption b{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.st{font-size:12px;color:#5f6368}
.dot{display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:5px}
.prompt{font-size:12px;margin-top:4px;max-height:5.8em;overflow:auto}
table{border-collapse:collapse;background:#fff;margin-top:10px}
td,th{border:1px solid #dadce0;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
""".strip()


@dataclass(frozen=True)
class GalleryItem:
    """One requested image on the page."""

    prompt_id: str
    size: str
    status: str
    prompt: str | None
    #: Link to the full image, or ``None`` when there is none.
    href: str | None = None
    #: Why it has no image (error message), shown under the status.
    note: str | None = None


@dataclass(frozen=True)
class InvalidRow:
    """A row of the input that was never sent."""

    row: int
    prompt_id: str
    reason: str


def render_gallery(
    items: Sequence[GalleryItem],
    *,
    title: str,
    summary: str = "",
    contact_sheet_href: str | None = None,
    manifest_href: str | None = None,
    invalid: Sequence[InvalidRow] = (),
) -> str:
    """Return the gallery page as HTML text (UTF-8 declared)."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{esc(title)}</h1><p>{esc(summary)}</p></header><main>",
    ]
    links = []
    if _safe(manifest_href):
        links.append(f'<a href="{esc(manifest_href or "")}">manifest (Parquet)</a>')
    if _safe(contact_sheet_href):
        links.append(f'<a href="{esc(contact_sheet_href or "")}">contact sheet (PNG)</a>')
    if links:
        parts.append(f"<p>{' · '.join(links)}</p>")
    if _safe(contact_sheet_href):
        href = esc(contact_sheet_href or "")
        parts.append(f'<div class="sheet"><a href="{href}"><img src="{href}" alt="contact sheet"></a></div>')
    parts.append('<div class="grid">')
    for item in items:
        parts.append(_figure(item))
    parts.append("</div>")
    if invalid:
        parts.append(f"<h2>{len(invalid)} invalid row(s), never sent</h2><table>")
        parts.append("<tr><th>row</th><th>prompt_id</th><th>reason</th></tr>")
        for bad in invalid:
            parts.append(
                f"<tr><td>{bad.row}</td><td>{esc(bad.prompt_id)}</td><td>{esc(bad.reason)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _figure(item: GalleryItem) -> str:
    esc = html.escape
    colour = "#{:02x}{:02x}{:02x}".format(*STATUS_COLOURS.get(item.status, (95, 99, 104)))
    alt = f"{item.prompt_id} {item.size}"
    if item.href and _safe(item.href):
        href = esc(item.href)
        picture = f'<a href="{href}"><img loading="lazy" src="{href}" alt="{esc(alt)}"></a>'
    else:
        picture = f'<span class="ph" style="color:{colour}">{esc(item.status.replace("_", " "))}</span>'
    note = f" — {esc(item.note)}" if item.note else ""
    prompt = f'<div class="prompt">{esc(item.prompt)}</div>' if item.prompt else ""
    return (
        f'<figure><div class="pic">{picture}</div><figcaption><b title="{esc(item.prompt_id)}">'
        f"{esc(item.prompt_id)}</b>"
        f'<span class="st"><span class="dot" style="background:{colour}"></span>'
        f"{esc(item.size)} · {esc(item.status)}{note}</span>{prompt}</figcaption></figure>"
    )


def _safe(href: str | None) -> bool:
    return bool(href) and _SAFE_LINK.match(href or "") is not None
