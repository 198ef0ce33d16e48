"""Scorer: a frozen encoder plus a flow fitted on reference features, saved and loaded as one directory.

Two kinds, told apart by the encoder's `grid`:

- pooled: one feature vector per tile, one flow over them; the tile's score is its own rl2 (or nll);
- local: one vector per position of a g x g grid over the tile (stage maps of the encoder), one flow over
  the positions of every reference tile (CFlow-AD / FastFlow style, without positional conditioning: tissue
  has no preferred orientation); each position gets its rl2, the map is kept (`rl2_map`), and the tile's
  score aggregates it (`score.aggregate`: max, mean or the mean of the top K %).

`rl2` (default) or `nll` is the score (`score.kind`); both come from the same latent (see wsi_qc.rl2).
A saved scorer carries its whole config (encoder, tiles, flow, score) and the scores of its calibration tiles
(whole reference slides held out of fitting and of early stopping, for the label-free threshold), so
`Scorer.load(path)` needs nothing else. Fitted with `cascade.enabled`,
it also carries the coarse pass of the cascade (wsi_qc.cascade) in its folder `coarse/`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from wsi_qc import __version__
from wsi_qc.cascade import PASSES, coarse_config, focus_values, in_range, settled, to_scale, upsample
from wsi_qc.config import explicit_keys, load_config, with_explicit
from wsi_qc.encoder import Encoder, stats_names
from wsi_qc.errors import ConfigError
from wsi_qc.flow import META_FILE, Flow, held_out
from wsi_qc.rl2 import tile_rl2
from wsi_qc.slide import Slide, slide_files
from wsi_qc.tiles import Tiles, iter_tile_batches, prefetch, tile_slide

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # for malloc_trim (_trim_heap)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ONE_PAGE_SUFFIXES = (".tif", ".tiff")  # tile images only when PIL reads them as one page (else slides)
SCORE_KINDS = ("rl2", "nll")
SCORER_FORMAT = 2  # bump when the scorer folder changes incompatibly
TRIM_EVERY = 8  # batches of a slide between returns of freed memory to the system (_trim_heap)
COARSE_DIR = "coarse"  # the cascade's coarse pass, a scorer folder inside the scorer's
# The config a scorer carries: these sections; all but their run-time keys are bound to it.
SCORER_SECTIONS = ("encoder", "tiles", "flow", "score")
RUNTIME_KEYS = {"encoder": ("device", "compile", "channels_last", "cpu_runtime"),
                "tiles": ("workers", "batch_size", "overlap", "min_tissue"),
                "flow": ("device", "cpu_runtime"), "score": ("kind", "aggregate")}


def aggregate(maps: np.ndarray, how: str) -> np.ndarray:
    """Tile scores (N,) of per-position score maps (N, h, w): "max", "mean" or "topK" (mean of the top K %)."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(len(maps), int(np.prod(maps.shape[1:])))
    if how == "max":
        return flat.max(1, initial=-np.inf)
    if how == "mean":
        return flat.mean(1)
    match = re.fullmatch(r"top(\d+)", str(how))
    if not match or not 0 < int(match[1]) <= 100:
        raise ConfigError(f"score.aggregate={how!r} is unknown; use max, mean or topK (K = 1..100, e.g. top5)")
    k = max(1, int(round(flat.shape[1] * int(match[1]) / 100)))
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(1)


def holdout_groups(groups, n: int) -> np.ndarray:
    """The unit of each of n reference tiles for the held-out split: its group (slide) when there are at least 3
    groups, else the tile itself."""
    if groups is not None and len(np.unique(groups)) >= 3:
        return np.unique(np.asarray(groups), return_inverse=True)[1]
    return np.arange(n)


def encoder_from_config(config: dict) -> Encoder:
    """The frozen encoder the config's `encoder` section describes."""
    e = config["encoder"]
    return Encoder(e["name"], weights=e["weights"], pooling=e["pooling"], levels=e["levels"], device=e["device"],
                   precision=e["precision"], channels_last=e["channels_last"], compile=e["compile"],
                   model_kwargs=e["model_kwargs"], image_stats=e["image_stats"], grid=e.get("grid"),
                   input_size=e.get("input_size"), cpu_runtime=e["cpu_runtime"])


