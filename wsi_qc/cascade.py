"""Multi-resolution QC (the cascade): cheap passes over every tile settle the tiles that are clearly fine; the
scorer's full-resolution encoder and flow run only on the tiles they leave in doubt.

- coarse: the scorer's encoder on the tile downsampled to `cascade.coarse_mpp` (16x fewer pixels at 2 mpp than at
  0.5 mpp) with the full-resolution image statistics, and a local flow of its own fitted on the same reference
  tiles. A tile is clear when its coarse score is at most the `cascade.settle` quantile of the held-out reference
  tiles' coarse scores.
- focus: blur, defocus, noise and JPEG hide at 2 mpp, so the tile's full-resolution FOCUS_STATS (read from the
  coarse features) must also lie inside the central 1 - `cascade.focus_alpha` range of the reference tiles' values.
- fine: the scorer's own features and flow, on every tile a cheap pass leaves in doubt.

A settled tile's rl2 is the fine score at the reference quantile of its coarse score (`to_scale`), so one
threshold serves every tile. With `fine: false` the coarse score decides every tile (mapped the same way) and the
focus pass discards the tiles outside its range. The store's `pass` array says which pass decided each tile.
"""

from __future__ import annotations

import numpy as np

from wsi_qc.image_stats import IMAGE_STATS

PASSES = ("fine", "coarse", "focus")  # the codes 0, 1, 2 of the store's `pass` array
FOCUS_STATS = ("log_laplacian_var", "log_laplacian_mad", "jpeg_blockiness")


def coarse_config(config: dict) -> dict:
    """The config of the coarse pass: the scorer's encoder at cascade.coarse_mpp on cascade.coarse_grid."""
    c, t = config["cascade"], config["tiles"]
    size = max(8, int(round(t["size"] * t["mpp"] / c["coarse_mpp"])))
    encoder = {**config["encoder"], "input_size": size, "grid": c["coarse_grid"], "image_stats": True}
    return {**config, "encoder": encoder, "cascade": {**c, "enabled": False}}


def focus_columns(dim: int) -> list[int]:
    """Columns of FOCUS_STATS in local features of width `dim` whose last columns are the tile's IMAGE_STATS."""
    return [dim - len(IMAGE_STATS) + IMAGE_STATS.index(name) for name in FOCUS_STATS]


def focus_values(coarse_features: np.ndarray) -> np.ndarray:
    """(N, len(FOCUS_STATS)) full-resolution focus statistics of tiles from their coarse features (N, g, g, D)."""
    return coarse_features[:, 0, 0, focus_columns(coarse_features.shape[-1])]


def in_range(values: np.ndarray, reference: np.ndarray, alpha: float) -> np.ndarray:
    """(N,) True where every column of `values` lies in the central 1 - alpha range of the reference's column."""
    lo, hi = np.quantile(reference, [alpha / 2, 1 - alpha / 2], axis=0)
    return np.all((values >= lo) & (values <= hi), axis=1)


def to_scale(values: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Scores of one pass on another's scale: the target's value at the same quantile of the held-out reference
    scores (`source` of this pass, `target` of the other); above the highest reference score, in proportion."""
    source, target = np.sort(np.ravel(source)), np.sort(np.ravel(target))
    levels = np.quantile(target, np.linspace(0, 1, len(source)))
    values = np.asarray(values, np.float64)
    out = np.interp(values, source, levels)
    above = values > source[-1]
    out[above] = levels[-1] * values[above] / max(source[-1], 1e-12)
    return out.astype(np.float32)


def settled(coarse_scores: np.ndarray, focus: np.ndarray, state: dict, cascade: dict) -> np.ndarray:
    """(N,) True for the tiles the cheap passes settle as clearly fine (see the module docstring).

    `state`: the fitted reference values, "coarse" (held-out coarse tile scores) and "focus" (reference tiles'
    focus values); `cascade`: the config section.
    """
    clear = coarse_scores <= np.quantile(state["coarse"], cascade["settle"])
    if cascade["focus"]:
        clear &= in_range(focus, state["focus"], cascade["focus_alpha"])
    return clear


def upsample(maps: np.ndarray, grid: int) -> np.ndarray:
    """(N, g, g) maps on a grid x grid grid (nearest cell), for the store's rl2_map."""
    index = np.arange(grid) * maps.shape[1] // grid
    return maps[:, index][:, :, index]
