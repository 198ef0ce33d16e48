"""Slide readers behind `Slide`: OpenSlide, tifffile (tiled or plain TIFF, OME-TIFF) and PIL (PNG, JPEG)."""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
import zarr
from PIL import Image

from wsi_qc.errors import SlideError

log = logging.getLogger(__name__)

MAX_OUTPUT_PIXELS = 1 << 28   # a region or thumbnail larger than this (768 MiB of RGB) is refused
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".btf", ".png", ".jpg", ".jpeg"}
FORMATS = "SVS, NDPI, MRXS, SCN, tiled or plain TIFF, OME-TIFF, PNG, JPEG"
_UNIT_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3}

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


class OpenSlideReader:
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


class TiffReader:
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


class ArrayReader:
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


def _open_pil(path: Path) -> ArrayReader:
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
    return ArrayReader(image, "pil", mpp)


def _tiff_level_count(path: Path) -> int:
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels)
    except Exception:  # noqa: BLE001 - only used to compare with OpenSlide's count
        return 0


def open_reader(path: Path) -> OpenSlideReader | TiffReader | ArrayReader:
    """The first reader that opens `path`: OpenSlide, then tifffile, then PIL."""
    failures = []
    fmt = openslide.OpenSlide.detect_format(str(path))
    if fmt is not None:
        try:
            reader = OpenSlideReader(path)
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
        return TiffReader(path)
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


