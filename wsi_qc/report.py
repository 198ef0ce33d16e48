"""What a run leaves for a person: overlay PNGs, GeoJSON of discarded tiles, ROC plot, report.csv,
report.html and the curation manifest of kept tiles.

Inputs are plain numpy arrays and dicts, so this module depends on no other wsi-qc module's internals.
Plots use ``matplotlib.figure.Figure`` with the Agg canvas and never touch pyplot's global state.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wsi_qc import __version__
from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)

KEEP_COLOR = (0.10, 0.70, 0.25)
DISCARD_COLOR = (0.90, 0.10, 0.10)
RL2_LABEL = "rl2 (higher = worse)"
REPORT_COLUMNS = (
    "slide", "path", "status", "error", "n_tiles", "n_keep", "kept_pct",
    "rl2_median", "rl2_p95", "seconds",
)
MANIFEST_COLUMNS = ("slide", "x", "y", "mpp", "size", "rl2")


# ---------------------------------------------------------------- inputs


def _tile_arrays(coords, keep, rl2=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        if coords.size == 0:
            coords = coords.reshape(0, 2)
        else:
            raise ConfigError(f"coords must have shape (N, 2) of level-0 x, y; got {coords.shape}; pass Tiles.coords")
    n = len(coords)
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    if len(keep) != n:
        raise ConfigError(f"keep has {len(keep)} values for {n} tiles; pass one keep flag per tile")
    if rl2 is not None:
        rl2 = np.asarray(rl2, dtype=np.float64).reshape(-1)
        if len(rl2) != n:
            raise ConfigError(f"rl2 has {len(rl2)} values for {n} tiles; pass one rl2 per tile")
    return coords, keep, rl2


def _rgb(thumbnail) -> np.ndarray:
    thumb = np.asarray(thumbnail)
    if thumb.ndim == 2:
        thumb = np.repeat(thumb[..., None], 3, axis=2)
    if thumb.ndim != 3 or thumb.shape[2] not in (3, 4):
        raise ConfigError(f"thumbnail must be an RGB image (h, w, 3); got shape {thumb.shape}")
    return np.ascontiguousarray(thumb[..., :3])


def _tile_quads(coords: np.ndarray, size: float) -> np.ndarray:
    """(N, 4, 2) corners of each tile in level-0 pixels."""
    x = coords[:, 0].astype(np.float64)
    y = coords[:, 1].astype(np.float64)
    return np.stack(
        [np.stack([x, y], 1), np.stack([x + size, y], 1), np.stack([x + size, y + size], 1), np.stack([x, y + size], 1)],
        axis=1,
    )


# ---------------------------------------------------------------- overlay


def overlay_png(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumbnail_mpp: float,
    slide_mpp: float,
    coords: np.ndarray,
    tile_size_level0: float,
    keep: np.ndarray,
    rl2: np.ndarray,
    threshold: float | None = None,
    *,
    slide_id: str | None = None,
    dpi: int = 120,
    rl2_map: np.ndarray | None = None,
) -> Path:
    """Write one PNG with two panels: keep (green) / discard (red) tiles, and an rl2 heatmap.

    Both panels are drawn in level-0 pixel coordinates over the thumbnail; ``slide_id`` defaults to
    the file stem of ``path``.
    """
    from matplotlib import colormaps
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    path = Path(path)
    thumb = _rgb(thumbnail)
    coords, keep, rl2 = _tile_arrays(coords, keep, rl2)
    if thumbnail_mpp <= 0 or slide_mpp <= 0:
        raise ConfigError(f"mpp must be > 0; got thumbnail_mpp={thumbnail_mpp}, slide_mpp={slide_mpp}")
    slide_id = slide_id or path.stem
    n, n_keep = len(coords), int(keep.sum())
    h, w = thumb.shape[:2]
    to_level0 = thumbnail_mpp / slide_mpp
    extent = (0.0, w * to_level0, h * to_level0, 0.0)
    quads = _tile_quads(coords, float(tile_size_level0))
    edge_width = 0.6 if n <= 2000 else 0.2

    panel_w = 6.0
    panel_h = float(np.clip(panel_w * h / max(w, 1), 2.5, 5.5))
    fig = Figure(figsize=(2 * panel_w + 1.2, panel_h + 0.9), dpi=dpi, layout="constrained")
    ax_keep, ax_rl2 = fig.subplots(1, 2)

    ax_keep.imshow(thumb, extent=extent, interpolation="antialiased")
    colors = np.where(keep[:, None], KEEP_COLOR, DISCARD_COLOR)
    ax_keep.add_collection(
        PolyCollection(quads, facecolors=np.c_[colors, np.full(n, 0.35)],
                       edgecolors=np.c_[colors, np.full(n, 0.9)], linewidths=edge_width)
    )
    ax_keep.legend(
        handles=[Patch(facecolor=(*KEEP_COLOR, 0.5), edgecolor=KEEP_COLOR, label=f"keep ({n_keep})"),
                 Patch(facecolor=(*DISCARD_COLOR, 0.5), edgecolor=DISCARD_COLOR, label=f"discard ({n - n_keep})")],
        loc="lower right", fontsize=8, framealpha=0.8,
    )
    ax_keep.set_title("keep / discard", fontsize=10)

    gray = thumb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    ax_rl2.imshow(gray, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="antialiased")
    finite = rl2[np.isfinite(rl2)]
    if finite.size:
        vmin, vmax = float(finite.min()), float(np.percentile(finite, 99))
        if threshold is not None and np.isfinite(threshold):
            vmin, vmax = min(vmin, float(threshold)), max(vmax, float(threshold))
        if vmax <= vmin:
            vmax = vmin + 1e-6
    else:
        vmin, vmax = 0.0, 1.0
    cmap = colormaps["inferno"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    heat = PolyCollection(quads, array=rl2, cmap=cmap, norm=Normalize(vmin, vmax), alpha=0.8, linewidths=0)
    ax_rl2.add_collection(heat)
    extend = "max" if finite.size and finite.max() > vmax else "neither"
    cbar = fig.colorbar(heat, ax=ax_rl2, shrink=0.85, extend=extend)
    cbar.set_label(RL2_LABEL)
    if threshold is not None and np.isfinite(threshold):
        cbar.ax.axhline(float(threshold), color="cyan", linewidth=2)
        ax_rl2.legend(handles=[Line2D([], [], color="cyan", linewidth=2, label=f"threshold {threshold:.4g}")],
                      loc="lower right", fontsize=8, framealpha=0.8)
    ax_rl2.set_title("rl2 heatmap", fontsize=10)

    for ax in (ax_keep, ax_rl2):
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    pct = 100.0 * n_keep / n if n else 0.0
    title = f"{slide_id}: {n} tiles, {n_keep} kept ({pct:.1f} %)"
    if threshold is not None:
        title += f", threshold {threshold:.4g}"
    if n == 0:
        title += " (no tissue tiles)"
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def tiles_png(path: str | os.PathLike, thumbnail: np.ndarray, thumbnail_mpp: float, slide_mpp: float,
              coords: np.ndarray, tile_size_level0: float, *, title: str = "", dpi: int = 120) -> Path:
    """Write the thumbnail with every tile's outline drawn on it (`wsi-qc tiles`)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    path = Path(path)
    thumb = _rgb(thumbnail)
    coords, _, _ = _tile_arrays(coords, np.ones(len(coords), bool))
    h, w = thumb.shape[:2]
    to_level0 = thumbnail_mpp / slide_mpp
    extent = (0.0, w * to_level0, h * to_level0, 0.0)
    fig = Figure(figsize=(7.0, float(np.clip(7.0 * h / max(w, 1), 2.5, 9.0)) + 0.5), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    ax.imshow(thumb, extent=extent, interpolation="antialiased")
    ax.add_collection(PolyCollection(_tile_quads(coords, float(tile_size_level0)), facecolors="none",
                                     edgecolors=(*KEEP_COLOR, 0.9), linewidths=0.6 if len(coords) <= 2000 else 0.2))
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{len(coords)} tiles", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def thumbnail_png(path: str | os.PathLike, thumbnail: np.ndarray, max_side: int = 512) -> Path:
    """Write a thumbnail PNG no larger than ``max_side`` on its longer side (for report.html)."""
    from PIL import Image

    path = Path(path)
    image = Image.fromarray(_rgb(thumbnail).astype(np.uint8))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


# ---------------------------------------------------------------- GeoJSON


def discarded_geojson(
    coords: np.ndarray, tile_size_level0: float, keep: np.ndarray, slide_id: str
) -> dict[str, Any]:
    """GeoJSON FeatureCollection (QuPath annotations) of the union of the discarded tiles.

    One Polygon feature per connected region, in level-0 pixel coordinates. Tile edges are snapped to
    whole level-0 pixels so neighbouring tiles whose float size leaves sub-pixel gaps still merge.
    """
    import shapely
    from shapely.geometry import mapping

    coords, keep, _ = _tile_arrays(coords, keep)
    bad = coords[~keep].astype(np.float64)
    features: list[dict[str, Any]] = []
    if len(bad):
        size = float(tile_size_level0)
        boxes = shapely.box(bad[:, 0], bad[:, 1], bad[:, 0] + size, bad[:, 1] + size)
        union = shapely.union_all(boxes, grid_size=1.0)
        polygons = list(getattr(union, "geoms", [union]))
        polygons.sort(key=lambda p: (p.bounds[1], p.bounds[0]))
        centres = bad + size / 2
        for i, polygon in enumerate(polygons, start=1):
            polygon = shapely.orient_polygons(polygon)
            n_tiles = int(shapely.contains_xy(polygon, centres[:, 0], centres[:, 1]).sum())
            features.append({
                "type": "Feature",
                "id": f"{slide_id}-qc-discard-{i}",
                "geometry": json.loads(json.dumps(mapping(polygon))),
                "properties": {
                    "objectType": "annotation",
                    "name": f"QC discard {i} ({n_tiles} tiles)",
                    "classification": {"name": "QC discard", "color": [255, 0, 0]},
                    "isLocked": False,
                },
            })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    path: str | os.PathLike, coords: np.ndarray, tile_size_level0: float, keep: np.ndarray, slide_id: str
) -> Path:
    """Write :func:`discarded_geojson` to ``path`` (import it in QuPath with File > Import objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(discarded_geojson(coords, tile_size_level0, keep, slide_id)), encoding="utf-8")
    return path


# ---------------------------------------------------------------- ROC


def roc_png(
    path: str | os.PathLike,
    fpr: np.ndarray,
    tpr: np.ndarray,
    auc: float,
    auc_ci: tuple[float, float] | None = None,
    threshold_point: tuple[float, float] | None = None,
    per_type: Mapping[str, tuple[np.ndarray, np.ndarray, float]] | None = None,
    *,
    title: str = "ROC of rl2 (positive = bad tile)",
    dpi: int = 120,
) -> Path:
    """Write a ROC plot: the overall curve with its AUC (and 95 % CI), the chosen operating point,
    and optionally one thinner curve per artifact type."""
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5.5, 5.5), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for name, (f, t, a) in (per_type or {}).items():
        ax.plot(f, t, linewidth=1, alpha=0.8, label=f"{name} (AUC {a:.3f})")
    label = f"all (AUC {auc:.3f}"
    if auc_ci is not None:
        label += f", 95 % CI {auc_ci[0]:.3f}-{auc_ci[1]:.3f}"
    ax.plot(fpr, tpr, color="black", linewidth=2.2, label=label + ")")
    if threshold_point is not None:
        ax.plot(*threshold_point, marker="o", markersize=8, color="red", linestyle="none",
                label=f"threshold (FPR {threshold_point[0]:.3f}, TPR {threshold_point[1]:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (good tiles discarded)")
    ax.set_ylabel("true positive rate (bad tiles discarded)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


# ---------------------------------------------------------------- CSV / manifest


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = list(REPORT_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_report_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write report.csv: one row per slide, the standard columns first, then any extra keys."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows), columns=_columns(rows)).to_csv(path, index=False)
    return path


def write_manifest(path_prefix: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write the curation manifest of kept tiles as ``<prefix>.csv`` and ``<prefix>.parquet``.

    Each record is one slide: ``slide``, ``coords`` (N, 2) level-0 x, y, ``keep`` (N,), ``rl2`` (N,),
    ``mpp`` and ``size`` (the tile's mpp and side in pixels), optionally ``path`` (the slide file,
    added as a column). Returns (csv path, parquet path).
    """
    import pandas as pd

    frames = []
    with_path = False
    for rec in records:
        coords, keep, rl2 = _tile_arrays(rec["coords"], rec["keep"], rec["rl2"])
        kept = coords[keep]
        frame = pd.DataFrame({
            "slide": pd.Series([str(rec["slide"])] * len(kept), dtype="string"),
            "x": kept[:, 0].astype(np.int64),
            "y": kept[:, 1].astype(np.int64),
            "mpp": np.full(len(kept), float(rec["mpp"])),
            "size": np.full(len(kept), int(rec["size"]), dtype=np.int32),
            "rl2": rl2[keep].astype(np.float32),
        })
        if rec.get("path") is not None:
            with_path = True
            frame["path"] = pd.Series([str(rec["path"])] * len(kept), dtype="string")
        frames.append(frame)
    empty = pd.DataFrame({
        "slide": pd.Series([], dtype="string"), "x": np.zeros(0, np.int64), "y": np.zeros(0, np.int64),
        "mpp": np.zeros(0), "size": np.zeros(0, np.int32), "rl2": np.zeros(0, np.float32),
    })
    table = pd.concat([empty, *frames], ignore_index=True) if frames else empty
    table = table[list(MANIFEST_COLUMNS) + (["path"] if with_path else [])]
    if with_path:
        table["path"] = table["path"].astype("string")
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path = prefix.with_name(prefix.name + ".csv")
    parquet_path = prefix.with_name(prefix.name + ".parquet")
    table.to_csv(csv_path, index=False)
    table.to_parquet(parquet_path, engine="pyarrow", index=False)
    return csv_path, parquet_path


