"""Encoder comparison (issue 6): QC AUC, RL2 monotonicity and stability, speed and size of every encoder.

For every encoder of the catalogue (wsi_qc/configs/encoders) whose weights are on this machine:

1. labelled calibration sets (wsi_qc.calibration_set: clean reference tiles, clean and synthetic
   artifact calibration tiles) from real slides plus generated example slides, one per seed;
2. every tile is encoded once with all the study's stages (multi-level features) and once with the last
   layer (the model's own pooled head); cheap image statistics (wsi_qc.encoder.IMAGE_STATS) are computed
   once; features are cached on disk (features/<encoder>.npz, keyed by the tile's bytes), so reruns are quick;
3. feature variants are sliced from those columns (`Encoder.level_slices`): the last layer, each stage,
   the first k stages concatenated, each with and without the image statistics, and the statistics alone;
4. for each variant and seed a flow is fitted on the reference tiles and both scores (rl2, nll) of the
   calibration tiles give the QC AUC with its bootstrap 95 % CI and the AUC per artifact type;
5. for the best variant of each encoder: RL2 monotonicity on the degradation suite (Spearman's rho over the
   levels of blur, noise, salt-and-pepper, rectangles, diffusion) and RL2 stability (coefficient of
   variation over random draws of n tiles per set), via pipelines/degradation_study;
6. for the best variant overall: a small ablation of the flow (PCA dimension, blocks, subnet width).

Encoders without weights here are listed as "no weights" and never run or ranked; an encoder given with
weights "random" (tests of shape and plumbing) is run and marked "no weights (random)", never ranked.
Writes study.md (tables), study.json and PNG plots into --out.

    python -m pipelines.encoder_study --out out/encoder_study [--config configs/encoder_study.yaml]
"""

from __future__ import annotations

import wsi_qc  # noqa: F401  first: it sets OMP_WAIT_POLICY, which OpenMP reads when torch loads

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from pipelines import degradation_study
from wsi_qc import calibration_set, encoder as encoder_code, image_stats as image_stats_code
from wsi_qc.calibrate import per_artifact_auc, read_labels
from wsi_qc.catalogue import encoder_config, load_catalogue, weights_available
from wsi_qc.config import load_config
from wsi_qc.data import write_example_slide
from wsi_qc.image_stats import IMAGE_STATS, image_statistics, rgb_tensor
from wsi_qc.errors import ConfigError
from wsi_qc.flow import Flow
from wsi_qc.identity import Digest, code_digest
from wsi_qc.scorer import batches, encode, encoder_from_config, read_tile_images
from wsi_qc.threshold import bootstrap_auc_ci

log = logging.getLogger("pipelines.encoder_study")
ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = ROOT.parent / "shared" / "data" / "slides"
DEFAULT_CONFIG = ROOT / "configs" / "encoder_study.yaml"
SCORE_KINDS = ("rl2", "nll")
COLUMNS = ("rank", "encoder", "weights", "best variant", "dim", "QC AUC seed 0 [95 % CI]", "QC AUC seed 1",
           "AUC last layer", "RL2 rho (mean)", "RL2 CV % n=300", "tiles/s", "params M", "memory MB")


