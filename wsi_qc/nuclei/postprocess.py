"""Nucleus instances from the decoder's maps: marker-controlled watershed (scikit-image), and their table."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import remove_small_objects
from skimage.segmentation import watershed


def instances_from_maps(foreground: np.ndarray, distance: np.ndarray, fg_threshold: float = 0.5,
                        marker_threshold: float = 0.45, min_marker: int = 4, min_area: int = 12) -> np.ndarray:
    """uint16 instance map (0 background) from foreground probability and distance (1 centre, 0 edge) maps.

    Markers are the connected parts of the foreground whose distance exceeds `marker_threshold` (each at least
    `min_marker` px); the watershed of -distance from them fills the foreground. Foreground parts without a
    marker become instances of their own; instances under `min_area` px are dropped.
    """
    mask = ndi.binary_fill_holes(foreground > fg_threshold)
    mask = remove_small_objects(mask, max_size=min_area - 1) if min_area > 1 else mask
    markers, _ = ndi.label((distance > marker_threshold) & mask)
    markers = _drop_small(markers, min_marker)
    labels = watershed(-distance, markers, mask=mask)
    orphans, n_orphans = ndi.label(mask & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return relabel_sequential(_drop_small(labels, min_area))


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with fewer than `min_size` pixels set to 0."""
    area = np.bincount(labels.ravel())
    small = area < min_size
    small[0] = False
    return np.where(small[labels], 0, labels) if small.any() else labels


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Ids 1..N (uint16) keeping 0 as background."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) > 65535:
        raise ValueError(f"{len(ids)} instances do not fit a uint16 instance map")
    lut = np.zeros(int(labels.max()) + 1, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    return lut[labels]


def instance_table(instances: np.ndarray, foreground: np.ndarray, type_prob: np.ndarray | None = None) -> list[dict]:
    """One row per nucleus: id, x, y (centroid, px), area (px), type (argmax of the mean type probability
    over its pixels, 1..K; None without types) and probability (mean foreground probability)."""
    n = int(instances.max())
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    flat = instances.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    yy, xx = np.indices(instances.shape)
    cy = np.bincount(flat, yy.ravel(), minlength=n + 1)[1:] / np.maximum(area, 1)
    cx = np.bincount(flat, xx.ravel(), minlength=n + 1)[1:] / np.maximum(area, 1)
    prob = np.bincount(flat, foreground.ravel(), minlength=n + 1)[1:] / np.maximum(area, 1)
    types = [None] * n
    if type_prob is not None:  # (K + 1, H, W), class 0 = background
        sums = np.stack([np.bincount(flat, p.ravel(), minlength=n + 1)[1:] for p in type_prob[1:]], 1)
        types = (sums.argmax(1) + 1).tolist()
    return [{"id": int(i), "x": float(x), "y": float(y), "area": int(a), "type": t, "probability": float(p)}
            for i, x, y, a, t, p in zip(index, cx, cy, area, types, prob)]
