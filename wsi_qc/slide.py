"""Slides: open a whole-slide image file (or an array) and read any region at any mpp.

OpenSlide opens SVS, NDPI, MRXS, SCN, generic tiled TIFF and the other formats it knows. What it
cannot open goes through tifffile (plain strip TIFF, OME-TIFF with SubIFD pyramids; read tile by
tile through zarr, or memory-mapped when uncompressed) or PIL (PNG/JPEG, read once into memory).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
import zarr
from PIL import Image

from wsi_qc.errors import ConfigError, SlideError

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.01          # a pyramid step within 1 % of the asked mpp is read as is
PLAUSIBLE_MPP = (0.01, 50.0)  # metadata mpp outside this range (e.g. 72 dpi = 352.8 µm/px) is not a scan resolution
MAX_READ_PIXELS = 1 << 24     # larger reads are split into bands (bounded memory for thumbnails)
MAX_OUTPUT_PIXELS = 1 << 28   # a region or thumbnail larger than this (768 MiB of RGB) is refused
# Level-0 pixels per byte of file beyond any codec's reach: a uniform 256 px tile takes ~200 bytes in zlib or JPEG
# (0.003 bytes/px); a header claiming pixels at under 1e-4 bytes each is corrupt (checked above 2**24 pixels).
MIN_BYTES_PER_PIXEL = 1e-4
MULTI_FILE_SUFFIXES = {".mrxs", ".vms", ".vmu"}  # the pixels are in other files beside the one opened
HEAD_BYTES = 1 << 20
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".btf", ".png", ".jpg", ".jpeg"}
FORMATS = "SVS, NDPI, MRXS, SCN, tiled or plain TIFF, OME-TIFF, PNG, JPEG"
_UNIT_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3}


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


def _tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """Level-0 mpp from OME-XML, ImageJ, Aperio ImageDescription or the resolution tags; None if absent."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            root = None
        pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None) if root is not None else None
        if pixels is not None and pixels.get("PhysicalSizeX"):
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if unit in _UNIT_UM:
                return float(pixels.get("PhysicalSizeX")) * _UNIT_UM[unit]
    page = tif.pages.first
    found = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", page.description or "")
    if found:
        return float(found.group(1))
    if "XResolution" not in page.tags:
        return None
    xres = page.resolution[0]
    if xres <= 0:
        return None
    unit = int(page.resolutionunit)
    if unit == 1 and tif.is_imagej:  # ImageJ stores pixels per `unit` with ResolutionUnit NONE
        ij_unit = str((tif.imagej_metadata or {}).get("unit", "")).replace("\\u00B5", "µ")
        return _UNIT_UM[ij_unit] / xres if ij_unit in _UNIT_UM else None
    per_unit = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(unit)
    return per_unit / xres if per_unit else None


def _padded(get, width: int, height: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """(h, w, 3) RGB of the box at (x, y); parts outside (width, height) are white."""
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = get(y0, y1, x0, x1)
    return out


def _to_rgb(a: np.ndarray) -> np.ndarray:
    """(h, w[, c]) uint8/uint16 pixels -> (h, w, 3) uint8."""
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    return a[..., :3] if a.shape[-1] >= 3 else np.repeat(a[..., :1], 3, axis=-1)


class _OpenSlideReader:
    backend = "openslide"

    def __init__(self, path: Path):
        self._os = openslide.OpenSlide(str(path))
        self.level_dimensions = [tuple(d) for d in self._os.level_dimensions]
        self.level_downsamples = [float(d) for d in self._os.level_downsamples]
        try:
            self.mpp: float | None = float(self._os.properties["openslide.mpp-x"])
        except (KeyError, ValueError):
            self.mpp = None

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        d = self.level_downsamples[level]
        img = self._os.read_region((round(x * d), round(y * d)), level, (w, h))
        rgba = np.asarray(img)
        if rgba[..., 3].min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, img).convert("RGB"))

    def close(self) -> None:
        self._os.close()