def split_config(path: Path) -> tuple[dict, dict]:
    """(wsi-qc config, study section) of a study YAML."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    study = data.pop("study", None) or {}
    return load_config(overrides=data), study


# ---- data --------------------------------------------------------------------------------------

def study_slides(study: dict, out: Path) -> list[Path]:
    """Real slides (study.slides, else ../shared/data/slides) plus generated example slides."""
    given = study.get("slides")
    paths: list[Path] = []
    if given:
        paths = [p for s in given for p in (sorted(Path(s).iterdir()) if Path(s).is_dir() else [Path(s)])]
    elif SHARED_SLIDES.is_dir():
        paths = sorted(p for p in SHARED_SLIDES.iterdir() if p.is_file())
    folder = out / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(int(study["example_slides"])):
        path = folder / f"example-{i}.tif"
        if not path.exists():
            side = int(study["example_size"])
            write_example_slide(path, size=(side, side), mpp=0.25, seed=i)
        paths.append(path)
    return paths


def calibration_sets(config: dict, study: dict, slides: list[Path], out: Path) -> dict[int, Path]:
    """Seed -> folder of a labelled calibration set (built once, reused when its labels.csv exists)."""
    if study.get("calibration_sets"):
        return {i: Path(p) for i, p in enumerate(study["calibration_sets"])}
    config = copy.deepcopy(config)  # the study's tiles and tissue settings; no overlap between source tiles
    config["tiles"]["overlap"] = 0
    own = calibration_set.read_config(None)[1]
    unknown = sorted(set(study.get("calibration") or {}) - set(own))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in study.calibration; known: {', '.join(own)}")
    own.update(study.get("calibration") or {})
    sets = {}
    for seed in study["seeds"]:
        folder = out / "data" / f"seed{seed}"
        if not (folder / "labels.csv").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            summary = calibration_set.build(slides, config, {**own, "seed": seed}, folder, int(own["n_clean"]),
                                            int(seed))
            (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        sets[seed] = folder
    return sets


def load_set(folder: Path, size: int) -> dict:
    """Reference and calibration images of a calibration set, with the calibration label table."""
    table = pd.read_csv(folder / "labels.csv")
    reference = [str(folder / p) for p in table.loc[table["split"] == "reference", "path"]]
    calibration = read_labels(folder / "labels.csv")
    summary = folder / "summary.json"
    return {"reference": read_tile_images(reference, size), "calibration": read_tile_images(calibration["path"], size),
            "table": calibration, "summary": json.loads(summary.read_text()) if summary.is_file() else {}}


# ---- features ----------------------------------------------------------------------------------

def _key(image: np.ndarray) -> str:
    """A tile's row key in a FeatureCache: 40 hex digits of the sha256 of its bytes."""
    return Digest().array(image).hex(40)


def stats_of(images: np.ndarray) -> np.ndarray:
    """The study's "stats" block: IMAGE_STATS (N, len(IMAGE_STATS)) float32 of uint8 tiles (N, H, W, 3)."""
    with torch.inference_mode():
        return image_statistics(rgb_tensor(images)).numpy()


