"""GeoJSON of the discarded tiles: QuPath annotations in level-0 pixels."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_qc.report.inputs import tile_arrays


def discarded_geojson(
    coords: np.ndarray, tile_size_level0: float, keep: np.ndarray, slide_id: str
) -> dict[str, Any]:
    """GeoJSON FeatureCollection (QuPath annotations) of the union of the discarded tiles.

    One Polygon feature per connected region, in level-0 pixel coordinates. Tile edges are snapped to
    whole level-0 pixels so neighbouring tiles whose float size leaves sub-pixel gaps still merge.
    """
    import shapely
    from shapely.geometry import mapping

    coords, keep, _ = tile_arrays(coords, keep)
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
