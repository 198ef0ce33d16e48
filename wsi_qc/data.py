"""Example data: a small pyramidal slide built from real stained images that ship inside installed packages.

The slide is a tiled JPEG TIFF (one top-level tiled page per pyramid step, resolution tags in
centimetres) that OpenSlide reads as ``generic-tiff`` with every step and its mpp. Tissue islands
(irregular blobs) carry the texture of tiatoolbox's H&E stain-normalisation target and of
scikit-image's IHC image, mirrored and tiled; the background is near-white with slight noise.
Level 0 is written tile by tile from a generator; the coarser steps are built from it on the fly and
kept JPEG-encoded, so a 20k x 20k slide needs a few tile rows plus the compressed coarser steps in memory.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)

TILE = 256          # TIFF tile side, pixels
CELL = 32           # level-0 pixels per cell of the coarse tissue field (divides TILE)
SOURCE_MPP = 0.5    # assumed resolution of the packaged stain images (20x-like)
BACKGROUND = 240    # grey value of the glass
MIN_SIDE = 256      # coarsest pyramid step keeps at least this many pixels on its shorter side
JPEG_QUALITY = 90


@functools.lru_cache(maxsize=1)
def _stain_images() -> tuple[tuple[str, np.ndarray], ...]:
    """Real stained RGB images shipped in installed packages: tiatoolbox's H&E target, skimage's IHC."""
    from skimage import data as skdata

    images = []
    spec = importlib.util.find_spec("tiatoolbox")
    # the file tiatoolbox.data.stain_norm_target() reads; located without importing tiatoolbox (slow)
    target = Path(spec.origin).parent / "data" / "target_image.png" if spec and spec.origin else None
    if target is not None and target.is_file():
        images.append(("he", np.asarray(Image.open(target).convert("RGB"))))
    else:
        log.warning("tiatoolbox is not installed: the example slide uses only scikit-image's IHC image")
    images.append(("ihc", np.ascontiguousarray(skdata.immunohistochemistry()[..., :3])))
    return tuple(images)


def _mirrored_texture(image: np.ndarray, mpp: float) -> np.ndarray:
    """The image resized from SOURCE_MPP to `mpp` and mirrored into a seamless (2h, 2w, 3) tile."""
    h, w = image.shape[:2]
    f = SOURCE_MPP / mpp
    size = (max(16, round(w * f)), max(16, round(h * f)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    top = np.concatenate([img, img[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def _tissue_field(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coarse tissue field (>0.5 = tissue, float32) and the nearest island of each cell (int16)."""
    gh, gw = shape
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    side = min(gh, gw)
    field = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.int16)
    centres: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(4, 9))):
        radius = side * rng.uniform(0.08, 0.14)
        for _ in range(50):  # rejection sampling keeps islands apart; an island that finds no room is dropped
            cy, cx = rng.uniform(1.6 * radius, gh - 1.6 * radius), rng.uniform(1.6 * radius, gw - 1.6 * radius)
            if all(np.hypot(cy - y, cx - x) > 1.8 * (radius + r) for y, x, r in centres):
                break
        else:
            continue
        centres.append((cy, cx, radius))
        blob = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(3, 7))):  # a few overlapping lobes make an irregular outline
            oy, ox = rng.normal(0, 0.35 * radius, 2)
            r = radius * rng.uniform(0.45, 0.8)
            blob += np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * r * r))
        label[blob > field] = len(centres) - 1
        field = np.maximum(field, blob)
    # low-frequency noise roughens the outlines and opens a few holes
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), max(1.0, side / 40))
    noise /= noise.std() + 1e-6
    return field + 0.12 * noise, label