# ---------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.meta{color:#666;font-size:.85rem}
.summary{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem .9rem;min-width:7rem}
.card b{display:block;font-size:1.3rem} .card span{color:#666;font-size:.8rem}
.card.bad b{color:#b00020}
table{border-collapse:collapse;background:#fff;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.3rem .5rem;vertical-align:top;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th[data-col]{cursor:pointer;user-select:none;background:#f0f0f0;white-space:nowrap}
th[data-col]:hover{background:#e4e4e4}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr.failed td{background:#fdecee} .status-failed{color:#b00020;font-weight:600}
.status-done{color:#1a7f37;font-weight:600}
.images{display:flex;gap:.5rem;align-items:flex-start}
img.thumb{max-width:160px;max-height:160px;cursor:zoom-in}
img.overlay{max-width:360px;cursor:zoom-in}
img.big{max-width:95vw;max-height:none;cursor:zoom-out}
details pre{white-space:pre-wrap;font-size:.75rem;background:#f6f6f6;padding:.4rem;max-width:60rem}
.error{color:#b00020}
.figure img{max-width:520px}
"""

_JS = """
(function(){
  function value(cell){ return cell.hasAttribute('data-value') ? cell.getAttribute('data-value') : cell.textContent.trim(); }
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
  document.querySelectorAll('img.zoom').forEach(function(img){
    img.addEventListener('click', function(){ img.classList.toggle('big'); });
  });
})();
"""

_NUMERIC_FORMATS = {"n_tiles": "{:d}", "n_keep": "{:d}", "kept_pct": "{:.1f}", "rl2_median": "{:.4g}",
                    "rl2_p95": "{:.4g}", "seconds": "{:.1f}"}
_HIDDEN = {"path", "error", "traceback"}


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return isinstance(value, str) and value == ""


def _number(value: Any) -> float | None:
    if _is_missing(value) or isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cell(column: str, value: Any) -> str:
    number = _number(value)
    if number is None:
        return f'<td data-value="{_esc("" if _is_missing(value) else value)}">{_esc("" if _is_missing(value) else value)}</td>'
    fmt = _NUMERIC_FORMATS.get(column)
    if fmt == "{:d}":
        text = fmt.format(int(round(number)))
    elif fmt:
        text = fmt.format(number)
    else:
        text = f"{number:.6g}"
    return f'<td class="num" data-value="{number!r}">{_esc(text)}</td>'


def _data_uri(path: str | os.PathLike) -> str | None:
    path = Path(path)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
            ".webp": "image/webp", ".gif": "image/gif"}.get(path.suffix.lower(), "application/octet-stream")
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("report image %s cannot be read (%s); leaving it out of the HTML report", path, exc)
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(path: str | os.PathLike | None, css: str, alt: str) -> str:
    if path is None:
        return ""
    uri = _data_uri(path)
    if uri is None:
        return f'<span class="error">missing image: {_esc(Path(path).name)}</span>'
    return f'<img class="{css} zoom" src="{uri}" alt="{_esc(alt)}" title="click to enlarge">'


def _summary(rows: Sequence[Mapping[str, Any]]) -> str:
    statuses = [str(r.get("status", "")) for r in rows]
    n_done = statuses.count("done")
    n_failed = statuses.count("failed")
    n_tiles = sum(int(_number(r.get("n_tiles")) or 0) for r in rows)
    n_keep = sum(int(_number(r.get("n_keep")) or 0) for r in rows)
    kept = f"{100.0 * n_keep / n_tiles:.1f} %" if n_tiles else "n/a"
    cards = [("slides", len(rows), ""), ("done", n_done, ""), ("failed", n_failed, " bad" if n_failed else ""),
             ("tiles", n_tiles, ""), ("kept tiles", n_keep, ""), ("kept", kept, "")]
    others = len(rows) - n_done - n_failed
    if others:
        cards.insert(3, ("other status", others, ""))
    return '<div class="summary">' + "".join(
        f'<div class="card{cls}" data-key="{_esc(name)}"><b>{_esc(value)}</b><span>{_esc(name)}</span></div>'
        for name, value, cls in cards
    ) + "</div>"


def _failures(rows: Sequence[Mapping[str, Any]]) -> str:
    failed = [r for r in rows if str(r.get("status", "")) == "failed"]
    if not failed:
        return ""
    items = []
    for r in failed:
        trace = r.get("traceback")
        details = (f"<details><summary>traceback</summary><pre>{_esc(trace)}</pre></details>"
                   if not _is_missing(trace) else "")
        items.append(f'<li><b>{_esc(r.get("slide"))}</b> <span class="meta">{_esc(r.get("path"))}</span>'
                     f'<div class="error">{_esc(r.get("error"))}</div>{details}</li>')
    return f'<h2>Failed slides ({len(failed)})</h2><ul class="failures">{"".join(items)}</ul>'


def write_report_html(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    images: Mapping[str, Mapping[str, str | os.PathLike]] | None = None,
    *,
    title: str = "wsi-qc report",
    figures: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write one self-contained HTML report: summary, failed slides with tracebacks, and a table with
    one row per slide (click a header to sort) whose images are embedded as data URIs.

    ``images`` maps slide -> {"thumbnail": png, "overlay": png}; ``figures`` maps caption -> png shown
    above the table (e.g. the ROC plot).
    """
    path = Path(path)
    images = images or {}
    columns = [c for c in _columns(rows) if c not in _HIDDEN
               and not any(isinstance(r.get(c), (list, tuple, dict, np.ndarray)) for r in rows)]
    header = "".join(f'<th data-col="{_esc(c)}">{_esc(c)}</th>' for c in columns)
    header += '<th data-col="error">error</th><th>images</th>'
    body = []
    for row in rows:
        status = str(row.get("status", ""))
        cells = []
        for c in columns:
            if c == "slide":
                cells.append(f'<td data-value="{_esc(row.get(c))}" title="{_esc(row.get("path"))}">'
                             f'<b>{_esc(row.get(c))}</b></td>')
            elif c == "status":
                cells.append(f'<td data-value="{_esc(status)}" class="status-{_esc(status)}">{_esc(status)}</td>')
            else:
                cells.append(_cell(c, row.get(c)))
        error = row.get("error")
        trace = row.get("traceback")
        error_html = "" if _is_missing(error) else f'<span class="error">{_esc(error)}</span>'
        if not _is_missing(trace):
            error_html += f"<details><summary>traceback</summary><pre>{_esc(trace)}</pre></details>"
        cells.append(f'<td data-value="{_esc("" if _is_missing(error) else error)}">{error_html}</td>')
        slide_images = images.get(str(row.get("slide")), {})
        cells.append('<td><div class="images">'
                     + _img(slide_images.get("thumbnail"), "thumb", f"thumbnail of {row.get('slide')}")
                     + _img(slide_images.get("overlay"), "overlay", f"overlay of {row.get('slide')}")
                     + "</div></td>")
        css = ' class="failed"' if status == "failed" else ""
        body.append(f'<tr data-slide="{_esc(row.get("slide"))}"{css}>{"".join(cells)}</tr>')
    figure_html = "".join(
        f'<div class="figure"><h2>{_esc(caption)}</h2>{_img(fig_path, "figure", caption)}</div>'
        for caption, fig_path in (figures or {}).items()
    )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    document = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1><div class=\"meta\">wsi-qc {_esc(__version__)}, written {_esc(stamp)}. "
        "rl2: distance to the reference tissue, higher = worse. Click a column header to sort.</div>"
        f"{_summary(rows)}{_failures(rows)}{figure_html}"
        f"<h2>Slides</h2><table class=\"sortable\" id=\"slides\"><thead><tr>{header}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
        f"<script>{_JS}</script></body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
