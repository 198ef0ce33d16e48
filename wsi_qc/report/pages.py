"""The report's pages: report.html (one row per slide, filter and sort, timings folded away) and one page per
slide (overlay, score map, gallery of its worst tiles)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_qc.report.html import cell, document, esc, href, img, is_missing, number, traceback_details, write_page
from wsi_qc.report.manifest import report_columns

# (row key, header, number format, column width) of the summary table; the other columns go to the timings section
MAIN_COLUMNS = (
    ("slide", "slide", None, "14rem"), ("status", "status", None, "5rem"), ("n_tiles", "tiles", "{:d}", "5rem"),
    ("kept_pct", "kept %", "{:.1f}", "5rem"), ("rl2_median", "rl2 median", "{:.4g}", "6.5rem"),
    ("rl2_p95", "rl2 p95", "{:.4g}", "5.5rem"), ("flagged_kinds", "flagged kinds", None, "8rem"),
    ("error", "error / warning", None, "minmax(12rem, 1fr)"),
)
# Each row of the slides table is a grid of fixed columns, not a table row, so that rows out of view skip style,
# layout and paint (content-visibility); a table lays out every cell of 1000 rows before it shows the first.
SLIDES_CSS = (
    "#slides{display:block;border:solid #ddd;border-width:1px 0 0 1px} #slides thead,#slides tbody{display:block}"
    f"#slides tr{{display:grid;grid-template-columns:{' '.join(w for *_, w in MAIN_COLUMNS)} calc(120px + 1rem)}}"
    "#slides tbody tr{content-visibility:auto;contain-intrinsic-size:auto 101px} #slides tr[hidden]{display:none}"
    "#slides th,#slides td{border-width:0 1px 1px 0;overflow-wrap:anywhere} #slides td:first-child{font-weight:600}"
)
DETAIL_FORMATS = {"n_keep": "{:d}", "seconds": "{:.1f}"}
HIDDEN = {"traceback", "warning"}  # not in the folded table: the traceback has its own, the warning the error column

SUMMARY_JS = """
(function(){
  function value(cell){
    return cell.hasAttribute('data-value') ? cell.getAttribute('data-value') : cell.textContent.trim();
  }
  function compare(a, b){
    var x = Number(a), y = Number(b);
    if (!isNaN(x) && !isNaN(y)) return x - y;
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: 'base'});
  }
  function sortBy(th){
    var table = th.closest('table'), body = table.tBodies[0];
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(r, s){
      var a = value(r.cells[index]), b = value(s.cells[index]);
      if (a === '' || b === '') return (a === '') - (b === '');
      return ascending ? compare(a, b) : compare(b, a);
    });
    rows.forEach(function(r){ body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable th[data-col]').forEach(function(th){
    th.addEventListener('click', function(){ sortBy(th); });
  });
  var status = document.getElementById('status-filter'), lo = document.getElementById('kept-min');
  var hi = document.getElementById('kept-max'), shown = document.getElementById('shown');
  function bound(input){ return input.value === '' ? null : Number(input.value); }
  function filter(){
    var s = status.value, a = bound(lo), b = bound(hi), rows = document.querySelectorAll('#slides tbody tr'), n = 0;
    rows.forEach(function(tr){
      var kept = tr.getAttribute('data-kept'), k = kept === '' ? null : Number(kept);
      var ok = (s === '' || tr.getAttribute('data-status') === s)
        && (a === null || (k !== null && k >= a)) && (b === null || (k !== null && k <= b));
      tr.hidden = !ok;
      if (ok) n++;
    });
    shown.textContent = n + ' of ' + rows.length + ' slides shown';
  }
  [status, lo, hi].forEach(function(el){ el.addEventListener('input', filter); });
  filter();
})();
"""


def _flagged(value: Any) -> str:
    """Text of a row's flagged_kinds: a list of kinds, {kind: count}, or a string; "" when absent."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k} ({v})" for k, v in value.items())
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(map(str, value))
    return "" if is_missing(value) else str(value)


def _cards(rows: Sequence[Mapping[str, Any]]) -> str:
    statuses = [str(r.get("status", "")) for r in rows]
    n_done, n_failed = statuses.count("done"), statuses.count("failed")
    n_tiles = sum(int(number(r.get("n_tiles")) or 0) for r in rows)
    n_keep = sum(int(number(r.get("n_keep")) or 0) for r in rows)
    kept = f"{100.0 * n_keep / n_tiles:.1f} %" if n_tiles else "n/a"
    cards = [("slides", len(rows), ""), ("done", n_done, ""), ("failed", n_failed, " bad" if n_failed else ""),
             ("tiles", n_tiles, ""), ("kept tiles", n_keep, ""), ("kept", kept, "")]
    others = len(rows) - n_done - n_failed
    if others:
        cards.insert(3, ("other status", others, ""))
    return '<div class="summary">' + "".join(
        f'<div class="card{cls}" data-key="{esc(name)}"><b>{esc(value)}</b><span>{esc(name)}</span></div>'
        for name, value, cls in cards
    ) + "</div>"


