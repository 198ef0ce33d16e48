"""QC of many slides: one slide = one unit of work, in local worker processes or on a Dask cluster.

Each slide is tiled, encoded, scored and thresholded, then written to the store (status "done" last)
with its overlay PNG and GeoJSON. A slide that fails is recorded and the batch goes on; a rerun skips
slides already done with the same fingerprint from the same file (identity.file_state: size, mtime and the digest
of its first MiB), and redoes a slide whose file was replaced. Tiles are read by a background thread (and, outside
Dask, by `tiles.workers` reader processes) while the encoder runs, so reading hides behind encoding.
"""

from __future__ import annotations

import csv
import json
import logging
import resource
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from wsi_qc import __version__
from wsi_qc.config import explicit_keys, fingerprint, load_config, with_explicit
from wsi_qc.cpu_runtime import cache_dir
from wsi_qc.errors import ConfigError, ScoreError, SlideError
from wsi_qc.identity import file_state
from wsi_qc.report import overlay_png, thumbnail_png, write_geojson, write_run_report  # noqa: F401 (re-exported)
from wsi_qc.cascade import PASSES
from wsi_qc.scorer import Scorer, slide_scores
from wsi_qc.slide import Slide, slide_files
from wsi_qc.store import consolidate, locked, open_store, read_slide, slide_done, slide_key, tidy, write_slide
from wsi_qc.threshold import Threshold
from wsi_qc.tiles import grid_image
from wsi_qc.workers import run_each

log = logging.getLogger(__name__)

# Config keys that do not change a slide's stored result (None: the whole section). Every other key is in the
# run fingerprint, so a rerun redoes slides written under other values (new keys are in it by default). The
# `threshold` section is for `wsi-qc calibrate`: a run applies the calibration file's threshold, which is in
# the fingerprint itself.
NOT_IN_RESULTS: dict[str, tuple[str, ...] | None] = {
    "threshold": None,
    "tiles": ("workers", "batch_size"),
    "run": ("workers", "scheduler", "pattern", "lock_wait"),
}


def collect_slides(inputs: list[str | Path], pattern: str) -> list[Path]:
    """Slide files from files, folders (recursive, comma-separated globs) and CSV manifests (column `path`); a file
    given twice (e.g. by name and inside a given folder) is listed once, two files of one slide id are refused."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = slide_files(item, pattern)  # a dangling link or a link loop fails per slide, in the report
            if not found:
                log.warning("%s holds no slides matching %s", item, pattern)
            out.extend(found)
        elif item.suffix.lower() == ".csv":
            with item.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows and "path" not in rows[0]:
                raise ConfigError(f"manifest {item} has no 'path' column (columns: {', '.join(rows[0])}); "
                                  f"add a column 'path' with one slide file per row")
            out.extend((item.parent / r["path"]).resolve() if not Path(r["path"]).is_absolute() else Path(r["path"])
                       for r in rows)
        else:
            out.append(item)  # missing or bad files fail per slide, with the error in the report
    seen: dict[str, Path] = {}
    unique: list[Path] = []
    for path in out:
        try:
            key = slide_key(path.stem)
        except ConfigError:  # fails per slide, naming the file
            unique.append(path)
            continue
        if key in seen:
            if _same_file(seen[key], path):  # given twice (a file and its folder): processed once
                continue
            raise ConfigError(f"two slides share the id {key!r}: {seen[key]} and {path}; rename one of them")
        seen[key] = path
        unique.append(path)
    return unique


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # missing or a dangling link: the same when the paths are
        return a.absolute() == b.absolute()


@lru_cache(maxsize=2)
def _load(scorer_path: str, calibration_path: str, config_json: str, explicit: tuple | None) -> tuple[Scorer, Threshold]:
    config = json.loads(config_json)
    scorer = Scorer.load(scorer_path, config if explicit is None else with_explicit(config, explicit))
    return scorer, Threshold.load(calibration_path, scorer.fingerprint, scorer.config["score"])


def check_inputs(scorer_path: str | Path, calibration_path: str | Path, config: dict) -> tuple[Scorer, Threshold]:
    """Load scorer and calibration (cached per process, key: both paths, the config as JSON and the keys it sets);
    run_slides calls it before any slide."""
    explicit = explicit_keys(config)
    return _load(str(Path(scorer_path)), str(Path(calibration_path)), json.dumps(config, sort_keys=True),
                 None if explicit is None else tuple(sorted(explicit)))


def result_config(config: dict) -> dict:
    """The part of the config that changes stored results (all but NOT_IN_RESULTS)."""
    out = {}
    for section, values in config.items():
        skip = NOT_IN_RESULTS.get(section, ())
        if skip is not None:
            out[section] = {k: v for k, v in values.items() if k not in skip} if isinstance(values, dict) else values
    return out


def run_fingerprint(config: dict, scorer: Scorer, threshold: Threshold) -> str:
    """Fingerprint of what a slide's stored result depends on: result config, scorer, threshold."""
    return fingerprint({"config": result_config(config), "scorer": scorer.fingerprint,
                        "threshold": float(threshold.threshold_)})


