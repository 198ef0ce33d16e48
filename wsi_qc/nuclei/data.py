"""Labelled nuclei on disk: readers for the layouts of ../shared/data/nuclei and a plain folder, and targets.

A Sample is one RGB image (uint8, H x W x 3) with its instance map (uint16, 0 background, 1..N nuclei),
optional nucleus types (instance id -> type, 1..K), its mpp and a group (the unit of bootstrap and splits:
the source image; CoNSeP tiles of one source image share it).

Layouts (detected by `read_folder`):
- CoNSeP: ``types.csv`` + ``images/<split>/*.jpg`` + ``instances/<split>/*.png`` (pass split).
- images + instances: ``images/*`` + ``instances/<stem>.png``, optional ``images.csv`` (image, organ, mpp or
  mpp_approx): MoNuSeg and CPM-15.
- a plain folder: ``<stem>.<jpg|png|tif>`` beside ``<stem>_instances.png`` (or ``_mask``, ``_label``,
  ``_labels``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from wsi_qc.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIXES = ("_instances", "_mask", "_label", "_labels")
CONSEP_TYPES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}


@dataclass
class Sample:
    """One labelled image: RGB uint8 (H, W, 3), instances uint16 (H, W), types {id: type} or None."""

    name: str
    image: np.ndarray
    instances: np.ndarray
    mpp: float
    group: str
    types: dict[int, int] | None = None
    meta: dict = field(default_factory=dict)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); ConfigError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read image {str(path)!r} ({exc}); pass a JPEG, PNG or TIFF RGB image") from exc


def read_instances(path: str | Path) -> np.ndarray:
    """A 16-bit (or 8-bit) instance PNG/TIFF as uint16 (H, W), 0 = background."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read instance map {str(path)!r} ({exc}); pass a 16-bit PNG of ids") from exc
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 65535:
        raise ConfigError(f"instance map {str(path)!r} is {arr.dtype} {arr.shape}, not one channel of integer ids "
                          f"0..65535; write it as a 16-bit greyscale PNG (0 = background)")
    return arr.astype(np.uint16)


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _pair(image: Path, mask: Path, mpp: float, group: str, **meta) -> Sample:
    rgb, inst = read_rgb(image), read_instances(mask)
    if rgb.shape[:2] != inst.shape:
        raise ConfigError(f"instance map {str(mask)!r} is {inst.shape[1]} x {inst.shape[0]} px but its image "
                          f"{str(image)!r} is {rgb.shape[1]} x {rgb.shape[0]}; they must be the same size")
    return Sample(image.stem, rgb, inst, float(mpp), group, meta=meta)


def read_consep(root: Path, split: str) -> list[Sample]:
    """CoNSeP 256 px tiles of one split with their types (group = source image, e.g. train_10)."""
    if split not in ("train", "test"):
        raise ConfigError(f"CoNSeP split {split!r} is not train or test; pass --split train or --split test")
    types: dict[str, dict[int, int]] = {}
    for row in _csv_rows(root / "types.csv"):
        if row["split"] == split:
            types.setdefault(row["tile"], {})[int(row["instance"])] = int(row["type"])
    samples = []
    for image in _image_files(root / "images" / split):
        s = _pair(image, root / "instances" / split / f"{image.stem}.png", 0.25, image.stem.rsplit("_", 1)[0])
        s.types = types.get(image.stem, {})
        samples.append(s)
    return samples


def read_pairs(root: Path, mpp: float | None = None) -> list[Sample]:
    """``images/`` + ``instances/`` (MoNuSeg, CPM-15): mpp from images.csv (mpp or mpp_approx) or `mpp`."""
    rows = {r["image"]: r for r in _csv_rows(root / "images.csv")} if (root / "images.csv").is_file() else {}
    samples = []
    for image in _image_files(root / "images"):
        row = rows.get(image.stem, {})
        found = mpp if mpp is not None else row.get("mpp") or row.get("mpp_approx")
        if found in (None, ""):
            raise ConfigError(f"no mpp for {str(image)!r}: {root / 'images.csv'} has no mpp for it; pass --mpp")
        mask = root / "instances" / f"{image.stem}.png"
        if not mask.is_file():
            raise ConfigError(f"image {str(image)!r} has no instance map {str(mask)!r}; add it or remove the image")
        samples.append(_pair(image, mask, float(found), image.stem, organ=row.get("organ") or row.get("tissue", "")))
    return samples


def read_plain(root: Path, mpp: float | None) -> list[Sample]:
    """A flat folder of images beside ``<stem>_instances.png`` (or _mask/_label/_labels) masks."""
    if mpp is None:
        raise ConfigError(f"folder {str(root)!r} has no images.csv to give the images' mpp; pass --mpp")
    files = _image_files(root)
    stems = {p.stem: p for p in files}
    samples = []
    for image in files:
        if image.stem.endswith(MASK_SUFFIXES):
            continue
        mask = next((stems[image.stem + s] for s in MASK_SUFFIXES if image.stem + s in stems), None)
        if mask is None:
            raise ConfigError(f"image {str(image)!r} has no instance mask beside it; name it "
                              f"{image.stem}_instances.png (or _mask, _label, _labels)")
        samples.append(_pair(image, mask, mpp, image.stem))
    return samples


def read_folder(path: str | Path, split: str | None = None, mpp: float | None = None) -> list[Sample]:
    """Every labelled image of a folder in one of the layouts above (see the module doc)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"nuclei data folder {str(root)!r} does not exist; pass a folder of images and "
                          f"instance masks (see wsi_qc/nuclei/data.py)")
    if (root / "types.csv").is_file() and (root / "images").is_dir():
        samples = read_consep(root, split or "train")
    elif (root / "images").is_dir() and (root / "instances").is_dir():
        samples = read_pairs(root, mpp)
    else:
        samples = read_plain(root, mpp)
    if not samples:
        raise ConfigError(f"no labelled images found in {str(root)!r}; expected images with instance masks")
    return samples


def resample(sample: Sample, mpp: float) -> Sample:
    """The sample at `mpp` (bilinear image, nearest instances); unchanged within 5 %."""
    factor = sample.mpp / mpp
    if abs(factor - 1) < 0.05:
        return sample
    h, w = sample.instances.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = np.asarray(Image.fromarray(sample.image).resize(size, Image.BILINEAR))
    inst = np.asarray(Image.fromarray(sample.instances.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.uint16)
    return Sample(sample.name, image, inst, mpp, sample.group, sample.types, dict(sample.meta))


def distance_map(instances: np.ndarray) -> np.ndarray:
    """Per nucleus, the Euclidean distance to its boundary divided by its maximum: 1 at the centre, ~0 at
    the edge, 0 on background (float32)."""
    out = np.zeros(instances.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(instances.astype(np.int32)), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        mask = instances[sl] == i
        d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        if d.max() > 0:
            out[sl][mask] = (d[mask] / d.max()).astype(np.float32)
    return out


def type_map(instances: np.ndarray, types: dict[int, int] | None) -> np.ndarray:
    """Per pixel nucleus type (uint8, 0 background or untyped)."""
    lut = np.zeros(int(instances.max()) + 1, np.uint8)
    for i, t in (types or {}).items():
        if i < len(lut):
            lut[i] = t
    return lut[instances]
