"""The zarr (v3) store a run writes: one group per slide, marked done only once it is complete.

Layout::

    qc.zarr/            attrs {"wsi_qc": {"version", "config", "scorer", "threshold", "auc"}}
      <slide_id>/       attrs: source, sha256_head, mpp, tile size/mpp, n_tiles, n_keep, fingerprint,
                               timings, ..., status ("writing" while arrays are written, "done" last)
        coords int32 (N, 2), rl2 float32 (N,), keep bool (N,), grid uint8 (rows, cols) ("y", "x"),
        tissue bool (h, w) ("y", "x"), features float32 (N, D) (optional)

Processes may write different slides into one store at once: each slide group is its own directory,
and slide writers never rewrite the root's zarr.json (only open_store with attrs and consolidate do,
from the one process that drives a run).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import zarr

from wsi_qc import __version__
from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)

MARKER = "wsi_qc"
DONE = "done"
WRITING = "writing"
ARRAYS = ("coords", "rl2", "keep", "grid", "tissue", "rl2_map", "features")


def slide_key(slide_id: str) -> str:
    """Store name of a slide id: characters outside [A-Za-z0-9._-] become '_', a leading '__' becomes '_'."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", str(slide_id))
    key = re.sub(r"^__+", "_", key)  # names starting with "__" are reserved by zarr v3
    if not key or set(key) == {"."} or key == "zarr.json":
        raise ConfigError(f"slide id {slide_id!r} cannot name a slide in the store; rename the slide file")
    return key


def _not_a_store(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path} exists and is not a wsi-qc store ({why}); choose another --out or remove it")


def open_store(path: str | Path, create: bool = True, attrs: dict | None = None) -> zarr.Group:
    """Open (or create) the store at path; attrs are merged into the root's "wsi_qc" attrs.

    Refuses an existing path that is not a wsi-qc store: a file, a directory with other files, or a zarr
    hierarchy without the "wsi_qc" marker. Writing attrs keeps every slide group (and drops stale
    consolidated metadata; call consolidate() at the end of the run).
    """
    path = Path(path)
    if path.is_file():
        raise _not_a_store(path, "it is a file")
    fresh = not path.exists() or (path.is_dir() and not any(path.iterdir()))
    if fresh:
        if not create:
            raise ConfigError(f"no wsi-qc store at {path}; run `wsi-qc run --out {path}` first or fix the path")
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = {"version": __version__, **_jsonable(attrs or {})}
        try:
            return zarr.open_group(path, mode="w-", zarr_format=3, attributes={MARKER: marker})
        except FileExistsError:  # another process created it just now
            pass
    if not (path / "zarr.json").is_file():
        raise _not_a_store(path, "a directory without zarr.json")
    try:
        root = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    except (ValueError, OSError, KeyError) as exc:
        raise _not_a_store(path, f"{type(exc).__name__}: {exc}") from exc
    if MARKER not in root.attrs:
        raise _not_a_store(path, f"a zarr group without the {MARKER!r} marker in its attrs")
    if attrs:
        root.update_attributes({MARKER: {**root.attrs[MARKER], **_jsonable(attrs), "version": __version__}})
    return root


def _live(root: zarr.Group) -> zarr.Group:
    """The root read from the store itself, not from (possibly stale) consolidated metadata."""
    if root.metadata.consolidated_metadata is None:
        return root
    return zarr.open_group(root.store, path=root.path, mode="r" if root.read_only else "r+",
                           zarr_format=3, use_consolidated=False)


