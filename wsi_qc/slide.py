"""Slides: open a whole-slide image file (or an array) and read any region at any mpp.

OpenSlide opens SVS, NDPI, MRXS, SCN, generic tiled TIFF and the other formats it knows. What it
cannot open goes through tifffile (plain strip TIFF, OME-TIFF with SubIFD pyramids; read tile by
tile through zarr, or memory-mapped when uncompressed) or PIL (PNG/JPEG, read once into memory).
"""

from __future__ import annotations

import errno
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_qc.errors import ConfigError, SlideError
from wsi_qc.identity import head_digest
from wsi_qc.readers import MAX_OUTPUT_PIXELS, ArrayReader, OpenSlideReader, TiffReader, open_reader

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.01          # a pyramid step within 1 % of the asked mpp is read as is
PLAUSIBLE_MPP = (0.01, 50.0)  # metadata mpp outside this range (e.g. 72 dpi = 352.8 µm/px) is not a scan resolution
MAX_READ_PIXELS = 1 << 24     # larger reads are split into bands (bounded memory for thumbnails)
# Level-0 pixels per byte of file beyond any codec's reach: a uniform 256 px tile takes ~200 bytes in zlib or JPEG
# (0.003 bytes/px); a header claiming pixels at under 1e-4 bytes each is corrupt (checked above 2**24 pixels).
MIN_BYTES_PER_PIXEL = 1e-4
MULTI_FILE_SUFFIXES = {".mrxs", ".vms", ".vmu"}  # the pixels are in other files beside the one opened


def _check_mpp_arg(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}={value!r} is not a positive number of microns per pixel; pass e.g. {name}=0.5")
    return v


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and PLAUSIBLE_MPP[0] < mpp < PLAUSIBLE_MPP[1]


def slide_files(folder: str | Path, pattern: str) -> list[Path]:
    """Slide files under a folder, recursive, sorted: `pattern` is comma-separated globs (run.pattern); links count
    too (a dangling one fails when opened, naming the file)."""
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    return sorted({p for g in globs for p in Path(folder).rglob(g) if p.is_file() or p.is_symlink()})


def _check_file(p: Path) -> None:
    """SlideError with the reason when p is not a readable, non-empty file."""
    if p.is_symlink() and not p.exists():
        try:
            p.stat()
        except OSError as exc:
            why = "a loop of symbolic links" if exc.errno == errno.ELOOP else f"a link to {os.readlink(p)}, which is missing"
            raise SlideError(f"{p} is {why}; fix or remove the link") from exc
    if not p.exists():
        raise SlideError(f"{p} does not exist; check the path (and that the disk holding it is mounted)")
    if p.is_dir():
        raise SlideError(f"{p} is a directory; pass a slide file (for MRXS the .mrxs file beside its folder)")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except PermissionError as exc:
        raise SlideError(f"{p}: permission denied (this user cannot read it); fix its permissions, "
                         f"e.g. chmod a+r, or run as a user who can read it") from exc
    if p.stat().st_size == 0:
        raise SlideError(f"{p.name} is empty (0 bytes); the copy or download is incomplete - copy it again")


