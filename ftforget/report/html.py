"""``ftforget report ... --html``: the report as one self-contained HTML page.

The page holds everything the Markdown report holds (the table, the curve statistics, the knob and
routing tables, the notes), the figures embedded as base64 PNG, and links to each row's run
directories. It loads nothing at view time (no network, no CDN, no other file): it opens offline, can be
mailed as one file, and prints (print styles drop the sorting hints). Every table sorts by a click on a
column header, through a small inline script; cells sort by their leading number (``97.21 ± 0.35`` by
97.21, ``—`` last), text otherwise.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

from ftforget.files import atomic_write
from ftforget.report.table import Row

HTML_FILE = "report.html"

_STYLE = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 1.6em; } h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
tr:nth-child(even) td { background: #f7f7f7; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
code { background: #f2f2f2; padding: 0 0.2em; }
.hint { color: #666; font-size: 0.85em; }
@media print { body { max-width: none; margin: 0; } th { cursor: auto; } .hint { display: none; }
               th::after { content: "" !important; } figure, table { page-break-inside: avoid; } }
"""

# Sorts a table by the clicked column: by the cell's leading number where both cells have one, else as
# text; a second click reverses. Cells without a value ("—") go last either way.
_SCRIPT = """
function ftfKey(cell) {
  var t = cell.textContent.trim().replace(/,/g, "");
  var m = t.match(/^[+-]?[0-9]*\\.?[0-9]+(e[+-]?[0-9]+)?/i);
  return m ? parseFloat(m[0]) : (t === "" || t.charAt(0) === "\\u2014" ? null : t.toLowerCase());
}
function ftfSort(th) {
  var table = th.closest("table"), col = th.cellIndex, body = table.tBodies[0];
  var up = th.getAttribute("aria-sort") !== "ascending";
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", up ? "ascending" : "descending");
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = ftfKey(a.cells[col]), y = ftfKey(b.cells[col]);
    if (x === null || y === null) { return (x === null) - (y === null); }
    var d = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return up ? d : -d;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.querySelectorAll("th").forEach(function (th) {
  th.addEventListener("click", function () { ftfSort(th); });
});
"""


def _inline(text: str) -> str:
    """Escapes ``text`` and renders Markdown's ``code``, **bold** and *italic* spans."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", out)


def table_cells(line: str) -> list[str]:
    """The cells of one Markdown table line ``| a | b |``, stripped."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    header, body = table_cells(lines[0]), [table_cells(line) for line in lines[2:]]
    head = "".join(f'<th scope="col">{_inline(c)}</th>' for c in header)
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>\n" for row in body)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody>\n</table>\n"


def markdown_to_html(markdown: str) -> str:
    """The subset of Markdown the report writes: ``#`` headings, tables, paragraphs, inline code."""
    out: list[str] = []
    blocks = re.split(r"\n\s*\n", markdown.strip())
    for block in blocks:
        lines = [line for line in block.splitlines() if line.strip()]
        while lines:
            if lines[0].startswith("#"):
                level = min(len(lines[0]) - len(lines[0].lstrip("#")) + 1, 6)  # the page's h1 is its title
                out.append(f"<h{level}>{_inline(lines[0].lstrip('#').strip())}</h{level}>")
                lines = lines[1:]
            elif lines[0].lstrip().startswith("|"):
                end = next(
                    (i for i, line in enumerate(lines) if not line.lstrip().startswith("|")), len(lines)
                )
                out.append(_table(lines[:end]))
                lines = lines[end:]
            else:
                end = next(
                    (i for i, line in enumerate(lines) if line.lstrip().startswith(("|", "#"))), len(lines)
                )
                out.append(f"<p>{_inline(' '.join(lines[:end]))}</p>")
                lines = lines[end:]
    return "\n".join(out) + "\n"


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    title = path.stem.replace("_", " ")
    return (
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(path.name)}</figcaption></figure>"
    )


def _runs(rows: list[Row], page_dir: Path) -> str:
    """One list item per row: its run directories as links relative to the page (they open in a file
    browser next to the page; absolute paths in the text)."""
    items = []
    for row in rows:
        links = []
        for run in row.run.split(";"):
            href = Path(os.path.relpath(Path(run).resolve(), page_dir.resolve())).as_posix()
            links.append(f'<a href="{html.escape(href)}/">{html.escape(run)}</a>')
        items.append(f"<li>{html.escape(row.method)}: {', '.join(links)}</li>")
    return "<ul>\n" + "\n".join(items) + "\n</ul>\n"


def render_html(document: str, rows: list[Row], figures: list[Path], page_dir: Path) -> str:
    """The page: the report's Markdown ``document`` as HTML, then the figures (PNG, embedded) and the
    run directories of each row (links relative to ``page_dir``, where the page is written)."""
    # a report of streams only (ftforget stream) has no forgetting table: its document is the stream section
    body = markdown_to_html(("## Forgetting table\n\n" if rows else "") + document)
    pictures = "\n".join(_figure(p) for p in figures if p.suffix == ".png")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>ftforget report</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        "<h1>ftforget report</h1>\n"
        '<p class="hint">Click a column header to sort by it; click again to reverse.</p>\n'
        f"{body}"
        + (f"<h2>Figures</h2>\n{pictures}\n" if pictures else "")
        + (f"<h2>Runs</h2>\n{_runs(rows, page_dir)}" if rows else "")
        + f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_html(document: str, rows: list[Row], figures: list[Path], out_dir: Path) -> Path:
    """Writes :data:`HTML_FILE` into ``out_dir`` (atomically) and returns its path."""
    path = Path(out_dir) / HTML_FILE
    page = render_html(document, rows, figures, path.parent).encode("utf-8")
    atomic_write(path, lambda f: f.write(page))
    return path
