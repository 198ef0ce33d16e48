"""Figures of a run: the overlay of kept/discarded tiles with the rl2 heatmap, the tile grid, thumbnails and
the ROC plot. Inputs are plain numpy arrays; plots use ``matplotlib.figure.Figure`` with the Agg canvas and
never touch pyplot's global state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from wsi_qc.errors import ConfigError
from wsi_qc.report.inputs import rgb, tile_arrays, tile_quads
from wsi_qc.report.scoremap import CMAP, check_rl2_map, color_range, raster_scale, score_raster

KEEP_COLOR = (0.10, 0.70, 0.25)
DISCARD_COLOR = (0.90, 0.10, 0.10)
RL2_LABEL = "rl2 (higher = worse)"


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
    rl2_map: np.ndarray | None = None,
    slide_id: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write one PNG with two panels: keep (green) / discard (red) tiles, and an rl2 heatmap.

    Both panels are drawn in level-0 pixel coordinates over the thumbnail; ``slide_id`` defaults to
    the file stem of ``path``. With ``rl2_map`` (N, h, w), the heatmap shows each tile's per-position
    scores inside its square instead of one colour per tile.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    path = Path(path)
    thumb = rgb(thumbnail)
    coords, keep, rl2 = tile_arrays(coords, keep, rl2)
    maps = check_rl2_map(rl2_map, len(coords))
    if thumbnail_mpp <= 0 or slide_mpp <= 0:
        raise ConfigError(f"mpp must be > 0; got thumbnail_mpp={thumbnail_mpp}, slide_mpp={slide_mpp}")
    slide_id = slide_id or path.stem
    n, n_keep = len(coords), int(keep.sum())
    h, w = thumb.shape[:2]
    to_level0 = thumbnail_mpp / slide_mpp
    extent = (0.0, w * to_level0, h * to_level0, 0.0)
    quads = tile_quads(coords, float(tile_size_level0))
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
    cmap = colormaps[CMAP].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    if maps is None:
        vmin, vmax = color_range(rl2, threshold)
        heat = PolyCollection(quads, array=rl2, cmap=cmap, norm=Normalize(vmin, vmax), alpha=0.8, linewidths=0)
        ax_rl2.add_collection(heat)
        label, top = RL2_LABEL, finite.max() if finite.size else vmax
    else:
        vmin, vmax = color_range(maps)
        scale = raster_scale(max(h, w), tile_size_level0 / to_level0, maps)
        raster = score_raster((h * scale, w * scale), scale / to_level0, coords, float(tile_size_level0), rl2, maps)
        ax_rl2.imshow(raster, cmap=cmap, norm=Normalize(vmin, vmax), alpha=0.8, extent=extent,
                      interpolation="nearest")
        heat = ScalarMappable(norm=Normalize(vmin, vmax), cmap=cmap)
        label, top = "rl2 per position (higher = worse)", np.nanmax(maps) if np.isfinite(maps).any() else vmax
    cbar = fig.colorbar(heat, ax=ax_rl2, shrink=0.85, extend="max" if top > vmax else "neither")
    cbar.set_label(label)
    if threshold is not None and np.isfinite(threshold) and maps is None:
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
    thumb = rgb(thumbnail)
    coords, _, _ = tile_arrays(coords, np.ones(len(coords), bool))
    h, w = thumb.shape[:2]
    to_level0 = thumbnail_mpp / slide_mpp
    extent = (0.0, w * to_level0, h * to_level0, 0.0)
    fig = Figure(figsize=(7.0, float(np.clip(7.0 * h / max(w, 1), 2.5, 9.0)) + 0.5), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    ax.imshow(thumb, extent=extent, interpolation="antialiased")
    ax.add_collection(PolyCollection(tile_quads(coords, float(tile_size_level0)), facecolors="none",
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
    image = Image.fromarray(rgb(thumbnail).astype(np.uint8))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


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
