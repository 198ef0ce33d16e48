"""Score maps as images: every tile's rl2 (or its per-position `rl2_map`) painted in its square over the
thumbnail, and the gallery of a slide's worst tiles. Plain numpy + PIL, fast enough for thousands of slides."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsi_qc.errors import ConfigError
from wsi_qc.report.inputs import rgb, tile_arrays

CMAP = "inferno"
MAX_RASTER_SIDE = 4096  # a score raster's longer side, in pixels


def check_rl2_map(rl2_map, n: int) -> np.ndarray | None:
    """`rl2_map` as float (N, h, w), or None; ConfigError when it does not hold one map per tile."""
    if rl2_map is None:
        return None
    maps = np.asarray(rl2_map, dtype=np.float64)
    if maps.ndim != 3 or len(maps) != n or 0 in maps.shape[1:]:
        raise ConfigError(f"rl2_map must have shape (N, h, w) with N = {n} tiles; got {maps.shape}; "
                          f"pass the store's rl2_map array of this slide")
    return maps


def color_range(values: np.ndarray, threshold: float | None = None) -> tuple[float, float]:
    """(vmin, vmax) of a heat map: the finite minimum to the 99th percentile, widened to include `threshold`."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 1.0
    vmin, vmax = float(finite.min()), float(np.percentile(finite, 99))
    if threshold is not None and np.isfinite(threshold):
        vmin, vmax = min(vmin, float(threshold)), max(vmax, float(threshold))
    return vmin, max(vmax, vmin + 1e-6)


def _colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """RGBA floats in 0..1 of `values` on the inferno scale; NaN becomes transparent."""
    from matplotlib import colormaps

    cmap = colormaps[CMAP].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    return cmap(np.ma.masked_invalid((values - vmin) / (vmax - vmin)))


