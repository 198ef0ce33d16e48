"""Pieces shared by the report's HTML pages: escaping, number cells, images (linked or embedded), the page shell.

Pages link their images by relative paths, so a report folder can be moved or served as it is; with
``embed=True`` images become data URIs and the page is one self-contained file (for a handful of slides).
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from wsi_qc import __version__

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
a{color:#0b57d0} .meta{color:#666;font-size:.85rem}
.summary{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem .9rem;min-width:7rem}
.card b{display:block;font-size:1.3rem} .card span{color:#666;font-size:.8rem}
.card.bad b{color:#b00020}
.filters{display:flex;flex-wrap:wrap;gap:1rem;align-items:center;margin:.5rem 0;font-size:.85rem}
.filters input{width:4.5rem}
table{border-collapse:collapse;background:#fff;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.3rem .5rem;vertical-align:top;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th[data-col]{cursor:pointer;user-select:none;background:#f0f0f0;white-space:nowrap}
th[data-col]:hover{background:#e4e4e4}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr.failed td{background:#fdecee} .status-failed{color:#b00020;font-weight:600}
.status-done{color:#1a7f37;font-weight:600}
img.thumb{width:120px;height:90px;object-fit:contain}  /* a fixed box: lazy loading skips rows out of view */
img.figure{max-width:100%;cursor:zoom-in} img.big{max-width:none;cursor:zoom-out}
.figures{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start} .figures figure{margin:0;max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:.6rem}
.gallery figure{margin:0;background:#fff;border:1px solid #ddd;padding:.3rem;font-size:.75rem}
.crop{position:relative;width:160px;height:160px} .crop img{position:absolute;left:0;top:0;width:160px;height:160px}
.crop img.map{opacity:0;transition:opacity .15s} .crop:hover img.map{opacity:1}
details pre{white-space:pre-wrap;font-size:.75rem;background:#f6f6f6;padding:.4rem;max-width:60rem}
.error{color:#b00020}
.warning{color:#8a5a00}
"""

ZOOM_JS = """
document.querySelectorAll('img.figure').forEach(function(img){
  img.addEventListener('click', function(){ img.classList.toggle('big'); });
});
"""

DEFER_JS = """
(function(){
  var images = document.querySelectorAll('img[data-src]');
  function show(img){ img.src = img.getAttribute('data-src'); img.removeAttribute('data-src'); }
  if (!('IntersectionObserver' in window)) { images.forEach(show); return; }
  var seen = new IntersectionObserver(function(entries){
    entries.forEach(function(e){ if (e.isIntersecting) { show(e.target); seen.unobserve(e.target); } });
  }, {rootMargin: '600px'});
  images.forEach(function(img){ seen.observe(img); });
})();
"""

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
        ".webp": "image/webp", ".gif": "image/gif"}


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return isinstance(value, str) and value == ""


def number(value: Any) -> float | None:
    """The finite float of a cell value, or None (missing, bool, text, inf)."""
    if is_missing(value) or isinstance(value, (bool, np.bool_)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def cell(value: Any, fmt: str | None = None) -> str:
    """A table cell whose data-value sorts: numbers right-aligned in `fmt` ("{:d}", "{:.1f}", ...), text escaped."""
    num = number(value)
    if num is None:
        text = "" if is_missing(value) else value
        return f'<td data-value="{esc(text)}">{esc(text)}</td>'
    if fmt == "{:d}":
        text = fmt.format(int(round(num)))
    else:
        text = (fmt or "{:.6g}").format(num)
    return f'<td class="num" data-value="{num!r}">{esc(text)}</td>'


def href(target: str | os.PathLike, page_dir: str | os.PathLike) -> str:
    """URL of `target` relative to the folder of the page that links it."""
    return quote(Path(os.path.relpath(target, page_dir)).as_posix())


def image_src(path: str | os.PathLike, page_dir: str | os.PathLike, embed: bool) -> str | None:
    """A relative URL, or with `embed` a data URI (None when the file cannot be read)."""
    path = Path(path)
    if not embed:
        return href(path, page_dir)
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("report image %s cannot be read (%s); leaving it out of the HTML report", path, exc)
        return None
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(path: str | os.PathLike | None, page_dir: str | os.PathLike, embed: bool, css: str, alt: str,
        defer: bool = False) -> str:
    """An <img> (lazy-loaded when linked), a note when the file is missing, "" without a path.

    `defer`: a linked image gets its src from DEFER_JS only once it scrolls into view (Chromium loads every
    loading="lazy" image of a long local page at once).
    """
    if path is None:
        return ""
    src = image_src(path, page_dir, embed)
    if src is None:
        return f'<span class="error">missing image: {esc(Path(path).name)}</span>'
    if embed:
        return f'<img class="{css}" src="{src}" alt="{esc(alt)}">'
    return f'<img class="{css}" {"data-src" if defer else "src"}="{src}" alt="{esc(alt)}" loading="lazy">'


def traceback_details(row: dict) -> str:
    trace = row.get("traceback")
    return "" if is_missing(trace) else f"<details><summary>traceback</summary><pre>{esc(trace)}</pre></details>"


def document(title: str, body: str, script: str = "", css: str = "") -> str:
    """A whole HTML page: title, the version/date line, `body`, the inline `script` and the page's `css` (no CDN)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}{css}</style></head><body>"
        f"<h1>{esc(title)}</h1><div class=\"meta\">wsi-qc {esc(__version__)}, written {esc(stamp)}. "
        "rl2: distance to the reference tissue, higher = worse.</div>"
        f"{body}<script>{ZOOM_JS}{DEFER_JS}{script}</script></body></html>\n"
    )


def write_page(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