class Slide:
    """An opened slide: metadata, and regions or thumbnails read at any mpp.

    ``mpp`` forces the level-0 mpp; ``mpp_fallback`` is used only when the metadata has none.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_fallback: float | None = None):
        self.path: Path | None = Path(path)
        self.id = self.path.stem
        mpp = _check_mpp_arg(mpp, "mpp")
        mpp_fallback = _check_mpp_arg(mpp_fallback, "mpp_fallback")
        p = self.path
        _check_file(p)
        self._reader = open_reader(p)
        try:
            self._check_dimensions()
        except SlideError:
            self.close()
            raise
        self.mpp = self._resolve_mpp(self._reader.mpp, mpp, mpp_fallback)
        log.debug("opened %s with %s, mpp %.4g, %d steps", p, self.backend, self.mpp, self.level_count)

    def _check_dimensions(self) -> None:
        """Refuse a header whose level-0 size is implausible for the file's size (a corrupt or forged header)."""
        w0, h0 = self._reader.level_dimensions[0]
        pixels = w0 * h0
        if self.path.suffix.lower() in MULTI_FILE_SUFFIXES or pixels <= MAX_READ_PIXELS:
            return
        size = self.path.stat().st_size
        if size / pixels < MIN_BYTES_PER_PIXEL:
            raise SlideError(f"{self.path.name} claims {w0} x {h0} pixels in {size} bytes ({size / pixels:.2g} bytes "
                             f"per pixel, below any codec's {MIN_BYTES_PER_PIXEL:g}); its header is corrupt "
                             f"- copy or export the slide again")

    @classmethod
    def from_config(cls, path: str | Path, config: dict) -> "Slide":
        """Open a slide with the config's `slide` section (mpp override and fallback)."""
        return cls(path, mpp=config["slide"]["mpp"], mpp_fallback=config["slide"]["mpp_fallback"])

    @classmethod
    def from_array(cls, array: np.ndarray, mpp: float, name: str = "array") -> Slide:
        """An in-memory slide of an (H, W, 3) uint8 RGB array at level-0 `mpp`."""
        a = np.asarray(array)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or 0 in a.shape:
            raise ConfigError(
                f"array {name!r} has shape {a.shape} and dtype {a.dtype}; pass an (H, W, 3) uint8 RGB array"
            )
        slide = cls.__new__(cls)
        slide.path = None
        slide.id = name
        slide._reader = ArrayReader(a, "array")
        slide.mpp = _check_mpp_arg(mpp, "mpp")
        if slide.mpp is None:
            raise ConfigError(f"from_array({name!r}) needs the array's mpp; pass mpp=0.5 or its real resolution")
        return slide

    def _resolve_mpp(self, found: float | None, mpp: float | None, fallback: float | None) -> float:
        if mpp is not None:
            return mpp
        if _plausible(found):
            return found
        if fallback is not None:
            log.info("%s has no usable mpp in its metadata; using mpp_fallback %.4g", self.id, fallback)
            return fallback
        name = self.path.name if self.path else self.id
        self.close()
        seen = "" if found is None else f" (it says {found:.4g} µm/px, a screen default rather than a scan resolution)"
        raise SlideError(f"{name} has no mpp in its metadata{seen}; pass --mpp or set slide.mpp_fallback")

    def _open(self) -> OpenSlideReader | TiffReader | ArrayReader:
        if self._reader is None:
            raise SlideError(
                f"slide {self.id} is closed; open it again with Slide(path) or read inside `with Slide(...)`"
            )
        return self._reader

    @property
    def backend(self) -> str:
        return self._open().backend

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._open().level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._open().level_downsamples)

    @property
    def level_count(self) -> int:
        return len(self._open().level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._open().level_dimensions[0]

    def check_mpp(self, mpp: float) -> None:
        """Refuse a target mpp finer than level 0 (1 % tolerance): upsampling invents detail."""
        if mpp < self.mpp * (1 - MPP_TOLERANCE):
            raise ConfigError(
                f"{self.id}: requested mpp {mpp:.4g} is finer than the slide's level-0 mpp {self.mpp:.4g}; "
                f"upsampling invents detail - ask for mpp >= {self.mpp:.4g} (tiles.mpp, tissue.thumbnail_mpp)"
            )

    def _best_level(self, mpp: float) -> int:
        """The coarsest pyramid step whose mpp is at most `mpp` (1 % tolerance)."""
        self.check_mpp(mpp)
        fits = [i for i, d in enumerate(self._reader.level_downsamples) if self.mpp * d <= mpp * (1 + MPP_TOLERANCE)]
        return max(fits, key=lambda i: self._reader.level_downsamples[i])

    def read_region(self, location: tuple[int, int], size: tuple[int, int], mpp: float) -> np.ndarray:
        """(h, w, 3) uint8 RGB of `size` (w, h) pixels at `mpp`, top-left at level-0 `location`; white outside."""
        reader = self._open()
        mpp = _check_mpp_arg(mpp, "mpp")
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise ConfigError(f"{self.id}: region size {tuple(size)} must be positive; pass (width, height) in pixels")
        if w * h > MAX_OUTPUT_PIXELS:
            raise SlideError(f"{self.id}: a read of {w} x {h} px at {mpp:g} mpp would take {w * h * 3 / 2**30:.1f} GiB "
                             f"(limit {MAX_OUTPUT_PIXELS} px); the slide's size {self.dimensions} at mpp "
                             f"{self.mpp:.4g} is implausible, or ask for a coarser mpp (tissue.thumbnail_mpp)")
        level = self._best_level(mpp)
        d = reader.level_downsamples[level]
        f = mpp / (self.mpp * d)  # pyramid-step pixels per output pixel
        bx, by = location[0] / d, location[1] / d
        if abs(f - 1) <= MPP_TOLERANCE:
            return reader.read(level, round(bx), round(by), w, h)
        out = np.empty((h, w, 3), np.uint8)
        band = max(1, int(MAX_READ_PIXELS / (w * f * f + 1)))  # output rows per read
        x0, x1 = math.floor(bx), math.ceil(bx + w * f)
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            top, bottom = by + r0 * f, by + r1 * f
            y0, y1 = math.floor(top), math.ceil(bottom)
            src = Image.fromarray(reader.read(level, x0, y0, x1 - x0, y1 - y0))
            box = (bx - x0, top - y0, bx - x0 + w * f, bottom - y0)
            out[r0:r1] = np.asarray(src.resize((w, r1 - r0), Image.Resampling.BOX, box=box))
        return out

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide as (h, w, 3) uint8 RGB at `mpp`."""
        mpp = _check_mpp_arg(mpp, "mpp")
        w0, h0 = self.dimensions
        size = (max(1, round(w0 * self.mpp / mpp)), max(1, round(h0 * self.mpp / mpp)))
        return self.read_region((0, 0), size, mpp)

    def sha256_head(self) -> str:
        """'sha256:<hex>:<size>' of the first MiB of the file (of the pixels for an array) and its size in bytes
        (identity.head_digest)."""
        if self.path is None:
            return head_digest(array=self._open()._image)
        return head_digest(self.path)

    def close(self) -> None:
        """Release the file handles; reading afterwards raises SlideError."""
        if getattr(self, "_reader", None) is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._reader is None else f"{self.backend}, {self.dimensions[0]}x{self.dimensions[1]}"
        return f"Slide({self.id!r}, {state}, mpp={self.mpp:.4g})"