def _blend(base: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 image of `base` (0..255, grey (h, w, 1) or RGB) under the RGBA `heat` at opacity `alpha`."""
    a = heat[..., 3:] * alpha
    return ((base / 255.0 * (1 - a) + heat[..., :3] * a) * 255).round().astype(np.uint8)


def score_raster(shape: tuple[int, int], level0_to_px: float, coords: np.ndarray, tile_size_level0: float,
                 rl2: np.ndarray, rl2_map: np.ndarray | None = None) -> np.ndarray:
    """Float raster of `shape` (rows, cols) pixels, NaN outside tiles: each tile's square holds its rl2, or its
    (h, w) map stretched over the square (nearest neighbour). `level0_to_px` converts level-0 pixels to raster ones."""
    raster = np.full(shape, np.nan)
    side = tile_size_level0 * level0_to_px
    for i, (x, y) in enumerate(np.asarray(coords, dtype=np.float64) * level0_to_px):
        c0, r0 = int(round(x)), int(round(y))
        c1, r1 = min(shape[1], int(round(x + side))), min(shape[0], int(round(y + side)))
        if r1 <= r0 or c1 <= c0:
            continue
        if rl2_map is None:
            raster[r0:r1, c0:c1] = rl2[i]
        else:
            h, w = rl2_map.shape[1:]
            rows = np.minimum(((np.arange(r0, r1) - y) * h / side).astype(int), h - 1)
            cols = np.minimum(((np.arange(c0, c1) - x) * w / side).astype(int), w - 1)
            raster[r0:r1, c0:c1] = rl2_map[i][np.ix_(rows, cols)]
    return raster


def raster_scale(thumb_side: float, tile_px: float, rl2_map: np.ndarray | None) -> int:
    """Upsampling of the thumbnail that gives each map position at least one pixel (1 without a map)."""
    if rl2_map is None or tile_px <= 0:
        return 1
    want = math.ceil(max(rl2_map.shape[1:]) / tile_px)
    return int(max(1, min(want, MAX_RASTER_SIDE // max(int(thumb_side), 1))))


def score_map_png(path: str | os.PathLike, thumbnail: np.ndarray, thumbnail_mpp: float, slide_mpp: float,
                  coords: np.ndarray, tile_size_level0: float, rl2: np.ndarray, rl2_map: np.ndarray | None = None,
                  *, alpha: float = 0.75, min_side: int = 512) -> tuple[Path, tuple[float, float]]:
    """Write the score map: tile scores (or per-position maps) on the inferno scale over the grey thumbnail,
    enlarged (nearest neighbour) to at least `min_side` pixels on its longer side.

    Returns (path, (vmin, vmax)) so the page can print the colour scale.
    """
    from PIL import Image

    path = Path(path)
    thumb = rgb(thumbnail)
    coords, _, rl2 = tile_arrays(coords, np.ones(len(np.asarray(rl2).reshape(-1)), bool), rl2)
    maps = check_rl2_map(rl2_map, len(coords))
    to_px = slide_mpp / thumbnail_mpp
    side = max(thumb.shape[:2])
    enlarge = min(math.ceil(min_side / side), MAX_RASTER_SIDE // side)
    scale = max(raster_scale(side, tile_size_level0 * to_px, maps), enlarge)
    h, w = thumb.shape[0] * scale, thumb.shape[1] * scale
    values = score_raster((h, w), to_px * scale, coords, tile_size_level0, rl2, maps)
    vmin, vmax = color_range(rl2 if maps is None else maps)
    heat = _colorize(values, vmin, vmax)
    grey = np.asarray(Image.fromarray(thumb.astype(np.uint8)).convert("L").resize((w, h), Image.Resampling.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_blend(grey[..., None], heat, alpha)).save(path, format="PNG", optimize=True)
    return path, (vmin, vmax)


def worst_tiles(rl2: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` highest finite rl2 values, worst first."""
    rl2 = np.asarray(rl2, dtype=np.float64).reshape(-1)
    finite = np.flatnonzero(np.isfinite(rl2))
    return finite[np.argsort(-rl2[finite], kind="stable")[:n]]


def write_tile_gallery(folder: str | os.PathLike, read_tile: Callable[[int, int], np.ndarray], coords: np.ndarray,
                       rl2: np.ndarray, rl2_map: np.ndarray | None = None, n: int = 12, *,
                       alpha: float = 0.45, quality: int = 85) -> list[dict]:
    """JPEG crops of the `n` worst tiles, read with `read_tile(x, y)` (level-0 top-left -> RGB tile).

    With `rl2_map`, each crop also gets a copy with its map laid over it (translucent, the slide's colour scale).
    Returns one dict per crop, worst first: x, y, rl2, image (path), map (path or None).
    """
    from PIL import Image

    folder = Path(folder)
    coords, _, rl2 = tile_arrays(coords, np.ones(len(np.asarray(rl2).reshape(-1)), bool), rl2)
    maps = check_rl2_map(rl2_map, len(coords))
    vmin, vmax = color_range(maps) if maps is not None else (0.0, 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for rank, i in enumerate(worst_tiles(rl2, n), start=1):
        x, y = (int(v) for v in coords[i])
        tile = rgb(read_tile(x, y)).astype(np.uint8)
        image = folder / f"worst-{rank:02d}_x{x}_y{y}.jpg"
        Image.fromarray(tile).save(image, format="JPEG", quality=quality)
        item = {"x": x, "y": y, "rl2": float(rl2[i]), "image": image, "map": None}
        if maps is not None:
            rows = np.minimum(np.arange(tile.shape[0]) * maps.shape[1] // tile.shape[0], maps.shape[1] - 1)
            cols = np.minimum(np.arange(tile.shape[1]) * maps.shape[2] // tile.shape[1], maps.shape[2] - 1)
            heat = _colorize(maps[i][np.ix_(rows, cols)], vmin, vmax)
            item["map"] = image.with_name(image.stem + "_map.jpg")
            Image.fromarray(_blend(tile, heat, alpha)).save(item["map"], format="JPEG", quality=quality)
        out.append(item)
    return out