def _level0_tiles(
    size: tuple[int, int], mpp: float, rng: np.random.Generator, blank: bool
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (row, col, tile (TILE, TILE, 3) uint8) of level 0 in row-major order."""
    w, h = size
    rows, cols = -(-h // TILE), -(-w // TILE)
    # noisy glass, cropped at a random offset for each tile
    glass = (BACKGROUND + rng.integers(-3, 4, (2 * TILE, 2 * TILE, 3))).astype(np.uint8)
    if blank:
        textures: list[np.ndarray] = []
        field = np.zeros((rows * TILE // CELL + 2, cols * TILE // CELL + 2), np.float32)
        label = np.zeros(field.shape, np.int16)
        islands = np.zeros((0, 3), np.int64)
    else:
        textures = [_mirrored_texture(img, mpp) for _, img in _stain_images()]
        # one cell of margin on each side so every tile's bilinear upsampling sees its neighbours
        field, label = _tissue_field((rows * TILE // CELL + 2, cols * TILE // CELL + 2), rng)
        n = int(label.max()) + 1
        weights = np.array([3.0 if name == "he" else 1.0 for name, _ in _stain_images()])  # mostly H&E
        src = rng.choice(len(textures), n, p=weights / weights.sum())
        islands = np.stack([src, rng.integers(0, 1 << 20, n), rng.integers(0, 1 << 20, n)], axis=1)
    k = TILE // CELL
    for r in range(rows):
        for c in range(cols):
            oy, ox = rng.integers(0, TILE, 2)
            tile = glass[oy:oy + TILE, ox:ox + TILE]
            block = field[r * k:r * k + k + 2, c * k:c * k + k + 2]
            if block.max() > 0.45:
                up = np.asarray(Image.fromarray(block).resize(((k + 2) * CELL,) * 2, Image.Resampling.BILINEAR))
                alpha = np.clip((up[CELL:-CELL, CELL:-CELL] - 0.5) * 20.0, 0.0, 1.0)[..., None]
                lab = np.repeat(np.repeat(label[r * k + 1:r * k + k + 1, c * k + 1:c * k + k + 1], CELL, 0), CELL, 1)
                tex = np.zeros((TILE, TILE, 3), np.uint8)
                for i in np.unique(lab):
                    t = textures[islands[i, 0]]
                    ys = (np.arange(r * TILE, (r + 1) * TILE) + islands[i, 1]) % t.shape[0]
                    xs = (np.arange(c * TILE, (c + 1) * TILE) + islands[i, 2]) % t.shape[1]
                    sel = lab == i
                    tex[sel] = t[ys[:, None], xs[None, :]][sel]
                tile = (tile + alpha * (tex.astype(np.float32) - tile) + 0.5).astype(np.uint8)
            yield r, c, np.ascontiguousarray(tile)


def _jpeg(tile: np.ndarray) -> bytes:
    """A TIFF JPEG tile as tifffile writes it for photometric RGB (YCbCr 2x2 subsampled)."""
    return imagecodecs.jpeg_encode(
        tile, level=JPEG_QUALITY, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


class _Pyramid:
    """Builds the coarser steps from level-0 tiles as they stream past; holds one tile row per step.

    Each tile of step k is JPEG-encoded once (kept as bytes for k > 0, since TIFF pages are written one
    after another) and its 2x2 box average fills half a tile of the row buffer of step k + 1.
    """

    def __init__(self, dims: list[tuple[int, int]]):
        self.cols = [-(-w // TILE) for w, _ in dims]
        self.rows = [-(-h // TILE) for _, h in dims]
        self.buffers = [np.full((TILE, c * TILE, 3), BACKGROUND, np.uint8) for c in self.cols]
        self.encoded: list[list[bytes]] = [[] for _ in dims]

    def add(self, k: int, r: int, c: int, tile: np.ndarray) -> bytes:
        """Take tile (r, c) of step k; return its JPEG bytes."""
        data = _jpeg(tile)
        if k > 0:
            self.encoded[k].append(data)
        if k + 1 < len(self.cols):
            half = TILE // 2
            y, x = (r % 2) * half, c * half
            self.buffers[k + 1][y:y + half, x:x + half] = np.asarray(Image.fromarray(tile).reduce(2))
            if c == self.cols[k] - 1 and (r % 2 == 1 or r == self.rows[k] - 1):
                buf = self.buffers[k + 1]
                for cc in range(self.cols[k + 1]):
                    self.add(k + 1, r // 2, cc, np.ascontiguousarray(buf[:, cc * TILE:(cc + 1) * TILE]))
                buf[:] = BACKGROUND
        return data


def write_example_slide(
    path: str | Path,
    size: tuple[int, int] = (8192, 8192),
    mpp: float = 0.25,
    seed: int = 0,
    blank: bool = False,
) -> Path:
    """Write a deterministic pyramidal tiled JPEG TIFF slide of `size` (w, h) pixels at `mpp`; return its path.

    ``blank=True`` writes glass only (no tissue). OpenSlide opens the result as ``generic-tiff``.
    """
    w, h = (int(v) for v in size)
    if w < TILE or h < TILE:
        raise ConfigError(f"example slide size {size} is too small; pass a size of at least ({TILE}, {TILE})")
    if not mpp > 0:
        raise ConfigError(f"example slide mpp {mpp!r} must be positive; pass e.g. mpp=0.25")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dims = [(w, h)]
    while min(dims[-1]) // 2 >= MIN_SIDE:
        dims.append((-(-dims[-1][0] // 2), -(-dims[-1][1] // 2)))
    pyramid = _Pyramid(dims)
    level0 = (pyramid.add(0, r, c, tile) for r, c, tile in _level0_tiles((w, h), mpp, rng, blank))
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=w * h * 3 > 2**31) as tif:
        for i, (dw, dh) in enumerate(dims):
            tif.write(
                level0 if i == 0 else iter(pyramid.encoded[i]),
                shape=(dh, dw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                resolution=(res / 2**i, res / 2**i),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description=f"wsi-qc example slide seed={seed} mpp={mpp}" if i == 0 else None,
                metadata=None,
            )
    log.info("wrote example slide %s (%d x %d px, %d steps, mpp %.3g)", path, w, h, len(dims), mpp)
    return path
