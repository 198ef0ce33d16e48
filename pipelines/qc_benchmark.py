"""The honest QC benchmark: reference, selection and test tiles from disjoint slides, simple heads beside the flows.

Every tile source is a slide (`benchmark.splits` names them): generated example slides, the real slides
and real 40x tiles of ../shared/data, and the real clean/inked pen pairs (stitched into one slide per state).
Clean tiles of selection and test slides are turned, in part, into artifact tiles (one kind per source
tile, every severity); the inked pen copies are real artifacts. Heads, all on the same encoder features:

- pooled features (one vector per tile): the FrEIA flow (rl2), a Ledoit-Wolf Gaussian (Mahalanobis), kNN distance;
- local features (one vector per grid position): the local flow (rl2 per position), the Gaussian and kNN per
  position, each aggregated to a tile score (max, top-k % mean, mean: chosen on the selection split).

Reported on the test split only: AUROC overall and per artifact kind with 95 % bootstrap CIs that resample
source tiles (all severities of a tile together), and the false-discard rate of clean test tiles at the
label-free threshold (the conformal quantile of the tiles of held-out reference slides, as `wsi-qc fit-reference`
holds them out), for interior and edge tiles.

    python -m pipelines.qc_benchmark --out out/qc_benchmark [--config configs/qc_benchmark.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from wsi_qc.artifacts import make_artifact
from wsi_qc.cascade import coarse_config, focus_values, settled, to_scale
from wsi_qc.config import load_config
from wsi_qc.data import write_example_slide
from wsi_qc.errors import ConfigError
from wsi_qc import encoder as encoder_code, image_stats as image_stats_code
from wsi_qc.flow import Flow, held_out
from wsi_qc.identity import Digest, file_digest
from wsi_qc.image_stats import IMAGE_STATS, LOCAL_STATS
from wsi_qc.rl2 import tile_rl2
from wsi_qc.scorer import RUNTIME_KEYS, aggregate, batches, encode, encoder_from_config, holdout_groups
from wsi_qc.slide import Slide
from wsi_qc.threshold import conformal_threshold
from wsi_qc.tiles import tile_slide
from wsi_qc.weights import weights_file

log = logging.getLogger("pipelines.qc_benchmark")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_CONFIG = ROOT / "configs" / "qc_benchmark.yaml"
SPLITS = ("reference", "selection", "test")
EDGE = 0.9  # tiles with less tissue than this are edge tiles
REAL_SLIDES = {"cmu1": ("slides/CMU-1-Small-Region.svs", None), "kidney": ("slides/kidney-48-5.tif", 0.5)}
REAL_TILES = {  # 40x tiles: file, mpp of the stored pixels
    "tupac-r34": ("artifacts/python_wsi_preprocessing/TUPAC-TR-002-tile-r34-c34-x33793-y33799-w1024-h1024.png",
                  0.25 * 1024 / 600),
    "tupac-r35": ("artifacts/python_wsi_preprocessing/TUPAC-TR-002-tile-r35-c37-x36865-y34823-w1024-h1024.png",
                  0.25 * 1024 / 600),
    "histolab-high": ("artifacts/histolab_fixtures/high-nuclei-score-level0.png", 0.25),
    "histolab-medium": ("artifacts/histolab_fixtures/medium-nuclei-score-level0.png", 0.25),
    "histolab-low": ("artifacts/histolab_fixtures/low-nuclei-score-level0.png", 0.25),
    "histolab-tissue": ("artifacts/histolab_fixtures/tissue-level0-7352-11762-7864-12274.png", 0.25),
}
PEN = "artifacts/wsi_pen_marking_removal/derived"
PEN_MPP = 0.25


@dataclass
class TileSet:
    """Tiles of the benchmark with their labels; `source` groups the versions of one source tile."""

    images: list = field(default_factory=list)
    slide: list = field(default_factory=list)
    split: list = field(default_factory=list)
    label: list = field(default_factory=list)
    kind: list = field(default_factory=list)
    severity: list = field(default_factory=list)
    source: list = field(default_factory=list)
    tissue: list = field(default_factory=list)

    def add(self, image, slide, split, label, kind, severity, source, tissue) -> None:
        for name, value in zip(("images", "slide", "split", "label", "kind", "severity", "source", "tissue"),
                               (image, slide, split, label, kind, severity, source, tissue)):
            getattr(self, name).append(value)

    def arrays(self) -> dict:
        return {k: np.asarray(v) for k, v in vars(self).items() if k != "images"}


def choose_aggregate(on_selection: dict[str, float], default: str, margin: float) -> str:
    """The candidate with the best selection AUROC, or `default` (the config's) when it is within `margin` of it."""
    best = max(on_selection, key=on_selection.get)
    return default if on_selection.get(default, -np.inf) >= on_selection[best] - margin else best


def read_config(path: str | Path | None) -> tuple[dict, dict]:
    """(wsi-qc config, benchmark section) of a benchmark YAML file."""
    path = Path(path or DEFAULT_CONFIG)
    data = yaml.safe_load(path.read_text()) or {}
    own = data.pop("benchmark", None)
    if not isinstance(own, dict):
        raise ConfigError(f"{path} has no 'benchmark' section; start from configs/qc_benchmark.yaml")
    tmp = path.with_name(f".{path.stem}.wsi_qc.yaml")
    tmp.write_text(yaml.safe_dump(data))
    try:
        config = load_config(tmp)
    finally:
        tmp.unlink()
    return config, own


def _grid_tiles(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Non-overlapping size x size tiles of an image, centred on it."""
    h, w = image.shape[:2]
    rows, cols = h // size, w // size
    y0, x0 = (h - rows * size) // 2, (w - cols * size) // 2
    return [image[y0 + r * size:y0 + (r + 1) * size, x0 + c * size:x0 + (c + 1) * size]
            for r in range(rows) for c in range(cols)]


def _resample(image: np.ndarray, mpp: float, target_mpp: float) -> np.ndarray:
    if target_mpp < mpp - 1e-9:
        raise ConfigError(f"a source at {mpp:g} mpp cannot give tiles at {target_mpp:g} mpp (no upsampling)")
    h, w = image.shape[:2]
    f = mpp / target_mpp
    return np.asarray(Image.fromarray(image).resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS))


def _pen_mosaics() -> dict[str, np.ndarray]:
    """{"clean": mosaic, "inked": mosaic} stitched from the 256 px halves at their level-0 coords (0.25 mpp)."""
    out = {}
    for state in ("clean", "inked"):
        files = sorted((SHARED / PEN / state).glob(f"*_{state}.png"))
        xy = [tuple(int(v) for v in re.findall(r"_(\d+)_(\d+)_", f.name)[0]) for f in files]
        x0, y0 = min(x for x, _ in xy), min(y for _, y in xy)
        w = max(x for x, _ in xy) - x0 + 256
        h = max(y for _, y in xy) - y0 + 256
        mosaic = np.zeros((h, w, 3), np.uint8)
        for f, (x, y) in zip(files, xy):
            mosaic[y - y0:y - y0 + 256, x - x0:x - x0 + 256] = np.asarray(Image.open(f).convert("RGB"))
        out[state] = mosaic
    return out


def source_tiles(slide_id: str, config: dict, own: dict, out: Path) -> tuple[list, list] | None:
    """(tiles, tissue fractions) of one benchmark slide at the config's tile mpp and size; None when absent."""
    t = config["tiles"]
    rng = np.random.default_rng([own["seed"], sum(map(ord, slide_id))])
    if slide_id.startswith("gen-"):
        path = out / "slides" / f"{slide_id}.tif"
        if not path.is_file():
            write_example_slide(path, size=(own["example_size"],) * 2, mpp=0.25, seed=int(slide_id[4:]))
        return _slide_tiles(path, None, config, own, rng)
    if slide_id in REAL_SLIDES:
        rel, mpp = REAL_SLIDES[slide_id]
        return _slide_tiles(SHARED / rel, mpp, config, own, rng) if (SHARED / rel).is_file() else None
    if slide_id in REAL_TILES:
        rel, mpp = REAL_TILES[slide_id]
        if not (SHARED / rel).is_file():
            return None
        image = _resample(np.asarray(Image.open(SHARED / rel).convert("RGB")), mpp, t["mpp"])
        tiles = _grid_tiles(image, t["size"])
        return tiles, [1.0] * len(tiles)
    raise ConfigError(f"unknown benchmark slide {slide_id!r}; use gen-K, {', '.join(REAL_SLIDES)}, pen-skin "
                      f"or {', '.join(REAL_TILES)}")


def _slide_tiles(path: Path, mpp: float | None, config: dict, own: dict, rng) -> tuple[list, list]:
    t = config["tiles"]
    with Slide(path, mpp=mpp) as slide:
        tiles = tile_slide(slide, config)[3]
        pick = np.sort(rng.permutation(len(tiles))[:own["max_tiles"]])
        images = [slide.read_region(tuple(int(v) for v in tiles.coords[i]), (t["size"], t["size"]), t["mpp"])
                  for i in pick]
        return images, [float(tiles.tissue_fraction[i]) for i in pick]


def collect(config: dict, own: dict, out: Path) -> TileSet:
    """All benchmark tiles: clean reference tiles; clean and artifact tiles of the selection and test slides."""
    ts, size, mpp = TileSet(), config["tiles"]["size"], config["tiles"]["mpp"]
    rng = np.random.default_rng(own["seed"])
    turn = 0
    for split in SPLITS:
        for slide_id in own["splits"][split]:
            if slide_id == "pen-skin":
                if not (SHARED / PEN).is_dir():
                    log.warning("pen-skin: %s is absent; skipped", SHARED / PEN)
                    continue
                mosaics = {k: _grid_tiles(_resample(v, PEN_MPP, mpp), size) for k, v in _pen_mosaics().items()}
                for i, (clean, inked) in enumerate(zip(mosaics["clean"], mosaics["inked"])):
                    ts.add(clean, slide_id, split, 0, "", 0, f"{slide_id}:{i}", 1.0)
                    ts.add(inked, slide_id, split, 1, "real_pen", 0, f"{slide_id}:{i}", 1.0)
                continue
            found = source_tiles(slide_id, config, own, out)
            if found is None:
                log.warning("%s: its file under %s is absent; skipped", slide_id, SHARED)
                continue
            images, fractions = found
            bad = np.zeros(len(images), bool)
            if split != "reference":
                bad[rng.permutation(len(images))[:int(round(own["artifact_fraction"] * len(images)))]] = True
            for i, (image, fraction) in enumerate(zip(images, fractions)):
                source = f"{slide_id}:{i}"
                if not bad[i]:
                    ts.add(image, slide_id, split, 0, "", 0, source, fraction)
                    continue
                kind = own["kinds"][turn % len(own["kinds"])]
                turn += 1
                for severity in own["severities"]:
                    art = make_artifact(image, kind, severity, np.random.default_rng([own["seed"], turn, severity]))
                    ts.add(art, slide_id, split, 1, kind, severity, source, fraction)
    return ts


def feature_tag(ts: TileSet, cfg: dict) -> str:
    """Key of the benchmark's feature cache (identity.Digest): the encoder's bound config, the tiles section, the
    image statistics' names, the bytes of the encoder weights file, the source of wsi_qc.encoder and
    wsi_qc.image_stats, and the bytes of every benchmark tile, in order (so another seed, split or artifact code gives
    other features)."""
    bound = {k: v for k, v in cfg["encoder"].items() if k not in RUNTIME_KEYS["encoder"]}  # what sets the features
    weights = str(cfg["encoder"]["weights"])
    digest = Digest().json({"encoder": bound, "tiles": cfg["tiles"], "stats": [list(IMAGE_STATS), list(LOCAL_STATS)],
                            "weights": weights if weights in ("random", "hub") else file_digest(weights_file(weights))})
    digest.code(encoder_code, image_stats_code)
    for image in ts.images:
        digest.array(image)
    return digest.hex(16)


def features_of(ts: TileSet, config: dict, variant: dict, out: Path) -> np.ndarray:
    """Encoder features of every benchmark tile for one feature variant (cached under out/features, key:
    feature_tag)."""
    cfg = {**config, "encoder": {**config["encoder"], **variant}}
    cache = out / "features" / f"{feature_tag(ts, cfg)}.npy"
    if cache.is_file():
        return np.load(cache)
    encoder = encoder_from_config(cfg)
    images = np.stack(ts.images)
    feats = encode(encoder, batches(images, config["tiles"]["batch_size"]), len(images), desc="benchmark")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, feats)
    return feats


class Gaussian:
    """Ledoit-Wolf shrinkage Gaussian; score = RMS Mahalanobis distance per dimension."""

    def fit(self, x: np.ndarray, tiles=None) -> "Gaussian":
        self.lw_ = LedoitWolf().fit(x)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.sqrt(np.concatenate([self.lw_.mahalanobis(c) for c in np.array_split(x, max(1, len(x) // 50000))])
                       / x.shape[1])


class KNN:
    """Distance to the nearest of a seeded random coreset of standardised reference vectors (PatchCore-style)."""

    def __init__(self, coreset: int, seed: int):
        self.coreset, self.seed = coreset, seed

    def fit(self, x: np.ndarray, tiles=None) -> "KNN":
        import torch

        self.mean_, self.std_ = x.mean(0), x.std(0) + 1e-6
        pick = np.random.default_rng(self.seed).permutation(len(x))[:self.coreset]
        self.bank_ = torch.as_tensor((x[pick] - self.mean_) / self.std_, dtype=torch.float32)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        import torch

        q = torch.as_tensor((x - self.mean_) / self.std_, dtype=torch.float32)
        return np.concatenate([torch.cdist(c, self.bank_).min(1).values.numpy() for c in q.split(4096)])


class FlowHead:
    """A FrEIA flow; score = rl2 of the latent."""

    def __init__(self, params: dict):
        self.params = params

    def fit(self, x: np.ndarray, tiles=None) -> "FlowHead":
        self.flow_ = Flow(**self.params).fit(x, tiles=tiles)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return tile_rl2(self.flow_.transform(x), self.flow_.mu_).astype(np.float32)


def auroc(scores, labels, weights=None) -> float:
    return float(roc_auc_score(labels, scores, sample_weight=weights))


def _source_weights(sources, n: int, seed: int):
    """Bootstrap weights per tile: source tiles drawn with replacement, each with all its versions."""
    names, inverse = np.unique(sources, return_inverse=True)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))[inverse]


def bootstrap_ci(scores, labels, sources, n: int, seed: int) -> tuple[float, float]:
    """95 % percentile CI of the AUROC, resampling source tiles (with all their versions)."""
    values = [auroc(scores, labels, w) for w in _source_weights(sources, n, seed) if len(np.unique(labels[w > 0])) == 2]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(a, b, labels, sources, n: int, seed: int) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) on the same tiles, with a 95 % CI from the same source-tile resamples."""
    diffs = [auroc(a, labels, w) - auroc(b, labels, w) for w in _source_weights(sources, n, seed)
             if len(np.unique(labels[w > 0])) == 2]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return auroc(a, labels) - auroc(b, labels), float(lo), float(hi)


def evaluate(scores: np.ndarray, meta: dict, mask: np.ndarray, own: dict) -> dict:
    """AUROC overall / per kind / defocus severity 1 (with CIs) of the tiles in `mask`."""
    y, kind, sev, src = meta["label"][mask], meta["kind"][mask], meta["severity"][mask], meta["source"][mask]
    s = scores[mask]
    good = y == 0
    res = {"overall": auroc(s, y), "overall_ci": bootstrap_ci(s, y, src, own["n_bootstrap"], own["seed"])}
    for k in sorted(set(kind[~good])):
        m = good | (kind == k)
        res[k] = auroc(s[m], y[m])
        res[f"{k}_ci"] = bootstrap_ci(s[m], y[m], src[m], own["n_bootstrap"], own["seed"])
    m = good | ((kind == "defocus") & (sev == 1))
    if (m & ~good).any():
        res["defocus_1"] = auroc(s[m], y[m])
    return res


def false_discards(scores, threshold: float, meta: dict, mask: np.ndarray) -> dict:
    """Discarded share of clean tiles (all, interior, edge) and of artifact tiles at a threshold."""
    clean, tissue = mask & (meta["label"] == 0), meta["tissue"]
    rate = lambda m: float(np.mean(scores[m] > threshold)) if m.any() else float("nan")  # noqa: E731
    return {"false_discard": rate(clean), "interior": rate(clean & (tissue >= EDGE)), "edge": rate(clean & (tissue < EDGE)),
            "n_edge": int((clean & (tissue < EDGE)).sum()), "recall": rate(mask & (meta["label"] == 1))}


def heads(own: dict, config: dict, local: bool) -> dict:
    flow = {**config["flow"], **({} if local else own["pooled_flow"]), "device": "cpu"}
    return {"flow": FlowHead(flow), "gaussian": Gaussian(), "knn": KNN(own["knn_coreset"], own["seed"])}


def local_maps(head, feats: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Per-position scores (N, g, g) of a local head fitted on the positions of the `fit_rows` tiles."""
    x, g = feats[fit_rows], feats.shape[1]
    head.fit(x.reshape(-1, x.shape[-1]), np.repeat(np.arange(len(x)), g * g))
    return head.score(feats.reshape(-1, feats.shape[-1])).reshape(len(feats), g, g)


def cascade_scores(ts: TileSet, config: dict, own: dict, out: Path, fine: np.ndarray, how: str, fit_rows: np.ndarray,
                   held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cascade tile scores, which tiles needed the fine pass) with the default local flow as the fine pass: the
    coarse flow is fitted on the same reference tiles, settled tiles get their coarse score on the fine scale."""
    local = {**config, "encoder": {**config["encoder"], **own["features"]["local"]}}
    coarse = features_of(ts, config, coarse_config(local)["encoder"], out)
    head = FlowHead({**config["flow"], "device": "cpu"})
    coarse_scores = aggregate(local_maps(head, coarse, fit_rows), how)
    state = {"coarse": coarse_scores[held], "focus": focus_values(coarse[fit_rows | held])}  # all reference tiles
    clear = settled(coarse_scores, focus_values(coarse), state, config["cascade"])
    return np.where(clear, to_scale(coarse_scores, coarse_scores[held], fine[held]), fine), ~clear


def run_benchmark(config: dict, own: dict, out: Path) -> dict:
    start = time.perf_counter()
    ts = collect(config, own, out)
    meta = ts.arrays()
    split = meta["split"]
    log.info("tiles: %s", {s: int((split == s).sum()) for s in SPLITS})
    ref = np.flatnonzero(split == "reference")
    held = np.zeros(len(split), bool)  # whole reference slides, drawn as Scorer.fit draws its held-out slides
    units = holdout_groups(meta["slide"][ref], len(ref))
    held[ref[held_out(units, own["calibration_fraction"], np.random.default_rng(own["seed"]))]] = True
    fit_rows = (split == "reference") & ~held
    results = {"counts": {s: {"clean": int(((split == s) & (meta["label"] == 0)).sum()),
                              "bad": int(((split == s) & (meta["label"] == 1)).sum())} for s in SPLITS},
               "heads": {}}
    test_scores, sel = {}, split == "selection"

    def record(label: str, candidates: dict, t0: float) -> np.ndarray:
        on_selection = {a: auroc(c[sel], meta["label"][sel]) for a, c in candidates.items()}
        chosen = choose_aggregate(on_selection, config["score"]["aggregate"], own["aggregate_margin"])
        scores = candidates[chosen]
        threshold = conformal_threshold(scores[held], own["false_discard"])
        test_scores[label] = scores[split == "test"]
        results["heads"][label] = {
            "aggregate": chosen, "selection_auroc": on_selection,
            "test": evaluate(scores, meta, split == "test", own), "threshold": threshold,
            "test_discards": false_discards(scores, threshold, meta, split == "test"),
            "selection_discards": false_discards(scores, threshold, meta, sel),
            "seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s: test AUROC %.3f (%s)", label, results["heads"][label]["test"]["overall"], chosen)
        return scores

    for name, variant in own["features"].items():
        feats = features_of(ts, config, variant, out)
        local = feats.ndim == 4
        for head_name, head in heads(own, config, local).items():
            t0 = time.perf_counter()
            x = feats[fit_rows]
            if local:
                maps = local_maps(head, feats, fit_rows)
                candidates = {a: aggregate(maps, a) for a in own["aggregates"]}
            else:
                head.fit(x)
                candidates = {"tile": head.score(feats)}
            scores = record(f"{name} {head_name}", candidates, t0)
            if f"{name} {head_name}" == own["default"]:
                default_scores, default_aggregate = scores, results["heads"][own["default"]]["aggregate"]
    if config["cascade"]["enabled"]:
        t0 = time.perf_counter()
        scores, fine = cascade_scores(ts, config, own, out, default_scores, default_aggregate, fit_rows, held)
        record("cascade", {default_aggregate: scores}, t0)
        results["cascade_fine"] = {part: float(fine[split == part].mean()) for part in ("selection", "test")}
    test = split == "test"
    default = own["default"]
    results["default"] = default
    cut = results["heads"][default]["threshold"]
    held_scores = default_scores[held]
    results["default_label_free"] = {  # the default head's label-free cut at other target rates
        str(rate): {part: false_discards(default_scores, conformal_threshold(held_scores, rate), meta, split == part)
                    for part in ("selection", "test")}
        for rate in (0.005, 0.01, 0.02, 0.05)}
    results["default_discards_by_slide"] = {  # clean test tiles of each slide discarded at the label-free cut
        s: false_discards(default_scores, cut, meta, test & (meta["slide"] == s))["false_discard"]
        for s in own["splits"]["test"] if (test & (meta["slide"] == s) & (meta["label"] == 0)).any()}
    results["versus"] = {other: paired_difference(test_scores[default], s, meta["label"][test], meta["source"][test],
                                                  own["n_bootstrap"], own["seed"])
                         for other, s in test_scores.items() if other != default}
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def markdown(results: dict) -> str:
    """The results table: one row per head, test split, AUROC [95 % CI] per kind."""
    rows = results["heads"]
    kinds = sorted({k for r in rows.values() for k in r["test"] if not k.endswith("_ci") and k != "overall"})
    head = ["head", "agg", "overall"] + kinds + ["false discard (interior/edge)", "recall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        t, d = r["test"], r["test_discards"]
        cell = lambda k: f"{t[k]:.3f} [{t[k + '_ci'][0]:.2f}, {t[k + '_ci'][1]:.2f}]" if k + "_ci" in t else (  # noqa: E731
            f"{t[k]:.3f}" if k in t else "-")
        lines.append("| " + " | ".join([name, r["aggregate"], cell("overall")] + [cell(k) for k in kinds] + [
            f"{d['false_discard']:.3f} ({d['interior']:.3f}/{d['edge']:.3f})", f"{d['recall']:.3f}"]) + " |")
    lines.append("")
    lines.append(f"default ({results['default']}) minus each head, test AUROC, paired bootstrap 95 % CI: " + "; ".join(
        f"{other} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for other, (d, lo, hi) in results["versus"].items()))
    lines.append("")
    lines.append(f"default ({results['default']}) false discards of clean test tiles per slide at the label-free "
                 "threshold: " + ", ".join(f"{s} {v:.3f}" for s, v in results["default_discards_by_slide"].items()))
    lines.append("")
    lines.append("default label-free cut at target false-discard rates (held-out reference tiles): " + "; ".join(
        f"{rate}: selection {v['selection']['false_discard']:.3f} / test {v['test']['false_discard']:.3f} discarded "
        f"clean, test recall {v['test']['recall']:.3f}" for rate, v in results["default_label_free"].items()))
    if "cascade_fine" in results:
        lines.append("")
        lines.append("cascade: tiles that needed the full-resolution pass: " + ", ".join(
            f"{part} {100 * v:.1f} %" for part, v in results["cascade_fine"].items()))
    c = results["counts"]
    lines.append("")
    lines.append("tiles (clean/bad): " + ", ".join(f"{s} {v['clean']}/{v['bad']}" for s, v in c.items()))
    return "\n".join(lines)


def bench_main(argv, doc: str, default_config: Path, default_out: str, run, table) -> int:
    """A benchmark's command line: --config (its YAML), --out; `run(config, own, out)` -> results, written with
    `table(results)` to out/results.json and results.md, and printed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", default=None, help=f"benchmark YAML (default {default_config.relative_to(ROOT)})")
    parser.add_argument("--out", default=default_out, help="output folder (slides, feature cache, results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config, own = read_config(args.config or default_config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(config, own, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    text = table(results)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, __doc__, DEFAULT_CONFIG, "out/qc_benchmark", run_benchmark, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