MOST_DISCARDED = 0.5  # share of a slide's tiles above the threshold from which its row carries a warning


def discard_warning(rl2: np.ndarray, threshold: float) -> str:
    """What to check when most of a slide's tiles score above the threshold, or "" when they do not."""
    above = float(np.mean(np.asarray(rl2) > threshold)) if len(rl2) else 0.0
    if above <= MOST_DISCARDED:
        return ""
    return (f"{100 * above:.0f} % of its tiles score above the threshold: a slide-wide problem (focus, stain, scan) "
            f"or tissue the reference lacks (another organ, stain or scanner); check its overlay, and if its tissue "
            f"is good, refit the scorer with such slides in the reference (wsi-qc fit-reference)")


TIMING_KEYS = ("tile_s", "encode_s", "score_s", "coarse_s", "focus_s", "fine_s", "write_s", "report_s")


def _summary(slide_id: str, path: Path, attrs: dict, rl2: np.ndarray | None, status: str, seconds: float) -> dict:
    row = {"slide": slide_id, "path": str(path), "status": status, "error": "", "warning": "", "traceback": "",
           "n_tiles": attrs.get("n_tiles", 0), "n_keep": attrs.get("n_keep", 0), "kept_pct": np.nan,
           "rl2_median": np.nan, "rl2_p95": np.nan, "seconds": round(seconds, 2)}
    if row["n_tiles"]:
        row["kept_pct"] = round(100.0 * row["n_keep"] / row["n_tiles"], 2)
    if rl2 is not None and len(rl2):
        row["rl2_median"] = float(np.median(rl2))
        row["rl2_p95"] = float(np.percentile(rl2, 95))
        if "threshold" in attrs:
            row["warning"] = discard_warning(rl2, attrs["threshold"])
    passes = attrs.get("passes", {})
    if any(v for k, v in passes.items() if k != "fine"):  # a cascade run: tiles decided by each pass
        row["passes"] = ", ".join(f"{k} {v}" for k, v in passes.items() if v)
    timings = attrs.get("timings", {})
    row.update({k: timings.get(k, np.nan) for k in TIMING_KEYS})
    row["tiles_per_s"] = timings.get("tiles_per_s", np.nan)
    row["peak_rss_mb"] = timings.get("peak_rss_mb", np.nan)
    return row


