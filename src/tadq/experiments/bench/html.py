"""A self-contained HTML page: inline CSS, every figure embedded as a base64 PNG, no scripts and no external
assets, so the report can be mailed or archived as one file and still show everything."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["code", "figure", "page", "paragraph", "section", "table"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr.unsupported td { color: #888; font-style: italic; }
tr.fp td { background: #f8f8ff; }
td.status { text-align: left; max-width: 32em; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
.note { font-size: .9em; color: #444; }
"""


def _escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def paragraph(text: str, css_class: str = "") -> str:
    attribute = f' class="{_escape(css_class)}"' if css_class else ""
    return f"<p{attribute}>{_escape(text)}</p>"


def code(text: str) -> str:
    return f"<pre><code>{_escape(text)}</code></pre>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], row_classes: Iterable[str] = ()) -> str:
    """An HTML table of already formatted cells; the last column is styled as a free-text status."""
    classes = list(row_classes)
    head = "".join(f"<th>{_escape(h)}</th>" for h in headers)
    body = []
    for index, cells in enumerate(rows):
        css = f' class="{_escape(classes[index])}"' if index < len(classes) and classes[index] else ""
        tds = [f"<td>{_escape(c)}</td>" for c in cells[:-1]] + [f'<td class="status">{_escape(cells[-1])}</td>']
        body.append(f"<tr{css}>{''.join(tds)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(path: Path, caption: str) -> str:
    """``path`` (a PNG) embedded as a data URI with its caption; an empty string when the file does not exist."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_escape(caption)}</figcaption></figure>")


def section(title: str, parts: Iterable[str], level: int = 2) -> str:
    return f"<section><h{level}>{_escape(title)}</h{level}>{''.join(parts)}</section>"


def page(title: str, parts: Iterable[str]) -> str:
    """The whole document: one ``<style>`` block, no ``<script>``, no ``<link>``."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{_escape(title)}</h1>{''.join(parts)}</body></html>\n")