def _failures(rows: Sequence[Mapping[str, Any]]) -> str:
    failed = [r for r in rows if str(r.get("status", "")) == "failed"]
    if not failed:
        return ""
    items = "".join(f'<li><b>{esc(r.get("slide"))}</b> <span class="meta">{esc(r.get("path"))}</span>'
                    f'<div class="error">{esc(r.get("error"))}</div>{traceback_details(r)}</li>' for r in failed)
    return f'<h2>Failed slides ({len(failed)})</h2><ul class="failures">{items}</ul>'


def _filters(rows: Sequence[Mapping[str, Any]]) -> str:
    statuses = sorted({str(r.get("status", "")) for r in rows})
    options = '<option value="">all</option>' + "".join(f'<option value="{esc(s)}">{esc(s)}</option>' for s in statuses)
    return ('<div class="filters"><label>status <select id="status-filter">' + options + "</select></label>"
            '<label>kept % from <input id="kept-min" type="number" min="0" max="100" step="any"></label>'
            '<label>to <input id="kept-max" type="number" min="0" max="100" step="any"></label>'
            f'<span id="shown" class="meta">{len(rows)} slides</span>'
            "<span class=\"meta\">Click a column header to sort.</span></div>")


def _slide_link(slide: str, page_dir: Path, slide_pages: Mapping[str, str | os.PathLike] | None,
                sections: Mapping[str, str] | None) -> str | None:
    if sections and slide in sections:
        return f"#slide-{esc(slide)}"
    if slide_pages and slide in slide_pages:
        return href(slide_pages[slide], page_dir)
    return None


def _main_row(row: Mapping[str, Any], link: str | None, thumbnail: str) -> str:
    slide, status = str(row.get("slide")), str(row.get("status", ""))
    cells = [f'<td data-value="{esc(slide)}" title="{esc(row.get("path"))}">'
             + (f'<a href="{link}">{esc(slide)}</a>' if link else esc(slide)) + "</td>",
             f'<td data-value="{esc(status)}" class="status-{esc(status)}">{esc(status)}</td>']
    cells += [cell(row.get(key), fmt) for key, _, fmt, _ in MAIN_COLUMNS[2:6]]
    cells.append(cell(_flagged(row.get("flagged_kinds"))))
    error = "" if is_missing(row.get("error")) else row.get("error")
    warning = "" if error or is_missing(row.get("warning")) else row.get("warning")
    cells.append(f'<td data-value="{esc(error)}" class="error">{esc(error)}</td>' if not warning else
                 f'<td data-value="" class="warning">warning: {esc(warning)}</td>')
    cells.append(f"<td>{thumbnail}</td>")
    kept = number(row.get("kept_pct"))
    kept = "" if kept is None else repr(kept)
    css = ' class="failed"' if status == "failed" else ""
    return f'<tr data-slide="{esc(slide)}" data-status="{esc(status)}" data-kept="{kept}"{css}>{"".join(cells)}</tr>'


def _details(rows: Sequence[Mapping[str, Any]]) -> str:
    main = {key for key, *_ in MAIN_COLUMNS}
    columns = [c for c in report_columns(rows) if c not in main and c not in HIDDEN
               and not any(isinstance(r.get(c), (list, tuple, dict, np.ndarray)) for r in rows)]
    header = '<th data-col="slide">slide</th>' + "".join(f'<th data-col="{esc(c)}">{esc(c)}</th>' for c in columns)
    body = "".join(f'<tr data-slide="{esc(r.get("slide"))}">{cell(r.get("slide"))}'
                   + "".join(cell(r.get(c), DETAIL_FORMATS.get(c)) for c in columns) + "</tr>" for r in rows)
    return (f'<details id="timings-section"><summary>Timings and other columns ({", ".join(columns)})</summary>'
            f'<table class="sortable" id="timings"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'
            "</details>")