def flow_from_config(config: dict) -> Flow:
    """An unfitted flow with the config's `flow` section as parameters."""
    return Flow(**config["flow"])


def is_tile_image(path: Path) -> bool:
    """A PNG, JPEG or BMP file, or a TIFF that PIL reads as one page (a pyramidal or huge TIFF is a slide)."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return False
    if suffix not in ONE_PAGE_SUFFIXES:
        return True
    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) == 1
    except (OSError, Image.DecompressionBombError):  # unreadable or too large for PIL: not a tile
        return False


def _mixed(folder: Path, slides: list[Path], images: list[Path]) -> ConfigError:
    return ConfigError(f"{folder} holds both slide files ({len(slides)}, e.g. {slides[0]}) and tile images "
                       f"({len(images)}, e.g. {images[0]}); a folder is either slides or tiles: move one kind into "
                       f"a folder of its own")


def folder_contents(folder: Path, pattern: str) -> tuple[list[Path], list[Path]]:
    """(slide files (run.pattern globs), tile images) under a folder, recursive, sorted; a TIFF that matches the
    pattern and is a tile image (is_tile_image) counts as a tile image."""
    candidates = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = [p for p in candidates if is_tile_image(p)]
    tiles = set(images)
    return [p for p in slide_files(folder, pattern) if p not in tiles], images


def image_paths(folder: str | Path, pattern: str | None = None) -> list[Path]:
    """Tile image files under a folder (recursive, sorted); a folder that also holds slide files (run.pattern, the
    default config's when None, and TIFFs PIL does not read as one page) is refused, naming both."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of tile images; pass a directory of PNG/JPEG tiles")
    slides, paths = folder_contents(folder, pattern or load_config()["run"]["pattern"])
    tiles = set(paths)
    slides = sorted(set(slides) | {p for p in folder.rglob("*") if p.suffix.lower() in ONE_PAGE_SUFFIXES
                                   and p not in tiles})
    if not paths:
        raise ConfigError(f"{folder} holds no tile images ({', '.join(IMAGE_SUFFIXES)}); point at a folder of tiles")
    if slides:
        raise _mixed(folder, sorted(slides), paths)
    return paths


def read_tile_images(paths: Iterable[str | Path], size: int) -> np.ndarray:
    """Tile images as uint8 (N, size, size, 3); images of another size are resized."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                out.append(np.asarray(im))
        except Image.DecompressionBombError as exc:
            raise ConfigError(f"{path} is too large for a tile image ({exc}); it looks like a slide: pass it as a "
                              f"slide, or cut it into tiles") from exc
        except OSError as exc:
            raise ConfigError(f"{path} is not a readable image ({exc}); remove it or replace it") from exc
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(index, images) batches of an in-memory image array."""
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        yield np.arange(start, stop), images[start:stop]


def encode(encoder: Encoder, batch_iter: Iterable[tuple[np.ndarray, np.ndarray]], n: int,
           desc: str = "tiles") -> np.ndarray:
    """Features (n, D) from an iterator of (index, uint8 images) batches."""
    grid = getattr(encoder, "grid", None)
    features = np.zeros((n, encoder.dim) if grid is None else (n, grid, grid, encoder.dim), np.float32)
    with tqdm(total=n, desc=desc, unit="tile", leave=False, disable=None) as bar:
        for index, images in batch_iter:
            features[index] = encoder(images)
            bar.update(len(index))
    return features


@dataclass(frozen=True, eq=False)
class SlideFeatures:
    """One slide read for scoring: thumbnail, tissue mask, tiles, their features and the seconds each step took."""

    thumbnail: np.ndarray
    thumbnail_mpp: float
    tissue: np.ndarray
    tiles: Tiles
    features: np.ndarray
    timings: dict


def slide_features(slide: Slide, encoder: Encoder, config: dict, sample: int | None = None) -> SlideFeatures:
    """Tissue, tiles and features of one opened slide: the one path from a slide to features.

    Tiles are read ahead by a background thread (and by `tiles.workers` reader processes) while the encoder runs.
    `sample`: only this many of the slide's tiles, drawn at random (seeded by flow.seed and the slide id), in order.
    """
    t0 = time.perf_counter()
    thumbnail, thumbnail_mpp, tissue, tiles = tile_slide(slide, config)
    if sample is not None and len(tiles) > sample:
        rng = np.random.default_rng([config["flow"]["seed"], *slide.id.encode()])
        pick = np.sort(rng.permutation(len(tiles))[:sample])
        tiles = replace(tiles, coords=tiles.coords[pick], grid_index=tiles.grid_index[pick],
                        tissue_fraction=tiles.tissue_fraction[pick])
    t1 = time.perf_counter()
    t = config["tiles"]
    it = prefetch(iter_tile_batches(slide, tiles, batch_size=t["batch_size"], workers=t["workers"]))
    features = encode(encoder, it, len(tiles.coords), desc=slide.id)
    t2 = time.perf_counter()
    timings = {"tile_s": round(t1 - t0, 3), "encode_s": round(t2 - t1, 3),
               "tiles_per_s": round(len(tiles.coords) / max(t2 - t1, 1e-9), 2)}
    return SlideFeatures(thumbnail, thumbnail_mpp, tissue, tiles, features, timings)


@dataclass(frozen=True, eq=False)
class SlideScores:
    """One slide scored: thumbnail, tissue mask, tiles, their scores (see Scorer.score_images) and the seconds of
    each step and pass."""

    thumbnail: np.ndarray
    thumbnail_mpp: float
    tissue: np.ndarray
    tiles: Tiles
    scores: dict
    timings: dict


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). Batches leave freed
    buffers of many sizes resident: without this, a 60k x 45k px slide's peak memory grew by 500 MiB in its run."""
    trim = getattr(_LIBC, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def slide_scores(slide: Slide, scorer: "Scorer", config: dict, features: bool = False) -> SlideScores:
    """Tissue, tiles and scores of one opened slide, batch by batch (the cascade's passes run per batch);
    `features`: also keep the full-resolution features of every tile (single pass only)."""
    t0 = time.perf_counter()
    thumbnail, thumbnail_mpp, tissue, tiles = tile_slide(slide, config)
    t1 = time.perf_counter()
    t = config["tiles"]
    timings: dict = {"tile_s": round(t1 - t0, 3)}
    parts = []
    it = prefetch(iter_tile_batches(slide, tiles, batch_size=t["batch_size"], workers=t["workers"]))
    with tqdm(total=len(tiles.coords), desc=slide.id, unit="tile", leave=False, disable=None) as bar:
        for i, (_, images) in enumerate(it):
            parts.append(scorer.score_images(images, timings, features=features))
            bar.update(len(images))
            if i % TRIM_EVERY == TRIM_EVERY - 1:
                _trim_heap()
    _trim_heap()  # before the overlays and the store
    t2 = time.perf_counter()
    n = len(tiles.coords)
    parts = parts or [scorer.score_images(np.zeros((0, t["size"], t["size"], 3), np.uint8), features=features)]
    scores = {k: None if v is None else np.concatenate([p[k] for p in parts]) for k, v in parts[0].items()}
    timings = {k: round(v, 3) for k, v in timings.items()}
    timings.update(score_loop_s=round(t2 - t1, 3), tiles_per_s=round(n / max(t2 - t1, 1e-9), 2))
    return SlideScores(thumbnail, thumbnail_mpp, tissue, tiles, scores, timings)


@contextmanager
def _timed(timings: dict | None, key: str):
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _slides_in(folder: Path, pattern: str) -> list[Path]:
    """Slide files of a folder (run.pattern globs, recursive), or [] for a folder of tile images; a folder that
    holds both is refused, naming both."""
    slides, images = folder_contents(folder, pattern)
    if slides and images:
        raise _mixed(folder, slides, images)
    return slides


def reference_features(inputs: Iterable[str | Path], encoder: Encoder, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(features, group of each tile) of slides and folders; the group is the slide or tile folder.

    A folder of tile images (is_tile_image) is a folder of tiles; one of slide files (run.pattern) a folder of
    slides; one holding both is refused.
    """
    sources: list[tuple[str, Path]] = []
    for item in map(Path, inputs):
        slides = _slides_in(item, config["run"]["pattern"]) if item.is_dir() else [item]
        sources += [("slide", p) for p in slides] if slides else [("tiles", item)]
    if not sources:
        raise ConfigError("no reference inputs given; pass slides or folders of known-good tiles")
    for kind, path in sources:  # every slide opens (file, format, mpp) before any is encoded
        if kind == "slide":
            Slide.from_config(path, config).close()
    parts = []
    for kind, path in sources:
        if kind == "tiles":
            parts.append(folder_features(path, encoder, config)[1])
            continue
        with Slide.from_config(path, config) as slide:
            parts.append(slide_features(slide, encoder, config).features)
    return np.concatenate(parts), np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])


def folder_features(folder: str | Path, encoder: Encoder, config: dict) -> tuple[list[Path], np.ndarray]:
    """(paths, features) of a folder of tile images."""
    paths = image_paths(folder, config["run"]["pattern"])
    images = read_tile_images(paths, config["tiles"]["size"])
    return paths, encode(encoder, batches(images, config["tiles"]["batch_size"]), len(images), desc=Path(folder).name)


def _merge_config(saved: dict, config: dict, defaults: dict, path: Path) -> dict:
    """The config a loaded scorer runs with: its own sections (SCORER_SECTIONS), where `config` may change the
    run-time keys. Set means set explicitly (a Config from load_config knows which keys its files and overrides
    set, even to the default); for a plain dict, values equal to the defaults count as unset. A bound key set to
    another value than the scorer's is refused."""
    explicit = explicit_keys(config)
    merged = with_explicit(config, explicit) if explicit is not None else {**config}
    for section in SCORER_SECTIONS:
        merged[section] = {**config[section], **saved[section]}  # keys newer than the scorer: the config's
        for key, want in config[section].items():
            unset = ((section, key) not in explicit if explicit is not None
                     else _plain(want) == _plain(defaults[section].get(key)))
            if unset or _plain(want) == _plain(saved[section].get(key)):
                continue
            if key not in RUNTIME_KEYS.get(section, ()):
                raise ConfigError(f"scorer {path} was fitted with {section}.{key}={saved[section].get(key)!r} but the "
                                  f"config asks for {want!r}; drop {section}.{key} from the config (the scorer knows "
                                  f"its own) or refit with wsi-qc fit-reference")
            merged[section][key] = want
    return merged


def _check_meta(meta: dict, path: Path) -> None:
    """Refuse a scorer folder of another format or kind, or whose meta lacks what loading needs."""
    info = meta.get("scorer")
    have = info.get("format") if isinstance(info, dict) else None
    if have != SCORER_FORMAT:
        raise ConfigError(f"scorer {path} has scorer format {have} (wsi-qc {meta.get('wsi_qc_version', '?')}) but "
                          f"this wsi-qc reads format {SCORER_FORMAT}; refit it with wsi-qc fit-reference")
    config = info.get("config")
    if info.get("kind") not in ("pooled", "local") or not isinstance(config, dict) or not all(
            isinstance(config.get(s), dict) for s in SCORER_SECTIONS) or not isinstance(meta.get("encoder"), dict):
        raise ConfigError(f"scorer {path}/meta.json lacks its kind, encoder or config sections "
                          f"({', '.join(SCORER_SECTIONS)}); refit it with wsi-qc fit-reference")
    saved = meta["encoder"].get("image_stats") or []
    now = list(stats_names(bool(saved), meta["encoder"].get("grid")))
    if saved != now:
        raise ConfigError(f"scorer {path} was fitted with the image statistics {saved} but wsi-qc {__version__} "
                          f"computes {now}; refit it with wsi-qc fit-reference")


def _plain(value):
    return json.loads(json.dumps(value))


class Scorer:
    """An encoder and a fitted flow; `score(features)` gives the per-tile score (higher = worse)."""

    def __init__(self, encoder: Encoder, flow: Flow, config: dict):
        self.encoder = encoder
        self.flow = flow
        self.config = config
        self.kind = "local" if getattr(encoder, "grid", None) else "pooled"
        self.score_kind = config["score"]["kind"]
        if self.score_kind not in SCORE_KINDS:
            raise ConfigError(f"score.kind={self.score_kind!r} is unknown; use one of {', '.join(SCORE_KINDS)}")
        self.aggregate = config["score"]["aggregate"]
        aggregate(np.zeros((1, 1, 1)), self.aggregate)  # an unknown aggregate is refused here
        self.meta: dict = {}
        self.heldout_: dict[str, np.ndarray] = {}
        self.inlier_: np.ndarray | None = None  # calibration tiles in the cut (cohort scorers; None: all)
        self.excluded_: np.ndarray | None = None  # calibration tiles never in the cut (set_calibration)
        self.coarse: Scorer | None = None  # the cascade's coarse pass, when fitted with it
        self.focus_: np.ndarray | None = None  # the reference tiles' focus values (wsi_qc.cascade.FOCUS_STATS)

    @classmethod
    def fit(cls, features: np.ndarray, encoder: Encoder, config: dict, groups=None,
            calibration: np.ndarray | None = None, max_rows: int | None = None) -> "Scorer":
        """Fit the flow on reference features from `encoder`: (N, D) pooled or (N, g, g, D) local.

        `groups` (N,), e.g. the slide of each tile, keeps whole groups together (at least 3 of them, else tiles)
        when `reference.calibration_fraction` of them is held out as calibration tiles (out of fitting and early
        stopping; their scores set the label-free cut) and when the flow holds out its early-stopping part.
        `calibration` (N,) bool overrides the draw (all False: every tile fits the flow, none calibrates).
        `max_rows`: the flow is fitted on at most this many feature vectors (positions), drawn at random (seeded).
        `fitted_` and `calibration_` (N,) bool: the tiles the flow was fitted on, and those that calibrate.
        """
        features = np.asarray(features, dtype=np.float32)
        n = len(features)
        if calibration is None:
            rng = np.random.default_rng(config["flow"]["seed"])
            calibration = held_out(holdout_groups(groups, n), config["reference"]["calibration_fraction"], rng)
        fit = ~np.asarray(calibration, bool)
        per_tile = int(np.prod(features.shape[1:-1])) if features.ndim == 4 else 1
        tile_groups = holdout_groups(None if groups is None else np.asarray(groups)[fit], int(fit.sum()))
        rows = features[fit].reshape(-1, features.shape[-1])
        row_groups, row_tiles = np.repeat(tile_groups, per_tile), np.repeat(np.arange(int(fit.sum())), per_tile)
        if max_rows is not None and len(rows) > max_rows:
            pick = np.sort(np.random.default_rng(config["flow"]["seed"]).permutation(len(rows))[:max_rows])
            rows, row_groups, row_tiles = rows[pick], row_groups[pick], row_tiles[pick]
        flow = flow_from_config(config)
        if n < flow.min_reference:  # counted on every reference tile, the calibration tiles included
            raise ConfigError(f"got {n} reference tiles; the flow needs at least {flow.min_reference}, add reference "
                              f"tiles or lower flow.min_reference")
        flow.min_reference = min(flow.min_reference, int(fit.sum()))
        flow.fit(rows, groups=row_groups, tiles=row_tiles)
        scorer = cls(encoder, flow, config)
        scorer.n_reference_, scorer.fitted_, scorer.calibration_ = n, fit, ~fit
        return scorer.set_calibration(features[~fit])

    def set_calibration(self, features: np.ndarray, core_z: float | None = None,
                        excluded: np.ndarray | None = None) -> "Scorer":
        """Keep both scores of calibration tiles (features never fitted on) for the label-free cut; with `core_z`,
        only their inlier core counts (set_core), never the `excluded` ones (bool per tile). Returns self."""
        self.heldout_ = self.score_maps_all(features) if len(features) else {}
        self.excluded_ = excluded
        return self.set_core(core_z)

    def set_core(self, core_z: float | None) -> "Scorer":
        """Let only the calibration tiles within `core_z` robust SDs of their median score (wsi_qc.cohort.robust
        .inliers), and not excluded, set the label-free cut: artifacts among the tiles of a cohort would raise it
        above themselves. None: every calibration tile counts. Returns self."""
        self.inlier_ = None
        if core_z is not None and self.heldout_:
            from wsi_qc.cohort.robust import inliers

            self.inlier_ = inliers(self._tile_scores(self.heldout_[self.score_kind]), core_z)
            if self.excluded_ is not None:
                self.inlier_ &= ~self.excluded_
        return self

    def fit_cascade(self, coarse_features: np.ndarray, encoder: Encoder, groups=None) -> "Scorer":
        """Fit the cascade's coarse pass on the coarse features (`encoder`, from coarse_config) of the same
        reference tiles; returns self."""
        coarse_features = np.asarray(coarse_features, dtype=np.float32)
        self.coarse = Scorer.fit(coarse_features, encoder, coarse_config(self.config), groups=groups)
        self.focus_ = focus_values(coarse_features)
        return self

    @property
    def cascade_on(self) -> bool:
        """Scoring runs the cascade: fitted with it, and cascade.enabled is not false."""
        return self.coarse is not None and self.config["cascade"]["enabled"] is not False

    def score_images(self, images: np.ndarray, timings: dict | None = None, features: bool = False) -> dict:
        """Scores of uint8 tiles (B, H, W, 3): "rl2" (B,) of score.kind, "rl2_map" (B, g, g) (None when pooled),
        "pass" (B,) uint8 (wsi_qc.cascade.PASSES: which pass decided), "discard" (B,) (tiles a cheap pass discards
        whatever the threshold); with `features`, "features" of every tile (single pass). Seconds per pass are
        added to `timings`."""
        n = len(images)
        out = {"pass": np.zeros(n, np.uint8), "discard": np.zeros(n, bool)}
        if not self.cascade_on or features:
            with _timed(timings, "encode_s"):
                found = self.encoder(images) if n else self._no_features()
            with _timed(timings, "score_s"):
                out["rl2"], out["rl2_map"] = self.score_tiles(found)
            return {**out, "features": found} if features else out
        c = self.config["cascade"]
        with _timed(timings, "coarse_s"):
            coarse = self.coarse.encoder(images) if n else self.coarse._no_features()
            scores, maps = self.coarse.score_tiles(coarse)
            held, target = self.coarse.heldout_scores(), self.heldout_scores()
            out["rl2"] = to_scale(scores, held, target)
            out["rl2_map"] = upsample(to_scale(maps, held, target), self.encoder.grid) if self.kind == "local" else None
        with _timed(timings, "focus_s"):
            focus = focus_values(coarse)
            clear = settled(scores, focus, {"coarse": held, "focus": self.focus_}, c)
        out["pass"][:] = PASSES.index("coarse")
        if not c["fine"]:
            if c["focus"]:
                blurred = ~in_range(focus, self.focus_, c["focus_alpha"])
                out["pass"][blurred], out["discard"] = PASSES.index("focus"), blurred
            return out
        doubt = np.flatnonzero(~clear)
        if len(doubt):
            with _timed(timings, "fine_s"):
                rl2, rl2_map = self.score_tiles(self.encoder(images[doubt]))
            out["rl2"][doubt], out["pass"][doubt] = rl2, PASSES.index("fine")
            if rl2_map is not None:
                out["rl2_map"][doubt] = rl2_map
        return out

    def _no_features(self) -> np.ndarray:
        grid = self.encoder.grid
        return np.zeros((0, self.encoder.dim) if grid is None else (0, grid, grid, self.encoder.dim), np.float32)

    @property
    def fingerprint(self) -> str:
        if "fingerprint" not in self.meta:
            raise ConfigError("this scorer has not been saved yet; save it to give it a fingerprint")
        return self.meta["fingerprint"]

    def _rows(self, features: np.ndarray) -> tuple[np.ndarray, tuple]:
        features = np.asarray(features, dtype=np.float32)
        want = 4 if self.kind == "local" else 2
        if features.ndim != want:
            raise ConfigError(f"a {self.kind} scorer scores {want}-d features, got shape {features.shape}; encode the "
                              f"tiles with the scorer's own encoder (scorer.encoder)")
        return features.reshape(-1, features.shape[-1]), features.shape[:-1]

    def latent(self, features: np.ndarray) -> np.ndarray:
        """Latent z: (N, D') pooled, (N, g, g, D') local."""
        rows, shape = self._rows(features)
        z = self.flow.transform(rows)
        return z.reshape(*shape, z.shape[-1])

    def tile_latent(self, features: np.ndarray) -> np.ndarray:
        """Latent z per tile (N, D'): a local scorer's mean over the tile's positions (for set-level RL2)."""
        z = self.latent(features)
        return z if self.kind == "pooled" else z.mean((1, 2))

    def score_maps_all(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Both scores, rl2 and nll, per tile (pooled, (N,)) or per position (local, (N, g, g))."""
        rows, shape = self._rows(features)
        z, log_jac = self.flow.latent_and_log_jac(rows)
        return {"rl2": tile_rl2(z, self.flow.mu_).astype(np.float32).reshape(shape),
                "nll": self.flow.nll_of(z, log_jac).reshape(shape)}

    def score_tiles(self, features: np.ndarray, kind: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(tile scores (N,), per-position maps (N, g, g) or None for a pooled scorer) of score kind `kind`."""
        values = self.score_maps_all(features)[kind or self.score_kind]
        if self.kind == "pooled":
            return values, None
        return aggregate(values, self.aggregate), values

    def scores(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Both tile scores: rl2 and nll."""
        return {k: self._tile_scores(v) for k, v in self.score_maps_all(features).items()}

    def score(self, features: np.ndarray) -> np.ndarray:
        """The configured tile score (score.kind, aggregated with score.aggregate for a local scorer)."""
        return self.score_tiles(features)[0]

    def score_slide(self, path: str | Path):
        """One row per tile of a slide (pandas DataFrame): slide, x, y (level-0 top-left), rl2, nll; every tile
        through the full-resolution pass (no cascade), so both kinds exist for every tile."""
        import pandas as pd

        with Slide.from_config(path, self.config) as slide:
            found = slide_features(slide, self.encoder, self.config)
        scores = self.scores(found.features)
        return pd.DataFrame({"slide": slide.id, "x": found.tiles.coords[:, 0], "y": found.tiles.coords[:, 1],
                             "rl2": scores["rl2"], "nll": scores["nll"]})

    def _tile_scores(self, values: np.ndarray) -> np.ndarray:
        return values if self.kind == "pooled" else aggregate(values, self.aggregate)

    def heldout_scores(self) -> np.ndarray:
        """Tile scores of the calibration tiles (held out of fitting) that set the label-free threshold: their
        inlier core when the scorer was fitted as a cohort (`trimmed` says how many were left out)."""
        if self.score_kind not in self.heldout_:
            raise ConfigError("this scorer kept no calibration tiles; refit it with reference.calibration_fraction "
                              "> 0 (on at least 3 slides for a cut by slide)")
        values = self._tile_scores(self.heldout_[self.score_kind])
        return values if self.inlier_ is None else values[self.inlier_]

    @property
    def trimmed(self) -> int:
        """Calibration tiles left out of the label-free cut as outliers of a cohort (0 for a curated reference)."""
        return 0 if self.inlier_ is None else int((~self.inlier_).sum())

    def save(self, path: str | Path) -> Path:
        """Write the scorer folder (and its coarse pass under coarse/, bound to it by fingerprint)."""
        path = Path(path)
        meta = {"encoder": self.encoder.meta(), "scorer": {
            "format": SCORER_FORMAT, "kind": self.kind,
            "config": {section: self.config[section] for section in SCORER_SECTIONS},
            "heldout": {k: np.round(v.astype(np.float64), 6).tolist() for k, v in self.heldout_.items()},
            "heldout_inlier": None if self.inlier_ is None else self.inlier_.tolist()}}
        shutil.rmtree(path / COARSE_DIR, ignore_errors=True)
        if self.coarse is not None:
            self.coarse.save(path / COARSE_DIR)
            meta["scorer"]["cascade"] = {"coarse_fingerprint": self.coarse.fingerprint, "config": {
                k: self.config["cascade"][k] for k in ("coarse_mpp", "coarse_grid")},
                "focus": np.round(self.focus_.astype(np.float64), 6).tolist()}
        self.flow.save(path, meta)
        self.meta = json.loads((Path(path) / META_FILE).read_text())  # the meta as written, fingerprint included
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, config: dict | None = None) -> "Scorer":
        """Load a saved scorer with the config it was fitted with.

        `config` (a full config, e.g. from load_config) may change run-time keys (RUNTIME_KEYS: device,
        workers, batch size, score kind and aggregate, ...); a bound key it sets to a value other than both the
        default and the scorer's own is refused, naming the key.
        """
        path = Path(path)
        defaults = load_config()
        config = config or defaults
        flow, meta = Flow.load(path, device=config["flow"]["device"], check_meta=lambda m: _check_meta(m, path),
                               cpu_runtime=config["flow"]["cpu_runtime"])
        info = meta["scorer"]
        merged = _merge_config(info["config"], config, defaults, path)
        encoder = encoder_from_config(merged)
        if encoder.weights_sha256 != meta["encoder"].get("weights_sha256"):
            raise ConfigError(f"scorer {path} was fitted with encoder weights {meta['encoder'].get('weights_sha256')} "
                              f"but encoder.weights={merged['encoder']['weights']!r} has {encoder.weights_sha256}; "
                              f"install the original weights or refit")
        scorer = cls(encoder, flow, merged)
        scorer.meta = meta
        shape = (-1,) if scorer.kind == "pooled" else (-1, encoder.grid, encoder.grid)
        scorer.heldout_ = {k: np.asarray(v, np.float32).reshape(shape) for k, v in info.get("heldout", {}).items()}
        inlier = info.get("heldout_inlier")
        scorer.inlier_ = None if inlier is None else np.asarray(inlier, bool)
        scorer._load_cascade(path, info.get("cascade"), defaults["cascade"])
        return scorer

    def _load_cascade(self, path: Path, info: dict | None, defaults: dict) -> None:
        """The coarse pass saved with the scorer; cascade.enabled without one, or another coarse resolution than
        the scorer's set by the config (even to the default; see _merge_config), is refused."""
        explicit = explicit_keys(self.config)
        c = self.config["cascade"] = dict(self.config["cascade"])
        if info is None:
            if c["enabled"] is True:
                raise ConfigError(f"scorer {path} was fitted without the cascade but the config sets cascade.enabled; "
                                  f"set cascade.enabled: false or refit with it (wsi-qc fit-reference)")
            return
        for key, have in info["config"].items():  # the coarse pass's resolution is bound to the scorer
            unset = ("cascade", key) not in explicit if explicit is not None else c[key] == defaults[key]
            if not unset and c[key] != have:
                raise ConfigError(f"scorer {path} was fitted with cascade.{key}={have!r} but the config asks for "
                                  f"{c[key]!r}; drop cascade.{key} from the config or refit")
            c[key] = have
        self.coarse = Scorer.load(path / COARSE_DIR, coarse_config(self.config))
        if self.coarse.fingerprint != info["coarse_fingerprint"]:
            raise ConfigError(f"{path / COARSE_DIR} is not the coarse pass fitted with {path} (fingerprint "
                              f"{self.coarse.fingerprint[:12]}, expected {info['coarse_fingerprint'][:12]}); refit")
        self.focus_ = np.asarray(info["focus"], np.float32)