def _jsonable(value):
    """Plain JSON types (numpy scalars and arrays, tuples, Paths converted); ConfigError on anything else."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")
    try:
        return json.loads(json.dumps(value, default=default, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"store attrs must be JSON-able: {exc}; pass plain numbers, strings, lists, dicts") from exc


def _array(name: str, value, ndim: int, kinds: str, dtype) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != ndim or a.dtype.kind not in kinds:
        raise ConfigError(f"{name} must be a {ndim}-d array of kind {kinds!r} (numpy dtype.kind), "
                          f"got shape {a.shape} dtype {a.dtype}")
    if a.dtype.kind in "iu" and np.dtype(dtype).kind in "iu" and a.size:
        info = np.iinfo(dtype)
        if a.min() < info.min or a.max() > info.max:
            raise ConfigError(f"{name} values {a.min()}..{a.max()} do not fit {np.dtype(dtype)}")
    return a.astype(dtype, copy=False)


def write_slide(root: zarr.Group, slide_id: str, *, coords, rl2, keep, grid, tissue, attrs: dict,
                rl2_map=None, features=None) -> zarr.Group:
    """Write one slide's group completely, replacing any earlier one; status "done" is written last."""
    key = slide_key(slide_id)
    arrays = {
        "coords": _array("coords", coords, 2, "iu", np.int32),
        "rl2": _array("rl2", rl2, 1, "fiu", np.float32),
        "keep": _array("keep", keep, 1, "b", np.bool_),
        "grid": _array("grid", grid, 2, "iu", np.uint8),
        "tissue": _array("tissue", tissue, 2, "b", np.bool_),
    }
    if rl2_map is not None:
        arrays["rl2_map"] = _array("rl2_map", rl2_map, 3, "f", np.float32)
    if features is not None:
        f = np.asarray(features)
        arrays["features"] = _array("features", f, f.ndim if f.ndim in (2, 4) else 2, "fiu", np.float32)
    n = len(arrays["rl2"])
    if arrays["coords"].shape[1:] != (2,):
        raise ConfigError(f"coords must have shape (N, 2), got {arrays['coords'].shape}")
    for name in ("coords", "keep", "rl2_map", "features"):
        if name in arrays and len(arrays[name]) != n:
            raise ConfigError(f"slide {slide_id}: {name} has {len(arrays[name])} rows but rl2 has {n}; "
                              f"pass one row per tile")
    attrs = _jsonable(attrs)
    root = _live(root)
    if key in root:
        log.info("replacing slide %s in the store (status %s)", key, root[key].attrs.get("status"))
        del root[key]
    group = root.create_group(key, attributes={"status": WRITING})
    for name, a in arrays.items():
        dims = {"grid": ("y", "x"), "tissue": ("y", "x"), "rl2_map": ("tile", "y", "x")}.get(name)
        group.create_array(name, data=a, dimension_names=dims)
    group.update_attributes({**attrs, "status": DONE})
    return group


def slide_done(root: zarr.Group, slide_id: str, fingerprint: str) -> bool:
    """True when the slide's group is complete (status "done") and was written under this fingerprint."""
    group = _live(root).get(slide_key(slide_id))
    if not isinstance(group, zarr.Group):
        return False
    return group.attrs.get("status") == DONE and group.attrs.get("fingerprint") == fingerprint


def read_slide(root: zarr.Group, slide_id: str) -> dict:
    """The slide's arrays (numpy) and its group attrs under "attrs"."""
    key = slide_key(slide_id)
    group = _live(root).get(key)
    if not isinstance(group, zarr.Group):
        raise ConfigError(f"slide {key!r} is not in the store {root.store}; run wsi-qc run on it first "
                          f"(list_slides shows what is there)")
    out = {name: group[name][...] for name in ARRAYS if name in group}
    out["attrs"] = dict(group.attrs)
    return out


def list_slides(root: zarr.Group) -> dict[str, str]:
    """{slide id: status} for every slide group in the store ("writing" = interrupted or in progress)."""
    root = _live(root)
    return {name: group.attrs.get("status", "unknown") for name, group in sorted(root.groups())}


def remove_slide(root: zarr.Group, slide_id: str) -> None:
    """Delete a slide's group (a no-op when it is absent)."""
    root, key = _live(root), slide_key(slide_id)
    if key in root:
        del root[key]


def consolidate(root_path: str | Path) -> zarr.Group:
    """Consolidate the store's metadata into its root zarr.json (call once, at the end of a run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return zarr.consolidate_metadata(str(root_path), zarr_format=3)