def _reset_peak_rss() -> None:
    """Restart this process's peak-RSS count (Linux), so each slide reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def qc_slide(path: str | Path, scorer_path: str | Path, calibration_path: str | Path, config: dict,
             out: str | Path, report_dir: str | Path, force: bool = False, run_id: str | None = None) -> dict:
    """QC one slide into the store; returns its report row (status done / skipped / failed, never raises).
    With `run_id`, the slide is written only while the store belongs to that run (store.StaleRun).

    Encoding and scoring run with run.threads torch and BLAS threads whatever the mode, so the scores (and
    the masks) are the same with --workers, Dask or any OMP_NUM_THREADS.
    """
    path, start = Path(path), time.perf_counter()
    slide_id = path.stem or path.name
    try:
        slide_id = _slide_id(path)
        scorer, threshold = check_inputs(scorer_path, calibration_path, config)
        fp = run_fingerprint(config, scorer, threshold)
        root = open_store(out)
        stored = ("features",) if config["run"]["save_features"] else ()
        try:  # before reading: a file replaced while it is read is redone next time
            source_state = file_state(path)
        except OSError:  # opening it below fails with the slide's own error
            source_state = None
        if not force and source_state is not None and slide_done(root, slide_id, fp, arrays=stored,
                                                                 source_state=source_state):
            found = read_slide(root, slide_id)
            return _summary(slide_id, path, found["attrs"], found["rl2"], "skipped", time.perf_counter() - start)
        _reset_peak_rss()
        config = scorer.config  # the scorer's own encoder and tiles, the run's other sections
        with Slide.from_config(path, config) as slide, fixed_threads(config["run"]["threads"]):
            found = slide_scores(slide, scorer, config, features=config["run"]["save_features"])
            thumbnail, thumb_mpp, tissue, tiles, timings = (found.thumbnail, found.thumbnail_mpp, found.tissue,
                                                             found.tiles, dict(found.timings))
            scores = found.scores
            rl2, rl2_map = scores["rl2"].astype(np.float32), scores["rl2_map"]
            _check_scores(rl2, slide_id, scorer_path)
            keep = threshold.keep(rl2) & ~scores["discard"]
            grid = grid_image(tiles, np.where(keep, 1, 2).astype(np.uint8))
            attrs = {"source": str(path.resolve()), "sha256_head": source_state["head"],
                     "source_state": source_state, "mpp": slide.mpp,
                     "tile_mpp": tiles.mpp, "tile_size": tiles.size, "thumbnail_mpp": thumb_mpp,
                     "n_tiles": int(len(rl2)), "n_keep": int(keep.sum()), "threshold": float(threshold.threshold_),
                     "score_kind": scorer.score_kind, "scorer_kind": scorer.kind, "fingerprint": fp,
                     "passes": {name: int((scores["pass"] == i).sum()) for i, name in enumerate(PASSES)},
                     "wsi_qc_version": __version__}
            t0 = time.perf_counter()
            if config["run"]["overlays"]:
                report_dir = Path(report_dir)
                size0 = tiles.size * tiles.mpp / slide.mpp
                overlay_png(report_dir / "overlays" / f"{slide_id}.png", thumbnail, thumb_mpp, slide.mpp,
                            tiles.coords, size0, keep, rl2, float(threshold.threshold_), slide_id=slide_id,
                            rl2_map=rl2_map)
                thumbnail_png(report_dir / "thumbnails" / f"{slide_id}.png", thumbnail)
                write_geojson(report_dir / "geojson" / f"{slide_id}.geojson", tiles.coords, size0, keep, slide_id)
            timings["report_s"] = round(time.perf_counter() - t0, 3)
            timings["peak_rss_mb"] = _peak_rss_mb()
            timings["total_s"] = round(time.perf_counter() - start, 3)
            attrs["timings"] = timings
            t0 = time.perf_counter()
            write_slide(root, slide_id, coords=tiles.coords, rl2=rl2, keep=keep, grid=grid, tissue=tissue,
                        attrs=attrs, rl2_map=rl2_map, passes=scores["pass"] if scorer.cascade_on else None,
                        features=scores.get("features"), run_id=run_id)
            # known only after the write: in the report row, not in the stored attrs
            timings["write_s"] = round(time.perf_counter() - t0, 3)
            timings["peak_rss_mb"] = _peak_rss_mb()
        row = _summary(slide_id, path, attrs, rl2, "done", time.perf_counter() - start)
        if row["warning"]:
            log.warning("slide %s: %s", slide_id, row["warning"])
        return row
    except Exception as exc:  # one slide's failure never stops the batch
        log.warning("slide %s failed: %s", path, exc)
        row = _summary(slide_id, path, {}, None, "failed", time.perf_counter() - start)
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
        return row


def _check_scores(rl2: np.ndarray, slide_id: str, scorer_path) -> None:
    """Refuse a slide whose tiles scored NaN or inf: never stored as done with 0 % kept."""
    bad = int((~np.isfinite(rl2)).sum())
    if bad:
        raise ScoreError(f"slide {slide_id}: {bad} of {len(rl2)} tiles scored NaN or inf with scorer {scorer_path}; "
                         f"its networks give non-finite numbers (a damaged export in {cache_dir()}: delete that folder "
                         f"and rerun; or set encoder.cpu_runtime and flow.cpu_runtime to torch; or refit the scorer)")


def _slide_id(path: Path) -> str:
    """The slide's id in the store, or a SlideError naming the file whose name cannot give one."""
    try:
        return slide_key(path.stem)
    except ConfigError as exc:
        raise SlideError(f"{path}: the file name gives the slide id {path.stem!r}, which cannot name a slide in "
                         f"the store; rename the file") from exc


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run with n torch intra-op threads and n BLAS threads, restoring the previous counts afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        with threadpool_limits(int(n)):
            yield
    finally:
        torch.set_num_threads(before)


