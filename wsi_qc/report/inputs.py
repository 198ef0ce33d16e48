"""Checks and shapes of the report's inputs: tile arrays, RGB thumbnails, tile corners."""

from __future__ import annotations

import numpy as np

from wsi_qc.errors import ConfigError


def tile_arrays(coords, keep, rl2=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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


def rgb(thumbnail) -> np.ndarray:
    thumb = np.asarray(thumbnail)
    if thumb.ndim == 2:
        thumb = np.repeat(thumb[..., None], 3, axis=2)
    if thumb.ndim != 3 or thumb.shape[2] not in (3, 4):
        raise ConfigError(f"thumbnail must be an RGB image (h, w, 3); got shape {thumb.shape}")
    return np.ascontiguousarray(thumb[..., :3])


def tile_quads(coords: np.ndarray, size: float) -> np.ndarray:
    """(N, 4, 2) corners of each tile in level-0 pixels."""
    x = coords[:, 0].astype(np.float64)
    y = coords[:, 1].astype(np.float64)
    return np.stack(
        [np.stack([x, y], 1), np.stack([x + size, y], 1), np.stack([x + size, y + size], 1), np.stack([x, y + size], 1)],
        axis=1,
    )
