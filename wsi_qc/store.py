"""The zarr (v3) store a run writes: one group per slide, marked done only once it is complete.

Layout::

    qc.zarr/            attrs {"wsi_qc": {"version", "config", "scorer", "threshold", "auc"}}
      <slide_id>/       attrs: source, sha256_head, source_state (identity.file_state: size, mtime, head digest
                               of the slide file when it was read), mpp, tile size/mpp, n_tiles, n_keep,
                               fingerprint, timings, ..., status ("writing" while arrays are written, "done" last)
        coords int32 (N, 2), rl2 float32 (N,), keep bool (N,), grid uint8 (rows, cols) ("y", "x"),
        tissue bool (h, w) ("y", "x"), features float32 (N, D) or (N, g, g, D) (optional),
        rl2_map float32 (N, h, w) ("tile", "y", "x") (optional),
        pass uint8 (N,) ("tile",): the cascade pass that decided each tile, 0 fine, 1 coarse, 2 focus (cascade runs)

Processes may write different slides into one store at once: each slide group is its own directory,
and slide writers never rewrite the root's zarr.json (only open_store with attrs and consolidate do,
from the one process that drives a run, which holds the store's lock: see `locked`).

A kill at any moment leaves nothing that looks done and nothing a rerun trips over: a slide group is
written completely under a hidden temporary name (".<key>.tmp-<pid>") and renamed into place; an old
group is renamed away (".<key>.trash-<pid>") before it is deleted; a new store is created beside its
path and renamed into place. `tidy` removes what a killed writer left (run under the lock).

Each run writes its id into the root's attrs (`run_id`) and its slide writers pass it to `write_slide`, which
refuses to put a group in place once another run has taken the store (StaleRun): a task of a dead driver that
still runs somewhere cannot overwrite what the new run wrote.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from wsi_qc import __version__
from wsi_qc.errors import ConfigError, WSIQCError
from wsi_qc.identity import text_digest

log = logging.getLogger(__name__)

MARKER = "wsi_qc"
DONE = "done"
WRITING = "writing"
ARRAYS = ("coords", "rl2", "keep", "grid", "tissue", "features", "rl2_map", "pass")
REQUIRED = ("coords", "rl2", "keep", "grid", "tissue")
DIMENSIONS = {"grid": ("y", "x"), "tissue": ("y", "x"), "rl2_map": ("tile", "y", "x"), "pass": ("tile",)}
MAX_KEY = 200  # longer ids are cut and hashed: "<key>.geojson", ".<key>.tmp-<pid>" stay under 255 bytes


class StoreLocked(ConfigError):
    """Another run holds the store's lock."""


class StaleRun(WSIQCError):
    """A slide writer of an earlier run found the store taken by another run; its group was not put in place."""


def slide_key(slide_id: str) -> str:
    """Store name of a slide id: characters outside [A-Za-z0-9._-] become '_', leading '__' or '.' become '_';
    ids longer than MAX_KEY are cut and end in 16 hex digits of identity.text_digest of the whole id (the same name
    for every output)."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", str(slide_id))
    if not key or set(key) == {"."} or key == "zarr.json":
        raise ConfigError(f"slide id {slide_id!r} cannot name a slide in the store; rename the slide file")
    key = re.sub(r"^(__+|\.+)", "_", key)  # "__" is reserved by zarr v3, "." names the store's temporary folders
    if len(key) > MAX_KEY:
        key = f"{key[:MAX_KEY - 17]}-{text_digest(str(slide_id), 16)}"
    return key


def lock_path(path: str | Path) -> Path:
    """The lock file of the store at path: a hidden file beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


_HELD: dict[Path, tuple[int, int]] = {}  # lock file -> (thread holding it, nesting depth), in this process