def run_slides(paths: list[Path], scorer_path: str | Path, calibration_path: str | Path, config: dict,
               out: str | Path, report_dir: str | Path, force: bool = False) -> list[dict]:
    """QC every slide (local processes, or Dask when run.scheduler is set); returns one report row per slide.

    The scorer and calibration are loaded first: a bad one raises ConfigError before any slide is touched.
    """
    run = config["run"]
    scorer, threshold = check_inputs(scorer_path, calibration_path, config)
    if config["threshold"] != load_config()["threshold"]:
        log.warning("the config's threshold section is not used by a run: the calibration file %s holds the "
                    "threshold (%.6g); recalibrate with wsi-qc calibrate to change it", calibration_path,
                    threshold.threshold_)
    with locked(out, wait=float(run["lock_wait"])):
        run_id = uuid.uuid4().hex  # fences out slide writers of earlier runs (store.write_slide)
        open_store(out, attrs={"version": __version__, "config": config, "scorer": scorer.meta,
                               "threshold": threshold.to_dict(), "auc": threshold.auc_, "run_id": run_id})
        tidy(out)
        rows = _run_all(paths, (str(scorer_path), str(calibration_path)), config, out, report_dir, force, run_id)
        tidy(out)
        consolidate(out)
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(rows, key=lambda r: order.get(r["path"], 0))


def _run_all(paths: list[Path], args: tuple[str, str], config: dict, out, report_dir, force: bool,
             run_id: str) -> list[dict]:
    """One report row per slide, from local processes, Dask or this process (run.workers, run.scheduler; see
    wsi_qc.workers: a worker that dies fails only its slide)."""
    # qc_slide is looked up here, at call time (a test may replace it)
    args = (*map(Path, args), config, Path(out), Path(report_dir), force, run_id)
    return run_each(qc_slide, paths, args, config, _died)


def _died(path: str, why: str) -> dict:
    """The report row of a slide whose worker died while processing it."""
    log.warning("slide %s failed: %s", path, why)
    row = _summary(_safe_id(Path(path)), Path(path), {}, None, "failed", 0.0)
    row["error"] = f"WorkerDied: {why}"
    return row


def _safe_id(path: Path) -> str:
    try:
        return _slide_id(path)
    except SlideError:
        return path.stem or path.name


def export_tiles(out: str | Path, export_dir: str | Path, slides: Iterable[str] | None = None) -> dict[str, int]:
    """Write the kept tiles of done slides as PNGs, read at the tile mpp: <export_dir>/<slide>/<slide>_x<X>_y<Y>.png.

    Slides are reopened from their stored source path with their stored mpp; files already there are kept
    (a resumed run exports only what is new). Returns {slide: number of kept tiles}.
    """
    root, export_dir = open_store(out, create=False), Path(export_dir)
    wanted = None if slides is None else {slide_key(s) for s in slides}
    counts: dict[str, int] = {}
    for slide_id, group in sorted(root.groups()):
        if group.attrs.get("status") != "done" or (wanted is not None and slide_id not in wanted):
            continue
        attrs = dict(group.attrs)
        coords = group["coords"][...][group["keep"][...]]
        size, tile_mpp = int(attrs["tile_size"]), float(attrs["tile_mpp"])
        folder = export_dir / slide_id
        folder.mkdir(parents=True, exist_ok=True)
        with Slide(attrs["source"], mpp=attrs["mpp"]) as slide:
            for x, y in tqdm(coords, desc=f"export {slide_id}", unit="tile", leave=False, disable=None):
                target = folder / f"{slide_id}_x{int(x)}_y{int(y)}.png"
                if not target.exists():
                    image = slide.read_region((int(x), int(y)), (size, size), tile_mpp)
                    tmp = target.with_name(f".{target.name}.partial")
                    Image.fromarray(image).save(tmp, format="PNG")
                    tmp.replace(target)
        counts[slide_id] = len(coords)
    return counts
