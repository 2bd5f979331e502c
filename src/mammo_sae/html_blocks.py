"""Static HTML building blocks: escaped tables, figures and sections, one self-contained page.

No JavaScript, no network: the page and its PNGs open from disk anywhere. Below both `analysis`
(the `explain` and `retrieve` pages) and `report` (the run report), so neither imports the other
for them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;background:#fafafa}
header{background:#12263a;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d6e3;font-size:14px}
.layout{display:flex;align-items:flex-start}
nav.toc{position:sticky;top:0;flex:0 0 210px;max-height:100vh;overflow-y:auto;box-sizing:border-box;
padding:12px 14px;background:#e8eef4;font-size:13px;border-right:1px solid #d0d7de}
nav.toc a{display:block;padding:3px 0;color:#12263a;text-decoration:none}
nav.toc a:hover{text-decoration:underline}
nav.toc b{display:block;margin-bottom:4px;font-size:12px;color:#57606a;text-transform:uppercase}
main{flex:1 1 auto;min-width:0;padding:8px 32px 40px}
@media (max-width:900px){.layout{display:block}nav.toc{flex:none;max-height:none;border-right:0;
z-index:1;border-bottom:1px solid #d0d7de}nav.toc a{display:inline-block;margin-right:14px}}
section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:8px 20px 16px;
margin:18px 0;overflow-x:auto;scroll-margin-top:8px}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:6px}h3{font-size:15px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right}th{background:#f3f5f7}
td.l,th.l{text-align:left}.note{color:#57606a;font-size:13px}
figure{display:block;margin:10px 0}
figure img{max-width:100%;height:auto;border:1px solid #ddd;background:#fff}
figure.thumb{display:inline-block;margin:8px 12px 8px 0;vertical-align:top}
figcaption{font-size:12px;color:#57606a;max-width:960px}
.crops{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}.crops figure{margin:0;text-align:center}
.crops img{width:112px;height:auto;image-rendering:pixelated}.crops figcaption{font-size:11px}
.kpi{display:inline-block;margin:6px 18px 6px 0}.kpi b{display:block;font-size:20px}
code{background:#f3f5f7;padding:1px 4px;border-radius:3px}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:8px;font-size:12px;overflow:auto;max-height:420px}
.flag{color:#b31d28;font-weight:600}
details{margin:6px 0}summary{cursor:pointer;font-weight:600;font-size:14px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—" if math.isnan(value) else str(value)
        value += 0.0  # -0.0 -> 0.0
        if value != 0 and not 10**-digits <= abs(value) < 1e6:  # tiny or huge: keep the digits
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def short_id(image_id: str) -> str:
    """VinDr ids are 32 hex digits: the first 12 identify an image well enough on a figure."""
    return image_id if len(image_id) <= 14 else image_id[:12] + "…"


def table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: Sequence[str] | None = None,
    digits: int = 3,
    left: int = 1,
) -> str:
    """An HTML table; the first `left` columns are left-aligned (labels)."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns = list(columns or rows[0].keys())
    headers = list(headers or columns)
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{esc(h)}</th>' for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{"l" if i < left else ""}">{esc(fmt(row.get(c), digits))}</td>'
            for i, c in enumerate(columns)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(src: str, caption: str = "", width: int | None = None) -> str:
    """A figure as wide as the page allows (a `width` in px makes it an inline thumbnail); the
    image links to its PNG, so a click opens it full size (no JavaScript)."""
    attrs = f' class="thumb" style="width:{width}px"' if width else ""
    return (
        f'<figure{attrs}><a href="{esc(src)}"><img src="{esc(src)}" '
        f'alt="{esc(caption or src)}" loading="eager"></a>'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def strip(items: Sequence[tuple[str, str]]) -> str:
    """A row of small linked images, each (src, caption): e.g. a latent's top patch crops."""
    crops = "".join(figure(src, caption) for src, caption in items)
    return f'<div class="crops">{crops}</div>'


def link(href: str, text: Any) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def details(summary: str, body_html: str, *, open_: bool = False) -> str:
    """A collapsible block (no JavaScript): `summary` is plain text, `body_html` is HTML."""
    return (
        f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{body_html}</details>"
    )


def note(text: Any) -> str:
    return f'<p class="note">{esc(text)}</p>'


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def html_table(rows: Sequence[Sequence[str]], headers: Sequence[str], *, left: int = 1) -> str:
    """A table whose cells are already-escaped HTML (for links); use `table` for plain values."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{esc(h)}</th>' for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"l" if i < left else ""}">{cell}</td>' for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kpis(items: dict[str, Any]) -> str:
    return "".join(
        f'<span class="kpi"><b>{esc(fmt(v))}</b>{esc(k)}</span>' for k, v in items.items()
    )


@dataclass
class Section:
    anchor: str
    title: str
    body: list[str] = field(default_factory=list)

    def add(self, html_text: str) -> Section:
        self.body.append(html_text)
        return self

    def render(self) -> str:
        return f'<section id="{esc(self.anchor)}"><h2>{esc(self.title)}</h2>{"".join(self.body)}</section>'


def page(
    title: str,
    subtitle: str,
    sections: Sequence[Section],
    *,
    nav: bool = True,
    back: tuple[str, str] | None = None,
) -> str:
    """The whole document: a section index (`nav`: a sticky side column linking every section's
    anchor, on top on narrow screens), then the sections; `back` = (href, text) puts a link
    first in the index."""
    links = (
        "".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections) if nav else ""
    )
    if links:
        links = "<b>Sections</b>" + links
    if back:
        links = link(*back) + links
    index = f'<nav class="toc">{links}</nav>' if links else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
        f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f'<div class="layout">{index}<main>'
        f"{''.join(s.render() for s in sections)}</main></div></body></html>\n"
    )
