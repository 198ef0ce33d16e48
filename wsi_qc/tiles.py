"""Tile grids over a slide's tissue, and streaming reads of the tiles (DataLoader worker processes)."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from wsi_qc.errors import ConfigError, SlideError
from wsi_qc.slide import Slide
from wsi_qc.tissue import find_tissue

log = logging.getLogger(__name__)

_EPS = 1e-6


@dataclass(frozen=True, eq=False)
class Tiles:
    """Tiles kept on a slide's grid: level-0 top-left coords, grid positions and tissue fractions."""

    coords: np.ndarray  # int32 (N, 2) level-0 x, y of each tile's top-left corner
    grid_index: np.ndarray  # int32 (N, 2) row, col of each tile on the grid
    grid_shape: tuple[int, int]  # rows, cols of the whole grid (kept or not)
    size: int  # tile side in px at `mpp`
    mpp: float  # target resolution of the tiles
    stride: int  # px at `mpp` between neighbouring grid positions (size - overlap)
    tissue_fraction: np.ndarray  # float32 (N,) part of each tile's area that is tissue

    def __len__(self) -> int:
        return len(self.coords)


def make_tiles(
    slide: Slide,
    tissue: np.ndarray,
    tissue_mpp: float,
    mpp: float,
    size: int,
    overlap: int = 0,
    min_tissue: float = 0.5,
) -> Tiles:
    """Grid of `size` px tiles at `mpp` over the slide, keeping those whose tissue area fraction >= `min_tissue`.

    `tissue` is the boolean mask read at `tissue_mpp` (see find_tissue). The fraction is the tile's
    area covered by mask pixels (fractional pixel overlap counted), so a tile half on tissue has 0.5.
    Grid positions lie wholly inside the slide; min_tissue=0 keeps every tile with any tissue.
    """
    _check_tile_args(mpp, size, overlap, min_tissue)
    slide.check_mpp(mpp)
    stride = size - overlap
    width0, height0 = slide.dimensions
    tile0 = size * mpp / slide.mpp  # tile side in level-0 px
    stride0 = stride * mpp / slide.mpp
    if width0 < tile0 - _EPS or height0 < tile0 - _EPS:
        raise SlideError(
            f"{_name(slide)} is {width0 * slide.mpp:.0f} x {height0 * slide.mpp:.0f} µm, smaller than one tile "
            f"({size} px at {mpp:g} mpp = {size * mpp:.0f} µm); use a smaller tiles.size or tiles.mpp"
        )
    mask = _check_mask(slide, tissue, tissue_mpp)
    cols = int(np.floor((width0 - tile0) / stride0 + _EPS)) + 1
    rows = int(np.floor((height0 - tile0) / stride0 + _EPS)) + 1
    row, col = (a.ravel() for a in np.mgrid[:rows, :cols])
    x0 = col * stride0
    y0 = row * stride0

    # integral image of the mask; for a piecewise-constant mask, bilinear interpolation of the
    # integral image at fractional coordinates is exact, which gives area-weighted coverage
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = mask.cumsum(axis=0, dtype=np.float64).cumsum(axis=1)
    scale_x = mask.shape[1] / width0  # mask px per level-0 px, per axis, from the shapes themselves
    scale_y = mask.shape[0] / height0
    left, right = x0 * scale_x, (x0 + tile0) * scale_x
    top, bottom = y0 * scale_y, (y0 + tile0) * scale_y
    covered = (
        _interpolate(integral, bottom, right)
        - _interpolate(integral, top, right)
        - _interpolate(integral, bottom, left)
        + _interpolate(integral, top, left)
    )
    fraction = np.clip(covered / ((right - left) * (bottom - top)), 0.0, 1.0)
    keep = fraction >= min_tissue - _EPS if min_tissue > 0 else fraction > _EPS
    if not keep.any():  # a blank slide is a result (0 tiles), not a failure
        log.warning("%s: no tile of %d px at %g mpp has a tissue fraction >= %g (tissue covers %.1f %% of the "
                    "thumbnail, best tile %.2f); if it holds tissue, lower tiles.min_tissue or try another "
                    "tissue.method (otsu_saturation finds pale tissue)", _name(slide), size, mpp, min_tissue,
                    100 * mask.mean(), fraction.max())
    coords = np.stack([np.rint(x0[keep]), np.rint(y0[keep])], axis=1).astype(np.int32)
    log.debug("%s: %d of %d x %d grid positions kept", _name(slide), keep.sum(), rows, cols)
    return Tiles(
        coords=coords,
        grid_index=np.stack([row[keep], col[keep]], axis=1).astype(np.int32),
        grid_shape=(rows, cols),
        size=int(size),
        mpp=float(mpp),
        stride=int(stride),
        tissue_fraction=fraction[keep].astype(np.float32),
    )