@contextmanager
def locked(path: str | Path, wait: float = 0.0) -> Iterator[Path]:
    """Hold the store's exclusive lock (flock on its lock file, released by the kernel if this process dies).

    The lock file is beside the resolved store path, so a symbolic link to a store shares the store's lock. Waits
    up to `wait` seconds for another holder, then raises StoreLocked naming its pid and host. The thread that
    holds the lock may take it again (a CLI run holds it around run_slides and the report).
    """
    lock = lock_path(Path(path).resolve())
    thread, depth = _HELD.get(lock, (None, 0))
    if thread == threading.get_ident():
        _HELD[lock] = (thread, depth + 1)
        try:
            yield lock
        finally:
            _HELD[lock] = (thread, depth)
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLocked(_locked_message(path, lock, wait)) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        _HELD[lock] = (threading.get_ident(), 1)
        try:
            yield lock
        finally:
            del _HELD[lock]
    finally:
        os.close(fd)


def _locked_message(path, lock: Path, wait: float) -> str:
    try:
        holder = json.loads(lock.read_text())
        who = f"pid {holder['pid']} on host {holder['host']}, since {time.ctime(holder['since'])}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that has not written its pid yet"
    return (f"store {path} is in use by another wsi-qc run ({who}; lock file {lock}, waited {wait:g} s); "
            f"wait for that run to finish, set run.lock_wait to wait for it, or choose another --out")


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
    if not path.exists() or (path.is_dir() and all(_is_partial(p) for p in path.iterdir())):
        if not create:
            raise ConfigError(f"no wsi-qc store at {path}; run `wsi-qc run --out {path}` first or fix the path")
        _create(path, {"version": __version__, **_jsonable(attrs or {})})
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


_LEFTOVER = re.compile(r"^\..+\.(tmp|trash)-\d+$")  # names of temporary and deleted groups and stores


def _is_partial(p: Path) -> bool:
    """A file zarr was writing when its process died (zarr.json is written as zarr.<hex>.partial, then renamed)."""
    return p.is_file() and p.name.endswith(".partial")


def _create(path: Path, marker: dict) -> None:
    """A new store, built beside path and renamed onto it (absent or empty), so a kill leaves no half store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    zarr.open_group(tmp, mode="w-", zarr_format=3, attributes={MARKER: marker})
    if path.is_dir():
        for p in path.iterdir():  # leftovers of a store creation killed before this version
            p.unlink(missing_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process created it just now
        shutil.rmtree(tmp, ignore_errors=True)


def tidy(path: str | Path) -> list[Path]:
    """Remove what killed writers left in and beside the store (temporary groups, deleted groups, *.partial).

    Only safe while no other process writes the store: call it under `locked`. Returns what was removed.
    """
    path = Path(path)
    found = [p for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*") if _LEFTOVER.match(p.name)]
    if (path / "zarr.json").is_file():  # inside a store only, never in a folder that is not one
        found += [p for p in path.iterdir() if _LEFTOVER.match(p.name) or _is_partial(p)]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if found:
        log.info("removed %d leftovers of interrupted writes in %s", len(found), path)
    return found


def _folder(root: zarr.Group) -> Path:
    """The directory of a group in a local store."""
    base = getattr(root.store, "root", None)
    if base is None:
        raise ConfigError(f"the store {root.store} is not a local folder; open the store with open_store(path)")
    return Path(base) / root.path


def _discard(folder: Path) -> None:
    """Delete a group's folder: renamed away first, so a kill never leaves a half-deleted group under its name."""
    if not folder.exists():
        return
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash)


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
                features=None, rl2_map=None, passes=None, run_id: str | None = None) -> zarr.Group:
    """Write one slide's group completely under a temporary name, mark it done, rename it into place
    (replacing any earlier one). With `run_id`, only while the store's root names that run (else StaleRun)."""
    key = slide_key(slide_id)
    arrays = {
        "coords": _array("coords", coords, 2, "iu", np.int32),
        "rl2": _array("rl2", rl2, 1, "fiu", np.float32),
        "keep": _array("keep", keep, 1, "b", np.bool_),
        "grid": _array("grid", grid, 2, "iu", np.uint8),
        "tissue": _array("tissue", tissue, 2, "b", np.bool_),
    }
    if features is not None:
        f = np.asarray(features)  # (N, D) pooled or (N, g, g, D) local
        arrays["features"] = _array("features", f, 4 if f.ndim == 4 else 2, "fiu", np.float32)
    if rl2_map is not None:
        arrays["rl2_map"] = _array("rl2_map", rl2_map, 3, "fiu", np.float32)
    if passes is not None:  # the cascade pass that decided each tile (wsi_qc.cascade.PASSES)
        arrays["pass"] = _array("pass", passes, 1, "iu", np.uint8)
    n = len(arrays["rl2"])
    if arrays["coords"].shape[1:] != (2,):
        raise ConfigError(f"coords must have shape (N, 2), got {arrays['coords'].shape}")
    for name in ("coords", "keep", "features", "rl2_map", "pass"):
        if name in arrays and len(arrays[name]) != n:
            raise ConfigError(f"slide {slide_id}: {name} has {len(arrays[name])} rows but rl2 has {n}; "
                              f"pass one row per tile")
    attrs = _jsonable(attrs)
    root = _live(root)
    folder = _folder(root)
    tmp = folder / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(tmp, mode="w-", zarr_format=3, attributes={"status": WRITING})
    for name, a in arrays.items():
        group.create_array(name, data=a, dimension_names=DIMENSIONS.get(name))
    group.update_attributes({**attrs, "status": DONE})
    if run_id is not None and _run_of(folder) != run_id:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StaleRun(f"slide {slide_id}: the store {folder} is now written by run {_run_of(folder)}, not by this "
                       f"writer's run {run_id}; its result was dropped")
    if (folder / key).exists():
        log.info("replacing slide %s in the store", key)
        _discard(folder / key)
    os.rename(tmp, folder / key)
    return root[key]


