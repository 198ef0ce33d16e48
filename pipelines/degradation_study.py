"""The paper's RL2 studies on tissue tiles: monotonicity under five degradations, sample-size stability.

Tiles come from the slides in ../shared/data/slides when present (or study.slides), topped up with
generated example slides (cached under --out) until the pool holds study.min_tiles; the pool is shuffled
and split in halves: set A (the reference the flow is fitted on) and set B (held-out tissue).

- Monotonicity: RL2(A, B degraded) (flow fitted once on A) and the Fréchet distance (FID's formula on
  the same encoder features) for every degradation kind and level; Spearman's rho of each metric with
  the level (1.0 = monotonic increase). The same n_degraded tiles of B are degraded at every level.
- Stability: both metrics between n tiles drawn from A and n from B (clean, or degraded), repeated
  stability_draws times; coefficient of variation (std / mean) per n. Draws are bootstrap draws (with
  replacement) from the pools by default, so n may approach the pool size without shrinking the spread.

Features are cached per set in --out/features/<key>/ (key = tile pixels + encoder identity), so a rerun
only fits the flow and recomputes the metrics. Writes study.md (tables), study.json and PNG plots.

    python -m pipelines.degradation_study --out out/degradation [--config configs/degradation_study.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

from wsi_qc.artifacts import LEVELS, degrade
from wsi_qc.config import load_config
from wsi_qc.data import write_example_slide
from wsi_qc import encoder as encoder_code, image_stats as image_stats_code
from wsi_qc.encoder import Encoder
from wsi_qc.errors import ConfigError
from wsi_qc.identity import Digest
from wsi_qc.rl2 import frechet_distance, set_rl2
from wsi_qc.scorer import Scorer, batches, encode, encoder_from_config
from wsi_qc.slide import Slide
from wsi_qc.tiles import iter_tile_batches, tile_slide

log = logging.getLogger("pipelines.degradation_study")
ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = ROOT.parent / "shared" / "data" / "slides"
DEFAULT_CONFIG = ROOT / "configs" / "degradation_study.yaml"
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")
CLEAN = "clean"  # stability case without degradation

STUDY_DEFAULTS = {
    "slides": None, "slide_mpp": {}, "min_tiles": 3000, "max_tiles": 3000,
    "example_slides": {"max": 10, "size": 8192, "mpp": 0.5},
    "levels": None, "n_degraded": 250,
    "stability_sizes": [50, 100, 300, 1000], "stability_draws": 30, "stability_replace": True,
    "stability_cases": [["blur", 2], [CLEAN, 0]], "flow_variants": [], "seed": 0,
}


# ---- configuration -----------------------------------------------------------------------------

def split_config(path: Path) -> tuple[dict, dict]:
    """(wsi-qc config, study section with defaults filled in) of a study YAML."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    study = data.pop("study", None) or {}
    unknown = sorted(set(study) - set(STUDY_DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown study key(s) {', '.join(unknown)}; known: {', '.join(STUDY_DEFAULTS)}")
    return load_config(overrides=data), {**STUDY_DEFAULTS, **study}


def study_levels(study: dict) -> dict[str, list[float]]:
    """Levels per kind: study.levels (kind -> values, increasing) or wsi_qc.artifacts.LEVELS."""
    levels = study["levels"] or LEVELS
    for kind, values in levels.items():
        if kind not in LEVELS:
            raise ConfigError(f"study.levels names unknown degradation {kind!r}; use some of {', '.join(LEVELS)}")
        if list(values) != sorted(set(values)) or len(values) < 2:
            raise ConfigError(f"study.levels.{kind}={list(values)} must hold at least 2 increasing values")
    return {kind: [float(v) for v in values] for kind, values in levels.items()}


# ---- tiles -------------------------------------------------------------------------------------

def spearman(levels, values) -> float:
    """Spearman's rank correlation of values with levels (1.0 = strictly increasing); nan if values are constant."""
    if len(set(map(float, values))) < 2:
        return float("nan")
    return float(spearmanr(levels, values).statistic)


def _slide_paths(study: dict) -> list[Path]:
    sources = study["slides"] or ([SHARED_SLIDES] if SHARED_SLIDES.is_dir() else [])
    paths = []
    for s in map(Path, sources):
        paths += sorted(p for p in s.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES) if s.is_dir() else [s]
    return paths


def _read_tiles(path: Path, mpp: float | None, config: dict) -> np.ndarray:
    with Slide(path, mpp=mpp) as slide:
        tiles = tile_slide(slide, config)[-1]
        images = np.zeros((len(tiles.coords), tiles.size, tiles.size, 3), np.uint8)
        for index, batch in iter_tile_batches(slide.path, tiles, batch_size=64, workers=0, slide_mpp=slide.mpp):
            images[index] = batch
    return images


def collect_tiles(study: dict, config: dict, out: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(tiles uint8 (N, size, size, 3), source index per tile (N,), sources) of the study's slides.

    Slides that cannot be opened or hold no tissue tile are listed with the reason and skipped; generated
    example slides (cached in out/slides) are added while the pool holds fewer than study.min_tiles.
    """
    parts, sources = [], []
    overrides = study["slide_mpp"] or {}
    for path in _slide_paths(study):
        try:
            images = _read_tiles(path, overrides.get(path.name), config)
        except Exception as exc:  # a study over what is readable: record why and go on
            log.warning("skipping %s: %s", path.name, exc)
            sources.append({"slide": path.name, "origin": "real", "tiles": 0, "skipped": str(exc)})
            continue
        parts.append(images)
        sources.append({"slide": path.name, "origin": "real", "tiles": len(images),
                        "mpp": overrides.get(path.name, "metadata")})
    ex = study["example_slides"]
    for seed in range(int(ex["max"])):
        if sum(map(len, parts)) >= study["min_tiles"]:
            break
        path = out / "slides" / f"example-{ex['size']}px-{ex['mpp']}mpp-seed{seed}.tif"
        if not path.is_file():
            write_example_slide(path, size=(ex["size"], ex["size"]), mpp=ex["mpp"], seed=seed)
        images = _read_tiles(path, None, config)
        parts.append(images)
        sources.append({"slide": path.name, "origin": "generated", "tiles": len(images), "mpp": ex["mpp"]})
    if not parts:
        raise ConfigError("no slide gave tissue tiles; set study.slides or study.example_slides.max > 0")
    used = [i for i, s in enumerate(sources) if s["tiles"]]
    index = np.concatenate([np.full(len(p), i, np.int32) for i, p in zip(used, parts)])
    return np.concatenate(parts), index, sources


# ---- features ----------------------------------------------------------------------------------

class FeatureCache:
    """Encoder features of named tile sets, cached as npz files in one folder per key (identity.Digest): the
    encoder's meta (weights digest included) and precision, the source of wsi_qc.encoder and wsi_qc.image_stats,
    and the bytes of the study's tiles."""

    def __init__(self, root: Path, encoder: Encoder, images: list[np.ndarray], batch_size: int):
        digest = Digest().json({**encoder.meta(), "precision": encoder.precision}).code(encoder_code, image_stats_code)
        for x in images:
            digest.array(x)
        self.folder = Path(root) / digest.hex(16)
        self.encoder, self.batch_size = encoder, batch_size
        self.hits = self.misses = 0

    def get(self, name: str, make_images) -> np.ndarray:
        """Features of the set `name`; `make_images()` builds its tiles only on a cache miss."""
        path = self.folder / f"{name}.npz"
        if path.is_file():
            self.hits += 1
            return np.load(path)["features"]
        self.misses += 1
        images = make_images()
        features = encode(self.encoder, batches(images, self.batch_size), len(images), desc=name)
        self.folder.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".tmp.npz"), features=features)
        path.with_suffix(".tmp.npz").replace(path)
        return features


def _degraded(images: np.ndarray, kind: str, level: float, seed: int) -> np.ndarray:
    """images degraded by (kind, level), with a generator fixed by (seed, kind, level) so caches stay valid."""
    if kind == CLEAN or level == 0:
        return images
    rng = np.random.default_rng([seed, list(LEVELS).index(kind), int(round(level * 1000))])
    return degrade(images, kind, level, rng)


# ---- the two studies ---------------------------------------------------------------------------

def degraded_features(cache: FeatureCache, subset_b: np.ndarray, clean_b: np.ndarray,
                      levels: dict[str, list[float]], seed: int) -> dict[str, list[np.ndarray]]:
    """Features of the same tiles of B at every level of every kind (level 0: the clean features)."""
    return {kind: [clean_b if level == 0 else
                   cache.get(f"mono-n{len(subset_b)}-seed{seed}-{kind}-{level:g}",
                             lambda: _degraded(subset_b, kind, level, seed)) for level in values]
            for kind, values in levels.items()}


def monotonicity(features_a: np.ndarray, latent_a: np.ndarray, scorer: Scorer, sets: dict[str, list[np.ndarray]],
                 levels: dict[str, list[float]], with_fd: bool = True) -> dict:
    """RL2(A, degraded B) and (with_fd) FD(A, degraded B) at every level of every kind, with Spearman's rho."""
    rows = {}
    for kind, values in levels.items():
        rl2 = [set_rl2(latent_a, scorer.tile_latent(f)) for f in sets[kind]]
        rows[kind] = {"levels": values, "rl2": rl2, "rl2_spearman": spearman(values, rl2)}
        if with_fd:
            fd = [frechet_distance(features_a, f) for f in sets[kind]]
            rows[kind] |= {"fd": fd, "fd_spearman": spearman(values, fd)}
            log.info("%s: RL2 %s, FD %s", kind, _fmt(rl2, ".3f"), _fmt(fd, ".1f"))
    return rows


def stability(features_a: np.ndarray, latent_a: np.ndarray, features_b: np.ndarray, latent_b: np.ndarray,
              sizes: list[int], draws: int, replace: bool, rng: np.random.Generator, with_fd: bool = True) -> dict:
    """Mean and coefficient of variation of RL2 and (with_fd) FD over `draws` draws of n tiles from each set."""
    out = {}
    for n in sizes:
        if n > min(len(features_a), len(features_b)):
            log.warning("stability n=%d skipped: the pools hold %d and %d tiles", n, len(features_a), len(features_b))
            continue
        rl2, fd = [], []
        for _ in range(draws):
            ia = rng.choice(len(features_a), n, replace=replace)
            ib = rng.choice(len(features_b), n, replace=replace)
            rl2.append(set_rl2(latent_a[ia], latent_b[ib]))
            if with_fd:
                fd.append(frechet_distance(features_a[ia], features_b[ib]))
        out[n] = {"rl2_mean": float(np.mean(rl2)), "rl2_cv": float(np.std(rl2, ddof=1) / np.mean(rl2))}
        if with_fd:
            out[n] |= {"fd_mean": float(np.mean(fd)), "fd_cv": float(np.std(fd, ddof=1) / np.mean(fd))}
            log.info("stability n=%d: RL2 CV %.2f %%, FD CV %.2f %%", n, 100 * out[n]["rl2_cv"], 100 * out[n]["fd_cv"])
    return out


def _flow_info(flow) -> dict:
    h = flow.history_
    return {"latent_dim": int(flow.latent_dim_), "feature_dim": int(flow.feature_dim_), "pca": flow.pca_ is not None,
            "epochs_run": len(h["val"]), "best_epoch": int(h["best_epoch"]), "val_nll": float(h["val"][h["best_epoch"]])}


def run_study(config: dict, study: dict, out: Path, encoder: Encoder | None = None) -> dict:
    """Both studies with one encoder; returns the result dict that markdown() and plots() render."""
    start = time.perf_counter()
    seed = int(study["seed"])
    levels = study_levels(study)
    images, source_index, sources = collect_tiles(study, config, out)
    order = np.random.default_rng(seed).permutation(len(images))[: study["max_tiles"]]
    half = len(order) // 2
    ia, ib = order[:half], order[half:]
    images_a, images_b = images[ia], images[ib]
    for name, idx in (("in_a", ia), ("in_b", ib)):
        counts = Counter(source_index[idx].tolist())
        for i, s in enumerate(sources):
            s[name] = counts.get(i, 0)
    n_degraded = min(int(study["n_degraded"]), len(images_b))

    encoder = encoder or encoder_from_config(config)
    cache = FeatureCache(out / "features", encoder, [images_a, images_b], config["tiles"]["batch_size"])
    features_a = cache.get("A", lambda: images_a)
    features_b = cache.get("B", lambda: images_b)
    sets = degraded_features(cache, images_b[:n_degraded], features_b[:n_degraded], levels, seed)
    cases = []
    for kind, level in study["stability_cases"]:
        if kind != CLEAN and kind not in LEVELS:
            raise ConfigError(f"study.stability_cases names unknown degradation {kind!r}; use {CLEAN} or one of "
                              f"{', '.join(LEVELS)}")
        level = 0.0 if kind == CLEAN else float(level)
        cases.append((kind, level, features_b if kind == CLEAN else cache.get(
            f"B-seed{seed}-{kind}-{level:g}", lambda: _degraded(images_b, kind, level, seed))))
    sizes, draws, replace = study["stability_sizes"], int(study["stability_draws"]), bool(study["stability_replace"])

    scorer = Scorer.fit(features_a, encoder, config)
    latent_a = scorer.tile_latent(features_a)
    mono = monotonicity(features_a, latent_a, scorer, sets, levels)
    stab = []
    for i, (kind, level, feats_b) in enumerate(cases):
        latent_b = scorer.tile_latent(feats_b)
        stab.append({"kind": kind, "level": level, "rl2_full": set_rl2(latent_a, latent_b),
                     "fd_full": frechet_distance(features_a, feats_b),
                     "sizes": stability(features_a, latent_a, feats_b, latent_b, sizes, draws, replace,
                                        np.random.default_rng([seed, i]))})
    variants = []
    for overrides in study["flow_variants"] or []:
        other = Scorer.fit(features_a, encoder, {**config, "flow": {**config["flow"], **overrides}})
        za = other.tile_latent(features_a)
        rows = monotonicity(features_a, za, other, sets, levels, with_fd=False)
        variants.append({"flow": overrides, **_flow_info(other.flow),
                         "rl2_spearman": {k: r["rl2_spearman"] for k, r in rows.items()},
                         "stability": [stability(features_a, za, f, other.tile_latent(f), sizes, draws, replace,
                                                 np.random.default_rng([seed, i]), with_fd=False)
                                       for i, (_, _, f) in enumerate(cases)]})
        log.info("flow variant %s: RL2 rho %s", overrides, variants[-1]["rl2_spearman"])
    return {"encoder": {"name": encoder.name, "weights": encoder.weights, "precision": encoder.precision,
                        "dim": encoder.dim},
            "tile_size": config["tiles"]["size"], "tile_mpp": config["tiles"]["mpp"],
            "tile_overlap": config["tiles"]["overlap"], "sources": sources, "n_pool": len(images),
            "n_a": len(images_a), "n_b": len(images_b), "n_degraded": n_degraded,
            "flow": {"params": config["flow"], **_flow_info(scorer.flow)},
            "monotonicity": mono, "stability_draws": draws, "stability_replace": replace, "stability": stab,
            "flow_variants": variants,
            "cache": {"folder": str(cache.folder), "hits": cache.hits, "misses": cache.misses},
            "seconds": round(time.perf_counter() - start, 1)}


# ---- output ------------------------------------------------------------------------------------

def _fmt(values, spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def _case_name(case: dict) -> str:
    return "clean B (same tissue, other tiles)" if case["kind"] == CLEAN else f"B degraded by {case['kind']} {case['level']:g}"


def markdown(result: dict) -> str:
    e, f = result["encoder"], result["flow"]
    lines = [f"# RL2 degradation study ({e['name']}, {e['weights']}, {e['precision']})", "",
             f"{result['tile_size']} px tiles at {result['tile_mpp']} mpp (overlap {result['tile_overlap']} px); "
             f"pool {result['n_pool']} tiles, shuffled and split into set A ({result['n_a']}, the reference the flow "
             f"is fitted on) and set B ({result['n_b']}, held out). Flow: {f['feature_dim']}-d features -> "
             f"{f['latent_dim']}-d latent ({'PCA' if f['pca'] else 'no PCA'}), best epoch {f['best_epoch']} of "
             f"{f['epochs_run']}, validation NLL/dim {f['val_nll']:.3f}.", "",
             "## Tiles", "", "| slide | origin | tiles | in A | in B | note |", "|---|---|---|---|---|---|"]
    for s in result["sources"]:
        note = f"skipped: {s['skipped']}" if "skipped" in s else f"level-0 mpp {s['mpp']}"
        lines.append(f"| {s['slide']} | {s['origin']} | {s['tiles']} | {s.get('in_a', 0)} | {s.get('in_b', 0)} | "
                     f"{note.replace('|', '/')} |")
    lines += ["", f"## Monotonicity: A vs the same {result['n_degraded']} tiles of B at every level", "",
              "Spearman's rho of the metric with the level (1.0 = monotonic increase).", "",
              "| kind | levels | RL2 | RL2 rho | Fréchet distance | FD rho |", "|---|---|---|---|---|---|"]
    for kind, r in result["monotonicity"].items():
        lines.append(f"| {kind} | {_fmt(r['levels'], 'g')} | {_fmt(r['rl2'], '.3f')} | {r['rl2_spearman']:.3f} | "
                     f"{_fmt(r['fd'], '.1f')} | {r['fd_spearman']:.3f} |")
    how = ("bootstrap draws (with replacement) of n tiles from each pool" if result["stability_replace"]
           else "draws without replacement of n tiles from each pool")
    lines += ["", "## Sample-size stability", "",
              f"{result['stability_draws']} {how} (A: {result['n_a']} tiles, B: {result['n_b']}); "
              f"CV = std / mean over the draws; flow fitted once on all of A. \"mean / all tiles\" is the mean "
              f"over the draws divided by the metric on the whole pools: its sample-size bias."]
    for case in result["stability"]:
        lines += ["", f"### A vs {_case_name(case)} (all tiles: RL2 {case['rl2_full']:.4f}, FD {case['fd_full']:.2f})",
                  "", "| n | RL2 mean | RL2 CV % | RL2 mean / all tiles | FD mean | FD CV % | FD mean / all tiles |",
                  "|---|---|---|---|---|---|---|"]
        for n, r in case["sizes"].items():
            lines.append(f"| {n} | {r['rl2_mean']:.4f} | {100 * r['rl2_cv']:.2f} | {r['rl2_mean'] / case['rl2_full']:.2f} | "
                         f"{r['fd_mean']:.2f} | {100 * r['fd_cv']:.2f} | {r['fd_mean'] / case['fd_full']:.2f} |")
    if result["flow_variants"]:
        names = [_case_name(c) for c in result["stability"]]
        shown = [str(n) for n in result["stability"][0]["sizes"]] if result["stability"] else []
        n = "300" if "300" in shown else (shown[0] if shown else "-")
        lines += ["", "## RL2 under other flow settings (same features and draws; FD does not depend on the flow)", "",
                  "| flow overrides | latent | best epoch / run | RL2 rho per kind | "
                  + " | ".join(f"RL2 CV % at n = {n}, A vs {m}" for m in names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]
        for v in result["flow_variants"]:
            cvs = [f"{100 * rows[n]['rl2_cv']:.2f}" if n in rows else "-"
                   for rows in ({str(k): r for k, r in c.items()} for c in v["stability"])]
            rhos = ", ".join(f"{k} {r:.2f}" for k, r in v["rl2_spearman"].items())
            lines.append(f"| {json.dumps(v['flow'])} | {v['latent_dim']} | {v['best_epoch']} / {v['epochs_run']} | "
                         f"{rhos} | " + " | ".join(cvs) + " |")
    lines += ["", f"Run time {result['seconds']} s; feature cache {result['cache']['folder']} "
              f"({result['cache']['hits']} sets reused, {result['cache']['misses']} encoded)."]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[Path]:
    """monotonicity.png (metric vs level per kind) and stability.png (CV vs n per case)."""
    from matplotlib.figure import Figure

    kinds = list(result["monotonicity"])
    fig = Figure(figsize=(3.6 * len(kinds), 3.4))
    for i, kind in enumerate(kinds):
        r = result["monotonicity"][kind]
        ax = fig.add_subplot(1, len(kinds), i + 1)
        ax.plot(r["levels"], r["rl2"], "o-", color="C0")
        ax.set_title(f"{kind}\nrho RL2 {r['rl2_spearman']:.2f}, FD {r['fd_spearman']:.2f}", fontsize=9)
        ax.set_xlabel("level")
        ax.set_ylabel("RL2", color="C0")
        ax2 = ax.twinx()
        ax2.plot(r["levels"], r["fd"], "s--", color="C1")
        ax2.set_ylabel("Fréchet distance", color="C1")
    fig.tight_layout()
    paths = [out / "monotonicity.png"]
    fig.savefig(paths[-1], dpi=100)

    cases = result["stability"]
    fig = Figure(figsize=(4.6 * max(1, len(cases)), 3.6))
    for i, case in enumerate(cases):
        ax = fig.add_subplot(1, max(1, len(cases)), i + 1)
        ns = list(case["sizes"])
        ax.plot(ns, [100 * case["sizes"][n]["rl2_cv"] for n in ns], "o-", label="RL2")
        ax.plot(ns, [100 * case["sizes"][n]["fd_cv"] for n in ns], "s--", label="Fréchet distance")
        ax.axhline(5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"A vs {_case_name(case)}", fontsize=9)
        ax.set_xlabel("tiles per set (n)")
        ax.set_ylabel("coefficient of variation %")
        ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    paths.append(out / "stability.png")
    fig.savefig(paths[-1], dpi=100)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="study YAML (wsi-qc keys + a study section)")
    parser.add_argument("--out", default="out/degradation", help="folder for study.md, study.json, plots and caches")
    parser.add_argument("--encoder", help="override encoder.name (with --weights)")
    parser.add_argument("--weights", help="override encoder.weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, study = split_config(Path(args.config))
        if args.encoder:
            config["encoder"]["name"] = args.encoder
        if args.weights:
            config["encoder"]["weights"] = args.weights
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = run_study(config, study, out)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    write_study(result, out, markdown, plots)
    return 0


def write_study(result: dict, out: Path, render, draw) -> None:
    """study.json, study.md (render(result)) and the plots (draw(result, out)) of a study; print the table."""
    (out / "study.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "study.md").write_text(render(result))
    paths = draw(result, out)
    print(render(result))
    print(f"-> {out / 'study.md'}, {out / 'study.json'}, {', '.join(map(str, paths))}")


if __name__ == "__main__":
    raise SystemExit(main())