def grid_image(tiles: Tiles, values: np.ndarray) -> np.ndarray:
    """uint8 raster (rows, cols) with one pixel per grid position: `values` at the tiles, 0 elsewhere."""
    values = np.asarray(values)
    if values.shape != (len(tiles),):
        raise ConfigError(f"grid_image needs one value per tile ({len(tiles)}), got an array of shape {values.shape}")
    grid = np.zeros(tiles.grid_shape, dtype=np.uint8)
    grid[tiles.grid_index[:, 0], tiles.grid_index[:, 1]] = values
    return grid


class TileDataset(Dataset):
    """The tiles of one slide as uint8 (size, size, 3) arrays; each process opens the slide itself."""

    def __init__(self, slide_path: str | Path, tiles: Tiles, slide_mpp: float | None = None) -> None:
        self.slide_path = Path(slide_path)
        self.tiles = tiles
        self.slide_mpp = slide_mpp
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._slide is None or self._pid != os.getpid():  # a forked worker must not share the parent's handle
            self._slide = Slide(self.slide_path, mpp=self.slide_mpp)
            self._pid = os.getpid()
        x, y = self.tiles.coords[i]
        return self._slide.read_region((int(x), int(y)), (self.tiles.size, self.tiles.size), self.tiles.mpp)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None, "_pid": None}

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def iter_tile_batches(
    slide: str | Path | Slide,
    tiles: Tiles,
    batch_size: int = 64,
    workers: int = 2,
    slide_mpp: float | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (index int64 (B,), images uint8 (B, size, size, 3)) over all tiles, in order.

    With workers > 0 the first batch is read in this process (no wait for processes to start; a slide of one
    batch starts none) and the others by DataLoader worker processes that open the slide by path; a Slide
    given here passes its path and mpp on. An in-memory slide (no path) is read in this process.
    """
    if batch_size <= 0 or workers < 0:
        raise ConfigError(f"batch_size must be > 0 and workers >= 0, got {batch_size!r} and {workers!r}")
    path, slide_mpp = (slide.path, slide.mpp) if isinstance(slide, Slide) else (Path(slide), slide_mpp)
    first = len(tiles) if workers == 0 or path is None else min(batch_size, len(tiles))
    if isinstance(slide, Slide):
        yield from _read_batches(slide, tiles, batch_size, stop=first)
    else:
        with Slide(path, mpp=slide_mpp) as opened:
            yield from _read_batches(opened, tiles, batch_size, stop=first)
    if first == len(tiles):
        return
    loader = DataLoader(
        Subset(TileDataset(path, tiles, slide_mpp), range(first, len(tiles))),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_stack,
        prefetch_factor=2,
    )
    start = first
    for images in loader:  # DataLoader keeps batch order with workers, so indices follow from the count
        yield np.arange(start, start + len(images), dtype=np.int64), images.numpy()
        start += len(images)


def _read_batches(slide: Slide, tiles: Tiles, batch_size: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of the tiles before `stop`, read in this process."""
    size = (tiles.size, tiles.size)
    for start in range(0, stop, batch_size):
        index = np.arange(start, min(start + batch_size, stop), dtype=np.int64)
        images = np.stack([slide.read_region((int(x), int(y)), size, tiles.mpp) for x, y in tiles.coords[index]])
        yield index, images


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    # a tensor travels from the worker through shared memory instead of being pickled
    return torch.from_numpy(np.stack(images))


def _interpolate(table: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a 2-D table at fractional (y, x) positions, clipped to the table."""
    y = np.clip(y, 0, table.shape[0] - 1)
    x = np.clip(x, 0, table.shape[1] - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), table.shape[0] - 2)
    x0 = np.minimum(np.floor(x).astype(np.int64), table.shape[1] - 2)
    dy, dx = y - y0, x - x0
    return (
        table[y0, x0] * (1 - dy) * (1 - dx)
        + table[y0, x0 + 1] * (1 - dy) * dx
        + table[y0 + 1, x0] * dy * (1 - dx)
        + table[y0 + 1, x0 + 1] * dy * dx
    )


def _check_tile_args(mpp: float, size: int, overlap: int, min_tissue: float) -> None:
    if not mpp > 0:
        raise ConfigError(f"tiles.mpp must be > 0, got {mpp!r}")
    if size != int(size) or size <= 0:
        raise ConfigError(f"tiles.size must be a positive whole number of px, got {size!r}")
    if overlap != int(overlap) or not 0 <= overlap < size:
        raise ConfigError(f"tiles.overlap must be a whole number in [0, size={size}), got {overlap!r}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"tiles.min_tissue must be in [0, 1], got {min_tissue!r}")


def _check_mask(slide: Slide, tissue: np.ndarray, tissue_mpp: float) -> np.ndarray:
    mask = np.asarray(tissue)
    if mask.ndim != 2 or not tissue_mpp > 0:
        raise ConfigError(
            f"tissue must be a 2-D mask with tissue_mpp > 0, got shape {mask.shape} and tissue_mpp {tissue_mpp!r}"
        )
    width0, height0 = slide.dimensions
    expected = (height0 * slide.mpp / tissue_mpp, width0 * slide.mpp / tissue_mpp)
    if any(abs(got - want) > max(2.0, 0.02 * want) for got, want in zip(mask.shape, expected)):
        raise ConfigError(
            f"tissue mask of shape {mask.shape} does not cover {_name(slide)} at tissue_mpp {tissue_mpp:g} "
            f"(expected about {expected[0]:.0f} x {expected[1]:.0f}); pass the mpp the thumbnail was read at"
        )
    return mask.astype(bool, copy=False)


def _name(slide: Slide) -> str:
    return slide.path.name if slide.path is not None else slide.id


def tile_slide(slide: Slide, config: dict) -> tuple[np.ndarray, float, np.ndarray, Tiles]:
    """(thumbnail, thumbnail mpp, tissue mask, tissue tiles) of an opened slide, per the config's tissue and tiles."""
    t, g = config["tissue"], config["tiles"]
    thumbnail_mpp = max(float(t["thumbnail_mpp"]), slide.mpp)
    thumbnail = slide.thumbnail(thumbnail_mpp)
    tissue = find_tissue(thumbnail, thumbnail_mpp, method=t["method"], min_area_um2=t["min_area_um2"],
                         closing_um=t["closing_um"], fill_holes=t["fill_holes"])
    tiles = make_tiles(slide, tissue, thumbnail_mpp, g["mpp"], g["size"], overlap=g["overlap"],
                       min_tissue=g["min_tissue"])
    return thumbnail, thumbnail_mpp, tissue, tiles


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """The items of `items`, produced up to `depth` ahead by a background thread.

    Slide readers (OpenSlide, tifffile codecs, PIL resizing) release the GIL, so the next batches are read
    while the encoder works on this one. Errors in the producer are raised here; leaving early stops it.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="wsi-qc-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