def _run_of(folder: Path) -> str | None:
    """The run id in the store's root attrs, read from disk (another process may have changed it)."""
    try:
        return json.loads((folder / "zarr.json").read_text())["attributes"][MARKER].get("run_id")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def slide_done(root: zarr.Group, slide_id: str, fingerprint: str, arrays: tuple[str, ...] = (),
               source_state: dict | None = None) -> bool:
    """True when the slide's group is complete (status "done", every required array and `arrays` present with
    one row per tile), was written under this fingerprint and, given `source_state` (identity.file_state of the
    slide file now), from a file of that size, mtime and head digest (a group of an older store, without a
    source_state, from a file of that head digest and size)."""
    group = _live(root).get(slide_key(slide_id))
    if not isinstance(group, zarr.Group):
        return False
    if group.attrs.get("status") != DONE or group.attrs.get("fingerprint") != fingerprint:
        return False
    if source_state is not None and not _same_source(dict(group.attrs), source_state):
        log.info("slide %s: its file changed since it was stored (size, mtime or content); redoing it", slide_id)
        return False
    try:
        shapes = {name: group[name].shape for name in (*REQUIRED, *arrays)}
        shapes.update({name: group[name].shape for name in ARRAYS if name not in shapes and name in group})
    except (KeyError, ValueError, OSError):
        return False
    n = group.attrs.get("n_tiles", shapes["rl2"][0])
    per_tile = [shape[0] for name, shape in shapes.items() if name not in ("grid", "tissue")]
    return (shapes["coords"] == (n, 2) and all(rows == n for rows in per_tile)
            and len(shapes["grid"]) == 2 and len(shapes["tissue"]) == 2)


def _same_source(attrs: dict, state: dict) -> bool:
    saved = attrs.get("source_state")
    if isinstance(saved, dict):
        return saved == state
    return attrs.get("sha256_head") == state["head"]


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
    with warnings.catch_warnings():  # hidden leftovers of a killed writer are not slides (tidy removes them)
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        groups = sorted(root.groups())
    return {name: group.attrs.get("status", "unknown") for name, group in groups if not name.startswith(".")}


def remove_slide(root: zarr.Group, slide_id: str) -> None:
    """Delete a slide's group (a no-op when it is absent)."""
    _discard(_folder(_live(root)) / slide_key(slide_id))


def consolidate(root_path: str | Path) -> zarr.Group:
    """Consolidate the store's metadata into its root zarr.json (call once, at the end of a run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return zarr.consolidate_metadata(str(root_path), zarr_format=3)