def write_report_html(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    images: Mapping[str, Mapping[str, str | os.PathLike]] | None = None,
    *,
    title: str = "wsi-qc report",
    figures: Mapping[str, str | os.PathLike] | None = None,
    embed: bool = False,
    slide_pages: Mapping[str, str | os.PathLike] | None = None,
    sections: Mapping[str, str] | None = None,
) -> Path:
    """Write report.html: totals, failed slides with tracebacks, and one row per slide (slide, status, tiles,
    kept %, rl2 median and p95, flagged kinds, error, thumbnail), filtered by status and kept % and sorted by
    a click on a header; the timings and other columns sit in a folded section below.

    ``images`` maps slide -> {"thumbnail": png}; ``figures`` maps caption -> png (e.g. the ROC plot).
    Images are linked by relative paths, or embedded as data URIs with ``embed``. Slide names link to
    ``slide_pages`` (slide -> html file), or to ``sections`` (slide -> HTML fragment appended to this page).
    """
    path = Path(path)
    page_dir, images = path.parent, images or {}
    header = "".join(f'<th data-col="{key}">{esc(label)}</th>' for key, label, *_ in MAIN_COLUMNS)
    header += "<th>thumbnail</th>"
    body = []
    for row in rows:
        slide = str(row.get("slide"))
        link = _slide_link(slide, page_dir, slide_pages, sections)
        thumbnail = img(images.get(slide, {}).get("thumbnail"), page_dir, embed, "thumb", f"thumbnail of {slide}",
                        defer=True)
        body.append(_main_row(row, link, f'<a href="{link}">{thumbnail}</a>' if link and thumbnail else thumbnail))
    figure_html = "".join(f'<figure><figcaption>{esc(caption)}</figcaption>'
                          f'{img(fig_path, page_dir, embed, "figure", caption)}</figure>'
                          for caption, fig_path in (figures or {}).items())
    text = document(title, (
        f"{_cards(rows)}{_failures(rows)}"
        + (f'<div class="figures">{figure_html}</div>' if figure_html else "")
        + f"<h2>Slides</h2>{_filters(rows)}<table class=\"sortable\" id=\"slides\"><thead><tr>{header}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>{_details(rows)}"
        + "".join((sections or {}).values())
    ), SUMMARY_JS, SLIDES_CSS)
    return write_page(path, text)


def slide_section(row: Mapping[str, Any], images: Mapping[str, str | os.PathLike | None], gallery: Sequence[dict],
                  page_dir: str | os.PathLike, *, embed: bool = False, score_caption: str = "", note: str = "") -> str:
    """One slide's facts, overlay, score map and worst-tile gallery as an HTML fragment."""
    slide = str(row.get("slide"))
    facts = [("status", row.get("status")), ("source", row.get("path")), ("tiles", row.get("n_tiles")),
             ("kept", row.get("n_keep")), ("kept %", row.get("kept_pct")), ("rl2 median", row.get("rl2_median")),
             ("rl2 p95", row.get("rl2_p95")), ("tiles per cascade pass", row.get("passes")),
             ("flagged kinds", _flagged(row.get("flagged_kinds"))),
             ("warning", row.get("warning")), ("error", row.get("error"))]
    table = "".join(f"<tr><th>{esc(k)}</th>{cell(v)}</tr>" for k, v in facts if not is_missing(v))
    captions = {"overlay": "keep / discard and rl2 per tile", "score_map": score_caption or "score map"}
    figures = "".join(f'<figure><figcaption>{esc(captions[kind])}</figcaption>'
                      f'{img(images[kind], page_dir, embed, "figure", f"{kind} of {slide}")}</figure>'
                      for kind in ("overlay", "score_map") if images.get(kind) is not None)
    crops = "".join(
        '<figure><div class="crop">' + img(t["image"], page_dir, embed, "tile", "tile at {x}, {y}".format(**t))
        + (img(t["map"], page_dir, embed, "map", "rl2 map") if t.get("map") is not None else "")
        + f'</div><figcaption>rl2 {t["rl2"]:.4g}<br>x {t["x"]}, y {t["y"]}'
        + (f'<br>{esc(t["pass"])} pass' if t.get("pass") else "") + '</figcaption></figure>'
        for t in gallery)
    hover = " (hover a tile to see its rl2 map)" if any(t.get("map") is not None for t in gallery) else ""
    return (f'<section class="slide" id="slide-{esc(slide)}"><h2>{esc(slide)}</h2><table>{table}</table>'
            f"{traceback_details(dict(row))}"
            + (f'<p class="meta">{esc(note)}</p>' if note else "")
            + (f'<div class="figures">{figures}</div>' if figures else "")
            + (f"<h2>Worst {len(gallery)} tiles{hover}</h2><div class=\"gallery\">{crops}</div>" if gallery else "")
            + "</section>")


def write_slide_page(path: str | os.PathLike, row: Mapping[str, Any], images: Mapping[str, str | os.PathLike | None],
                     gallery: Sequence[dict], *, report: str | os.PathLike, embed: bool = False,
                     score_caption: str = "", note: str = "") -> Path:
    """Write slides/<slide>.html: a link back to `report` (report.html), then :func:`slide_section`."""
    path = Path(path)
    back = f'<p><a href="{href(report, path.parent)}">&larr; all slides</a></p>'
    section = slide_section(row, images, gallery, path.parent, embed=embed, score_caption=score_caption, note=note)
    return write_page(path, document(f"wsi-qc slide {row.get('slide')}", back + section))