class _TiffReader:
    """Series 0 of a TIFF and its pyramid (SubIFDs included), read through zarr or a memory map."""

    backend = "tifffile"

    def __init__(self, path: Path):
        self._tif = tifffile.TiffFile(path)
        try:
            series = self._tif.series[0]
            self._stores: list[Any] = []
            self._arrays: list[Any] = []
            self._axes: list[str] = []
            for i, lvl in enumerate(series.levels):
                if lvl.dtype not in (np.uint8, np.uint16):
                    raise SlideError(
                        f"{path.name} has pixel type {lvl.dtype}; wsi-qc reads 8- or 16-bit RGB or grey slides "
                        f"- convert it (e.g. to an 8-bit RGB pyramidal TIFF)"
                    )
                self._axes.append(lvl.axes)
                if lvl.dataoffset is not None:  # uncompressed and contiguous: memory-map, read nothing now
                    self._arrays.append(tifffile.memmap(path, series=0, level=i, mode="r"))
                    continue
                store = series.aszarr(level=i)
                self._stores.append(store)
                arr = zarr.open_array(store, mode="r")
                if all(c >= s for c, s in zip(arr.chunks, arr.shape, strict=True)):
                    if arr.size > 3 * MAX_OUTPUT_PIXELS:
                        raise SlideError(f"{path.name} holds {arr.shape} pixels in one compressed chunk, more than "
                                         f"can be decoded in bounded memory (or a corrupt header); convert it to a "
                                         f"tiled pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid`)")
                    arr = arr[...]  # one chunk (a single strip or tile): decode it once
                self._arrays.append(arr)
            self.level_dimensions = [(lvl.shape[lvl.axes.index("X")], lvl.shape[lvl.axes.index("Y")])
                                     for lvl in series.levels]
            self.mpp = _tiff_mpp(self._tif)
        except Exception:
            self.close()
            raise
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]

    def _get(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        axes = self._axes[level]
        channel = "S" if "S" in axes else "C" if "C" in axes else ""
        index = tuple(slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == channel
                      else 0 for a in axes)
        kept = [a for a in axes if a in ("Y", "X") or a == channel]
        a = np.asarray(self._arrays[level][index])
        return _to_rgb(a.transpose([kept.index(k) for k in ("Y", "X", channel) if k]))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        width, height = self.level_dimensions[level]
        return _padded(lambda *b: self._get(level, *b), width, height, x, y, w, h)

    def close(self) -> None:
        for store in getattr(self, "_stores", []):
            store.close()
        self._arrays = []
        self._tif.close()


class _ArrayReader:
    """An image held in memory (an array, or a PNG/JPEG read once)."""

    def __init__(self, image: np.ndarray, backend: str, mpp: float | None = None):
        self._image = image
        self.backend = backend
        self.mpp = mpp
        self.level_dimensions = [(image.shape[1], image.shape[0])]
        self.level_downsamples = [1.0]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return _padded(lambda y0, y1, x0, x1: self._image[y0:y1, x0:x1], *self.level_dimensions[0], x, y, w, h)

    def close(self) -> None:
        self._image = np.zeros((0, 0, 3), np.uint8)


def _open_pil(path: Path) -> _ArrayReader:
    try:
        with Image.open(path) as img:
            dpi = img.info.get("dpi")
            image = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise SlideError(
            f"{path.name} is too large to read into memory as a plain image ({e}); "
            f"convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid`)"
        ) from e
    mpp = 25400.0 / float(dpi[0]) if dpi and float(dpi[0]) > 0 else None
    return _ArrayReader(image, "pil", mpp)


def _tiff_level_count(path: Path) -> int:
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels)
    except Exception:  # noqa: BLE001 - only used to compare with OpenSlide's count
        return 0


def _open_reader(path: Path) -> _OpenSlideReader | _TiffReader | _ArrayReader:
    """The first reader that opens `path`: OpenSlide, then tifffile, then PIL."""
    failures = []
    fmt = openslide.OpenSlide.detect_format(str(path))
    if fmt is not None:
        try:
            reader = _OpenSlideReader(path)
        except openslide.OpenSlideError as e:
            failures.append(f"OpenSlide ({fmt}): {e}")
        else:
            # OpenSlide reads only top-level pages: OME-TIFF pyramids in SubIFDs are tifffile's
            if fmt != "generic-tiff" or _tiff_level_count(path) <= len(reader.level_dimensions):
                return reader
            reader.close()
    else:
        failures.append("OpenSlide: format not recognised")
    try:
        return _TiffReader(path)
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many kinds on foreign or damaged files
        failures.append(f"tifffile: {e}")
    try:
        return _open_pil(path)
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001
        failures.append(f"PIL: {e}")
    reasons = "; ".join(failures)
    if path.suffix.lower() not in SLIDE_SUFFIXES:
        raise SlideError(
            f"{path.name} is not a slide format wsi-qc reads (suffix {path.suffix!r}; {reasons}); "
            f"pass a slide file: {FORMATS}"
        )
    raise SlideError(
        f"{path.name} cannot be read as a slide ({reasons}); the file is damaged or truncated "
        f"- copy or export it again"
    )


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
        self._reader = _open_reader(p)
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
        slide._reader = _ArrayReader(a, "array")
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

    def _open(self) -> _OpenSlideReader | _TiffReader | _ArrayReader:
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
        """'sha256:<hex>:<size>' of the first MiB of the file (of the pixels for an array) and its size in bytes."""
        if self.path is None:
            image = self._open()._image
            head = image.reshape(-1)[:HEAD_BYTES].tobytes()
            return f"sha256:{hashlib.sha256(head).hexdigest()}:{image.nbytes}"
        with open(self.path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
        return f"sha256:{hashlib.sha256(head).hexdigest()}:{self.path.stat().st_size}"

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