class FeatureCache:
    """A feature function (encoder or image statistics) memoised by tile bytes (_key), stored in one npz file that
    is used only under the same `identity` (the encoder's weights digest, name, levels, pooling and the source of
    the feature code, see study_encoder; the statistics' names and code for the stats cache)."""

    def __init__(self, func, dim: int, path: Path, identity: str):
        self.func, self.dim, self.path, self.identity = func, dim, Path(path), identity
        self.rows: dict[str, np.ndarray] = {}
        self.seconds, self.encoded = 0.0, 0
        if self.path.is_file():
            data = np.load(self.path)
            if str(data["identity"]) == identity and data["features"].shape[1] == dim:
                self.rows = {str(k): f for k, f in zip(data["keys"], data["features"])}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        keys = [_key(im) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        if missing:
            start = time.perf_counter()
            new = self.func(images[missing])
            self.seconds += time.perf_counter() - start
            self.encoded += len(missing)
            for i, f in zip(missing, new):
                self.rows[keys[i]] = f
        return np.stack([self.rows[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)

    def save(self) -> None:
        keys = np.array(list(self.rows), dtype="U40")
        feats = np.stack(list(self.rows.values())) if self.rows else np.zeros((0, self.dim), np.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(self.path, keys=keys, features=feats, identity=np.array(self.identity))


class Blocks:
    """Named feature blocks of one encoder: "last", one per stage ("L<i>") and "stats"."""

    def __init__(self, multi, last, stats: FeatureCache, multi_cache: FeatureCache, last_cache: FeatureCache):
        self.caches = {"multi": multi_cache, "last": last_cache, "stats": stats}
        self.slices = {f"L{lv}": s for lv, s in multi.level_slices.items()}
        self.dims = {"last": last.dim, "stats": len(IMAGE_STATS),
                     **{k: s.stop - s.start for k, s in self.slices.items()}}

    def matrices(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Block name -> (N, d) features of the images (each cache looked up once)."""
        need = {"multi" if n in self.slices else n for n in names}
        full = {c: self.caches[c](images) for c in need}
        return {n: full["multi"][:, self.slices[n]] if n in self.slices else full[n] for n in names}

    def __call__(self, images: np.ndarray, names: list[str]) -> np.ndarray:
        m = self.matrices(images, names)
        return np.concatenate([m[n] for n in names], axis=1)

    def save(self) -> None:
        for cache in self.caches.values():
            cache.save()


class VariantFeatures:
    """The encoder interface for one variant (dim, meta, call), so degradation_study can run with it."""

    def __init__(self, blocks: Blocks, names: list[str], encoder, label: str):
        self.blocks, self.names = blocks, names
        self.dim = sum(blocks.dims[n] for n in names)
        self.name = f"{encoder.name} {label}"
        self.weights, self.precision = encoder.weights, encoder.precision
        self._meta = {**encoder.meta(), "variant": names, "dim": self.dim}

    def meta(self) -> dict:
        return self._meta

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.blocks(images, self.names)


def variants(levels: list[int]) -> dict[str, list[str]]:
    """Variant name -> feature blocks: last layer, each stage, first-k stage prefixes; +stats; stats alone."""
    out = {"last": ["last"], "last+stats": ["last", "stats"]}
    for lv in levels:
        out[f"L{lv}"] = [f"L{lv}"]
    for k in range(2, len(levels) + 1):
        names = [f"L{lv}" for lv in levels[:k]]
        label = f"L{levels[0]}-{levels[k - 1]}"
        out[label] = names
        out[f"{label}+stats"] = [*names, "stats"]
    out["stats"] = ["stats"]
    return out


def throughput(encoder, images: np.ndarray, batch_size: int, n_batches: int = 3) -> float:
    """Tiles per second of the encoder on in-memory tiles, after one warm-up batch."""
    images = images[: batch_size * (n_batches + 1)]
    encoder(images[:batch_size])
    rest = images[batch_size:]
    if not len(rest):
        return float("nan")
    start = time.perf_counter()
    for _, batch in batches(rest, batch_size):
        encoder(batch)
    return len(rest) / (time.perf_counter() - start)


def model_size(encoder) -> tuple[float, float]:
    """(parameters in millions, parameter + buffer memory in MB) of an encoder's network."""
    params = sum(p.numel() for p in encoder.model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in [*encoder.model.parameters(), *encoder.model.buffers()])
    return params / 1e6, nbytes / 2**20


# ---- evaluation --------------------------------------------------------------------------------

def fit_flow(features: np.ndarray, flow_params: dict) -> Flow:
    """A flow fitted on one torch thread: the tiny batches of a few hundred tiles run slower on more threads
    of a busy CPU (measured: 20 epochs 38 s on 2 threads vs 0.6 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Flow(**flow_params).fit(features)
    finally:
        torch.set_num_threads(threads)


def qc_auc(flow: Flow, features: np.ndarray, table: pd.DataFrame, n_bootstrap: int, seed: int) -> dict:
    """AUC (with CI) and per-artifact AUC of both scores of labelled features."""
    labels = table["label"].to_numpy()
    z = flow.transform(features)
    scores = {"rl2": np.sqrt(((z - flow.mu_) ** 2).mean(1)), "nll": flow.nll(features)}
    out = {}
    for kind in SCORE_KINDS:
        s = scores[kind]
        lo, hi = bootstrap_auc_ci(s, labels, n_bootstrap=n_bootstrap, seed=seed)
        out[kind] = {"auc": float(roc_auc_score(labels, s)), "ci": [lo, hi], "per_artifact": per_artifact_auc(s, table)}
    return out


def _stack(mats: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([mats[n] for n in names], axis=1)


def evaluate_variants(mats: dict[int, dict], names: dict[str, list[str]], sets: dict[int, dict], flow_params: dict,
                      n_bootstrap: int, label: str) -> dict:
    """variant -> {dim, seeds: {seed: qc_auc}, mean: {kind: mean AUC over seeds}}.

    mats[seed][part][block]: features of the set's reference / calibration tiles per block.
    """
    results = {}
    for variant, blk in tqdm(names.items(), desc=f"{label} variants", unit="variant", disable=None):
        seeds = {}
        for seed, data in sets.items():
            flow = fit_flow(_stack(mats[seed]["reference"], blk), flow_params)
            seeds[seed] = qc_auc(flow, _stack(mats[seed]["calibration"], blk), data["table"], n_bootstrap, seed)
            seeds[seed]["latent_dim"] = int(flow.latent_dim_)
        mean = {k: float(np.mean([s[k]["auc"] for s in seeds.values()])) for k in SCORE_KINDS}
        dim = _stack(mats[next(iter(mats))]["reference"], blk).shape[1]
        results[variant] = {"blocks": blk, "dim": int(dim), "seeds": seeds, "mean": mean}
        log.info("%s %s: AUC rl2 %.3f nll %.3f", label, variant, mean["rl2"], mean["nll"])
    return results


def best_of(results: dict) -> tuple[str, str, float]:
    """(variant, score kind, mean AUC) with the highest mean AUC over seeds."""
    return max(((v, k, r["mean"][k]) for v, r in results.items() for k in SCORE_KINDS), key=lambda t: t[2])


def rl2_studies(features: VariantFeatures, slides: list[Path], config: dict, study: dict, out: Path) -> dict:
    """RL2 monotonicity and stability with one variant's features (pipelines/degradation_study.run_study)."""
    deg = {**degradation_study.STUDY_DEFAULTS, "slides": [str(p) for p in slides],
           "slide_mpp": study.get("slide_mpp") or {}, "min_tiles": study["rl2_tiles"],
           "max_tiles": study["rl2_tiles"], "example_slides": {"max": 0, "size": 8192, "mpp": 0.5},
           "n_degraded": study["n_degraded"], "stability_sizes": study["stability_sizes"],
           "stability_draws": study["stability_draws"], "stability_cases": [study["stability_case"]],
           "seed": study["rl2_seed"]}
    pool_config = copy.deepcopy(config)
    pool_config["tiles"]["min_tissue"] = study["rl2_min_tissue"]
    result = degradation_study.run_study(pool_config, deg, out / "rl2", encoder=features)
    sizes = result["stability"][0]["sizes"]
    cv = {str(n): r["rl2_cv"] for n, r in sizes.items()}
    return {"monotonicity": result["monotonicity"], "stability_cv": cv,
            "rho_mean": float(np.nanmean([r["rl2_spearman"] for r in result["monotonicity"].values()])),
            "stability_case": study["stability_case"], "n_a": result["n_a"], "n_b": result["n_b"]}


def flow_ablation(mats: dict[int, dict], blk: list[str], sets: dict[int, dict], config: dict,
                  study: dict) -> list[dict]:
    """QC AUC of the best variant under other flow parameters (PCA dimension, blocks, width)."""
    rows = []
    for change in [{}, *study["flow_grid"]]:
        params = {**config["flow"], **change}
        seeds = {}
        for seed, data in sets.items():
            flow = fit_flow(_stack(mats[seed]["reference"], blk), params)
            res = qc_auc(flow, _stack(mats[seed]["calibration"], blk), data["table"], 0, seed)
            seeds[seed] = {k: res[k]["auc"] for k in SCORE_KINDS} | {"latent_dim": int(flow.latent_dim_)}
        rows.append({"change": change or "config", "seeds": seeds,
                     "mean": {k: float(np.mean([s[k] for s in seeds.values()])) for k in SCORE_KINDS}})
        log.info("flow %s: %s", change or "config", rows[-1]["mean"])
    return rows


# ---- encoders ----------------------------------------------------------------------------------

def encoder_specs(study: dict) -> list[dict]:
    """One spec per encoder to study: catalogue names (with weights status) or ad-hoc mappings."""
    catalogue = load_catalogue()
    names = study["encoders"]
    if names == "all":
        names = list(catalogue)
    specs = []
    for item in names:
        if isinstance(item, dict):  # ad-hoc: {name, timm, weights, levels}; weights "random" = plumbing only
            ok = item.get("weights", "random") != "random"
            specs.append({"name": item["name"], "timm": item["timm"], "weights": item.get("weights", "random"),
                          "levels": list(item["levels"]), "status": "available" if ok else "no weights (random)",
                          "ranked": ok, "run": True})
            continue
        if item not in catalogue:
            raise ConfigError(f"study.encoders names {item!r}, not in the catalogue; known: {', '.join(catalogue)}")
        entry = catalogue[item]
        ok, where = weights_available(entry)
        levels = (study.get("levels") or {}).get(item, entry["levels"])
        specs.append({"name": item, "catalogue": True, "levels": list(levels), "ranked": ok, "run": ok,
                      "status": where if ok else "no weights"})
    return specs


def build_encoders(spec: dict, config: dict):
    """(multi-level encoder, last-layer encoder) of a spec."""
    if spec.get("catalogue"):
        multi = encoder_config(spec["name"], levels=spec["levels"])
        last = encoder_config(spec["name"], levels="last")
    else:
        base = {**config["encoder"], "grid": None, "name": spec["timm"], "weights": spec["weights"], "model_kwargs": {}}
        multi, last = {**base, "levels": spec["levels"]}, {**base, "levels": None}
    # image statistics are a block of their own here (computed once for all encoders)
    return (encoder_from_config({"encoder": {**multi, "image_stats": False}}),
            encoder_from_config({"encoder": {**last, "image_stats": False}}))


def study_encoder(spec: dict, sets: dict[int, dict], slides: list[Path], stats: FeatureCache, config: dict,
                  study: dict, out: Path) -> tuple[dict, dict]:
    """All measurements of one encoder, and its block features of the labelled sets (for the flow ablation)."""
    multi, last = build_encoders(spec, config)
    ident = json.dumps([multi.meta()["weights_sha256"], multi.name, multi.levels, multi.pooling,
                        code_digest(encoder_code, image_stats_code, n=16)])
    caches = [FeatureCache(enc, enc.dim, out / "features" / f"{spec['name']}-{part}.npz", f"{ident}|{part}")
              for enc, part in ((multi, "multi"), (last, "last"))]
    blocks = Blocks(multi, last, stats, *caches)
    bs = config["tiles"]["batch_size"]
    timing = out / "features" / f"{spec['name']}-timing.json"
    if timing.is_file() and json.loads(timing.read_text()).get("identity") == ident:
        speed = json.loads(timing.read_text())
    else:
        sample = next(iter(sets.values()))["calibration"]
        speed = {"identity": ident, "last": throughput(last, sample, bs), "multi": throughput(multi, sample, bs)}
        timing.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps(speed))
    params_m, memory_mb = model_size(last)
    for data in sets.values():  # encode every labelled tile once per encoder (cached by tile bytes)
        for part in ("reference", "calibration"):
            for cache in blocks.caches.values():
                encode(cache, batches(data[part], bs), len(data[part]), desc=f"{spec['name']} {part}")
    blocks.save()
    names = variants(multi.levels)
    every = list(dict.fromkeys(b for blk in names.values() for b in blk))
    mats = {seed: {part: blocks.matrices(data[part], every) for part in ("reference", "calibration")}
            for seed, data in sets.items()}
    results = evaluate_variants(mats, names, sets, config["flow"], study["n_bootstrap"], spec["name"])
    variant, kind, auc = best_of(results)
    rl2 = None
    if study["rl2_study"]:
        features = VariantFeatures(blocks, results[variant]["blocks"], multi, variant)
        rl2 = rl2_studies(features, slides, config, study, out)
        blocks.save()
    peak = torch.cuda.max_memory_allocated() / 2**20 if multi.device.type == "cuda" else None
    return mats, {"name": spec["name"], "status": spec["status"], "ranked": spec["ranked"], "timm": multi.name,
            "levels": multi.levels, "level_dims": multi.level_dims, "last_dim": last.dim,
            "tiles_per_s": speed["last"], "tiles_per_s_multi": speed["multi"], "params_m": params_m,
            "memory_mb": memory_mb, "cuda_peak_mb": peak, "variants": results,
            "best": {"variant": variant, "kind": kind, "auc": auc}, "rl2": rl2}


# ---- study -------------------------------------------------------------------------------------

def run_study(config: dict, study: dict, out: Path) -> dict:
    """The whole study; returns the result dict that markdown() and plots() render."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    specs = encoder_specs(study)
    slides = study_slides(study, out)
    folders = calibration_sets(config, study, slides, out)
    size = config["tiles"]["size"]
    sets = {seed: load_set(folder, size) for seed, folder in folders.items()}
    stats = FeatureCache(stats_of, len(IMAGE_STATS), out / "features" / "stats.npz",
                         json.dumps([list(IMAGE_STATS), code_digest(image_stats_code, n=16)]))
    encoders, mats = [], {}
    for spec in specs:
        if not spec["run"]:
            encoders.append({"name": spec["name"], "status": spec["status"], "ranked": False})
            continue
        log.info("encoder %s (%s)", spec["name"], spec["status"])
        mats[spec["name"]], result = study_encoder(spec, sets, slides, stats, config, study, out)
        encoders.append(result)
        stats.save()
    ranked = sorted((e for e in encoders if e["ranked"]), key=lambda e: -e["best"]["auc"])
    for i, e in enumerate(ranked):
        e["rank"] = i + 1
    ablation = None
    run = [e for e in encoders if "best" in e]
    if run and study["flow_grid"]:
        top = (ranked or run)[0]
        ablation = {"encoder": top["name"], "variant": top["best"]["variant"],
                    "rows": flow_ablation(mats[top["name"]], top["variants"][top["best"]["variant"]]["blocks"], sets,
                                          config, study)}
    return {"encoders": encoders, "ablation": ablation, "slides": [p.name for p in slides],
            "sets": {str(seed): {"folder": str(folders[seed]), "n_reference": len(d["reference"]),
                                 "n_good": int((d["table"]["label"] == 0).sum()),
                                 "n_bad": int((d["table"]["label"] == 1).sum()),
                                 "per_slide": d["summary"].get("counts", {}).get("per_slide", {})}
                     for seed, d in sets.items()},
            "tile_size": size, "tile_mpp": config["tiles"]["mpp"], "flow": config["flow"],
            "image_stats": list(IMAGE_STATS), "seconds": round(time.perf_counter() - start, 1)}


# ---- output ------------------------------------------------------------------------------------

def _f(v, fmt=".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def main_table(result: dict) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    seeds = list(result["sets"])
    for e in sorted(result["encoders"], key=lambda e: (e.get("rank") or 99, "best" not in e, e["name"])):
        if "best" not in e:
            lines.append(f"| — | {e['name']} | {e['status']} |" + " — |" * (len(COLUMNS) - 3))
            continue
        b = e["best"]
        v = e["variants"][b["variant"]]
        s0 = v["seeds"][int(seeds[0])][b["kind"]]
        s1 = v["seeds"][int(seeds[1])][b["kind"]]["auc"] if len(seeds) > 1 else None
        last = e["variants"]["last"]["mean"]
        rl2 = e["rl2"] or {}
        cv = (rl2.get("stability_cv") or {}).get("300")
        status = "available" if e["ranked"] else e["status"]
        lines.append(
            f"| {e.get('rank', '—')} | {e['name']} | {status} | {b['variant']} ({b['kind']}) | {v['dim']} | "
            f"{s0['auc']:.3f} [{_f(s0['ci'][0])}, {_f(s0['ci'][1])}] | {_f(s1)} | "
            f"{max(last.values()):.3f} | {_f(rl2.get('rho_mean'))} | {_f(None if cv is None else 100 * cv, '.2f')} | "
            f"{_f(e['tiles_per_s'], '.1f')} | {e['params_m']:.2f} | {e['memory_mb']:.1f} |")
    return lines


def markdown(result: dict) -> str:
    seeds = list(result["sets"])
    sets = "; ".join(f"seed {s}: {d['n_reference']} reference, {d['n_good']} good and {d['n_bad']} artifact tiles"
                     for s, d in result["sets"].items())
    lines = ["# Encoder study", "",
             f"Calibration sets ({result['tile_size']} px at {result['tile_mpp']} mpp): {sets}. "
             "QC AUC = mean over seeds of the best (variant, score) of each encoder; CI = bootstrap 95 % on seed "
             f"{seeds[0]}. Tiles/s: last-layer encoder, batch of 64, this machine. RL2 rho: mean Spearman rho of "
             "RL2 with the degradation level over 5 kinds (1 = monotonic); CV: RL2 coefficient of variation at "
             "n = 300 tiles per set. Encoders marked 'no weights' are never ranked.", "", *main_table(result)]
    for e in result["encoders"]:
        if "variants" not in e:
            continue
        kinds = sorted({k for v in e["variants"].values() for s in v["seeds"].values()
                        for k in s["rl2"]["per_artifact"]})
        lines += ["", f"## {e['name']}: feature variants (AUC per seed, rl2 / nll)", "",
                  "| variant | dim | latent | " + " | ".join(f"seed {s} rl2 | seed {s} nll" for s in seeds)
                  + " | mean rl2 | mean nll | " + " | ".join(kinds) + " |",
                  "|" + "---|" * (5 + 2 * len(seeds) + len(kinds))]
        best_kind = e["best"]["kind"]
        for name, v in e["variants"].items():
            per = {k: np.mean([s[best_kind]["per_artifact"].get(k, np.nan) for s in v["seeds"].values()])
                   for k in kinds}
            cells = " | ".join(f"{v['seeds'][int(s)]['rl2']['auc']:.3f} | {v['seeds'][int(s)]['nll']['auc']:.3f}"
                               for s in seeds)
            lines.append(f"| {name} | {v['dim']} | {v['seeds'][int(seeds[0])]['latent_dim']} | {cells} | "
                         f"{v['mean']['rl2']:.3f} | {v['mean']['nll']:.3f} | "
                         + " | ".join(f"{per[k]:.2f}" for k in kinds) + " |")
        lines.append(f"\nPer-artifact AUC columns: {best_kind}, mean over seeds.")
        if e["rl2"]:
            r = e["rl2"]
            lines += ["", f"RL2 with {e['best']['variant']} ({r['n_a']} tiles in A, {r['n_b']} in B): "
                      + "; ".join(f"{k} rho {m['rl2_spearman']:.2f}" for k, m in r["monotonicity"].items())
                      + "; stability CV % " + ", ".join(f"n={n}: {100 * cv:.2f}"
                                                          for n, cv in r["stability_cv"].items())]
    if result["ablation"]:
        a = result["ablation"]
        lines += ["", f"## Flow ablation ({a['encoder']}, {a['variant']})", "",
                  "| flow change | latent | " + " | ".join(f"seed {s} rl2 | seed {s} nll" for s in seeds)
                  + " | mean rl2 | mean nll |", "|" + "---|" * (4 + 2 * len(seeds))]
        for row in a["rows"]:
            change = row["change"] if isinstance(row["change"], str) else ", ".join(
                f"{k}={v}" for k, v in row["change"].items())
            cells = " | ".join(f"{row['seeds'][int(s)]['rl2']:.3f} | {row['seeds'][int(s)]['nll']:.3f}" for s in seeds)
            lines.append(f"| {change} | {row['seeds'][int(seeds[0])]['latent_dim']} | {cells} | "
                         f"{row['mean']['rl2']:.3f} | {row['mean']['nll']:.3f} |")
    lines += ["", f"Study time {result['seconds']} s."]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[Path]:
    """auc_variants.png (mean AUC per variant and encoder) and rl2_monotonicity.png."""
    from matplotlib.figure import Figure

    run = [e for e in result["encoders"] if "variants" in e]
    written = []
    if run:
        names = list(run[0]["variants"])
        fig = Figure(figsize=(max(6, 0.55 * len(names) * len(run)), 4))
        ax = fig.add_subplot()
        width = 0.8 / len(run)
        for i, e in enumerate(run):
            vals = [max(e["variants"][n]["mean"].values()) if n in e["variants"] else np.nan for n in names]
            ax.bar(np.arange(len(names)) + i * width, vals, width, label=e["name"])
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
        ax.set_ylabel("QC AUC (mean over seeds, best score)")
        ax.set_ylim(0.4, 1.0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "auc_variants.png", dpi=110)
        written.append(out / "auc_variants.png")
    with_rl2 = [e for e in run if e.get("rl2")]
    if with_rl2:
        kinds = list(with_rl2[0]["rl2"]["monotonicity"])
        fig = Figure(figsize=(3.2 * len(kinds), 3.2))
        for j, kind in enumerate(kinds):
            ax = fig.add_subplot(1, len(kinds), j + 1)
            for e in with_rl2:
                m = e["rl2"]["monotonicity"][kind]
                ax.plot(m["levels"], m["rl2"], "o-", label=e["name"])
            ax.set_title(kind)
            ax.set_xlabel("level")
        fig.axes[0].set_ylabel("RL2")
        fig.axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "rl2_monotonicity.png", dpi=110)
        written.append(out / "rl2_monotonicity.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="study YAML (wsi-qc keys + a study section)")
    parser.add_argument("--out", default="out/encoder_study", help="folder for study.md, study.json, plots, caches")
    parser.add_argument("--encoders", nargs="+", help="override study.encoders (catalogue names, or all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, study = split_config(Path(args.config))
        if args.encoders:
            study["encoders"] = "all" if args.encoders == ["all"] else args.encoders
        out = Path(args.out)
        result = run_study(config, study, out)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    degradation_study.write_study(result, out, markdown, plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
