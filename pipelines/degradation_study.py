"""The paper's RL2 studies on real tissue tiles: monotonicity under five degradations, sample-size stability.

For every kind and level, RL2 (flow fitted on set A) and the Fréchet distance (FID's formula, same
features) are computed between clean set A and degraded set B; Spearman's rho of each metric with the
level says whether it is monotonic. Stability: coefficient of variation of both metrics over random
draws of n tiles per set. Writes study.md (tables), study.json and PNG plots into --out.

    python -m pipelines.degradation_study --out out/degradation [--config configs/degradation_study.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

from wsi_qc.artifacts import LEVELS, degrade
from wsi_qc.config import load_config
from wsi_qc.data import write_example_slide
from wsi_qc.rl2 import frechet_distance, set_rl2
from wsi_qc.scorer import Scorer, batches, encode, encoder_from_config
from wsi_qc.slide import Slide
from wsi_qc.tiles import iter_tile_batches, tile_slide

log = logging.getLogger("pipelines.degradation_study")
ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = ROOT.parent / "shared" / "data" / "slides"
DEFAULT_CONFIG = ROOT / "configs" / "degradation_study.yaml"


def split_config(path: Path) -> tuple[dict, dict]:
    """(wsi-qc config, study section) of a study YAML."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    study = data.pop("study", {})
    return load_config(overrides=data), study


def study_slides(study: dict, out: Path) -> list[tuple[Path, float | None]]:
    """(slide path, mpp override) pairs: configured, shared real slides, or generated examples."""
    if study.get("slides"):
        paths = [p for s in study["slides"] for p in (sorted(Path(s).iterdir()) if Path(s).is_dir() else [Path(s)])]
    elif SHARED_SLIDES.is_dir():
        paths = sorted(SHARED_SLIDES.iterdir())
    else:
        out.mkdir(parents=True, exist_ok=True)
        paths = [write_example_slide(out / f"example-{i}.tif", size=(6144, 6144), seed=i) for i in range(3)]
    overrides = study.get("slide_mpp") or {}
    return [(p, overrides.get(p.name)) for p in paths]


def real_tiles(slides: list[tuple[Path, float | None]], config: dict) -> tuple[np.ndarray, list[str]]:
    """All tissue tiles of the slides that open, uint8 (N, size, size, 3); unreadable slides are skipped."""
    parts, used = [], []
    for path, mpp in slides:
        try:
            with Slide(path, mpp=mpp) as slide:
                tiles = tile_slide(slide, config)[-1]
                images = np.zeros((len(tiles.coords), tiles.size, tiles.size, 3), np.uint8)
                for index, batch in iter_tile_batches(slide.path, tiles, batch_size=64, workers=0, slide_mpp=slide.mpp):
                    images[index] = batch
        except Exception as exc:  # a study over what is readable: report and go on
            log.warning("skipping %s: %s", path.name, exc)
            continue
        parts.append(images)
        used.append(f"{path.name} ({len(images)} tiles)")
    if not parts:
        raise SystemExit("no readable slide gave tiles; pass study.slides")
    return np.concatenate(parts), used


def monotonicity(features_a, latent_a, encoder, scorer, images_b, rng, batch_size) -> dict:
    """RL2 and Fréchet distance between A and degraded B for every kind and level."""
    rows = {}
    for kind, levels in LEVELS.items():
        rl2, fd = [], []
        for level in levels:
            degraded = degrade(images_b, kind, level, np.random.default_rng(rng.integers(1 << 31)))
            feats = encode(encoder, batches(degraded, batch_size), len(degraded), desc=f"{kind} {level}")
            rl2.append(set_rl2(latent_a, scorer.latent(feats)))
            fd.append(frechet_distance(features_a, feats))
            log.info("%s level %s: RL2 %.4f FD %.2f", kind, level, rl2[-1], fd[-1])
        rows[kind] = {"levels": list(map(float, levels)), "rl2": rl2, "fd": fd,
                      "rl2_spearman": float(spearmanr(levels, rl2).statistic),
                      "fd_spearman": float(spearmanr(levels, fd).statistic)}
    return rows


def stability(features_a, features_b, scorer, sizes, draws, rng) -> dict:
    """Coefficient of variation of RL2 and FD over random draws of n tiles from each set (without replacement)."""
    za, zb = scorer.latent(features_a), scorer.latent(features_b)
    out = {}
    for n in sizes:
        if n > min(len(features_a), len(features_b)):
            continue
        rl2, fd = [], []
        for _ in range(draws):
            ia = rng.choice(len(features_a), n, replace=False)
            ib = rng.choice(len(features_b), n, replace=False)
            rl2.append(set_rl2(za[ia], zb[ib]))
            fd.append(frechet_distance(features_a[ia], features_b[ib]))
        out[n] = {"rl2_mean": float(np.mean(rl2)), "rl2_cv": float(np.std(rl2) / np.mean(rl2)),
                  "fd_mean": float(np.mean(fd)), "fd_cv": float(np.std(fd) / np.mean(fd))}
    return out


def markdown(result: dict) -> str:
    lines = [f"# RL2 degradation study ({result['encoder']})", "",
             f"Tiles: {result['n_a']} reference (set A), {result['n_b']} degraded (set B) from "
             f"{', '.join(result['slides'])}; {result['tile_size']} px at {result['tile_mpp']} mpp.", "",
             "## Monotonicity (Spearman's rho of the metric with the level; 1.0 = monotonic)", "",
             "| kind | levels | RL2 values | RL2 rho | FD values | FD rho |", "|---|---|---|---|---|---|"]
    for kind, r in result["monotonicity"].items():
        lines.append(f"| {kind} | {', '.join(f'{v:g}' for v in r['levels'])} | "
                     f"{', '.join(f'{v:.3f}' for v in r['rl2'])} | {r['rl2_spearman']:.3f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['fd'])} | {r['fd_spearman']:.3f} |")
    s = result["stability_case"]
    lines += ["", f"## Sample-size stability (A vs B degraded by {s['kind']} level {s['level']}, "
              f"{result['stability_draws']} draws per n)", "",
              "| n | RL2 mean | RL2 CV % | FD mean | FD CV % |", "|---|---|---|---|---|"]
    for n, r in result["stability"].items():
        lines.append(f"| {n} | {r['rl2_mean']:.4f} | {100 * r['rl2_cv']:.2f} | {r['fd_mean']:.2f} | "
                     f"{100 * r['fd_cv']:.2f} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    kinds = list(result["monotonicity"])
    fig = Figure(figsize=(4 * len(kinds), 3.4))
    for i, kind in enumerate(kinds):
        r = result["monotonicity"][kind]
        ax = fig.add_subplot(1, len(kinds), i + 1)
        ax.plot(r["levels"], r["rl2"], "o-", color="C0", label="RL2")
        ax.set_title(kind)
        ax.set_xlabel("level")
        ax.set_ylabel("RL2", color="C0")
        ax2 = ax.twinx()
        ax2.plot(r["levels"], r["fd"], "s--", color="C1", label="FD")
        ax2.set_ylabel("Fréchet distance", color="C1")
    fig.tight_layout()
    fig.savefig(out / "monotonicity.png", dpi=110)
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    ns = list(result["stability"])
    ax.plot(ns, [100 * result["stability"][n]["rl2_cv"] for n in ns], "o-", label="RL2")
    ax.plot(ns, [100 * result["stability"][n]["fd_cv"] for n in ns], "s--", label="Fréchet distance")
    ax.axhline(5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("tiles per set (n)")
    ax.set_ylabel("coefficient of variation %")
    ax.set_xscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="study YAML (wsi-qc keys + a study section)")
    parser.add_argument("--out", default="out/degradation", help="folder for study.md, study.json and plots")
    parser.add_argument("--encoder", help="override encoder.name (with --weights)")
    parser.add_argument("--weights", help="override encoder.weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, study = split_config(Path(args.config))
    if args.encoder:
        config["encoder"]["name"] = args.encoder
    if args.weights:
        config["encoder"]["weights"] = args.weights
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_study(config, study, out)
    (out / "study.json").write_text(json.dumps(result, indent=2))
    (out / "study.md").write_text(markdown(result))
    plots(result, out)
    print(markdown(result))
    print(f"-> {out / 'study.md'}, {out / 'monotonicity.png'}, {out / 'stability.png'}")
    return 0


def run_study(config: dict, study: dict, out: Path, encoder=None) -> dict:
    """Both studies with one encoder; returns the result dict that markdown() and plots() render."""
    rng = np.random.default_rng(study["seed"])
    start = time.perf_counter()
    images, used = real_tiles(study_slides(study, out / "slides"), config)
    images = images[rng.permutation(len(images))[: study["max_tiles"]]]
    half = len(images) // 2
    images_a, images_b = images[:half], images[half:]
    encoder = encoder or encoder_from_config(config)
    bs = config["tiles"]["batch_size"]
    features_a = encode(encoder, batches(images_a, bs), len(images_a), desc="set A")
    scorer = Scorer.fit(features_a, encoder, config)
    latent_a = scorer.latent(features_a)
    subset_b = images_b[: study["n_degraded"]]
    mono = monotonicity(features_a, latent_a, encoder, scorer, subset_b, rng, bs)
    kind, level = study["stability_kind"], study["stability_level"]
    degraded_b = degrade(images_b, kind, LEVELS[kind][level], np.random.default_rng(study["seed"]))
    features_b = encode(encoder, batches(degraded_b, bs), len(degraded_b), desc="set B stability")
    stab = stability(features_a, features_b, scorer, study["stability_sizes"], study["stability_draws"], rng)
    return {"encoder": config["encoder"]["name"], "slides": used, "n_a": len(images_a), "n_b": len(subset_b),
            "tile_size": config["tiles"]["size"], "tile_mpp": config["tiles"]["mpp"], "monotonicity": mono,
            "stability_case": {"kind": kind, "level": float(LEVELS[kind][level])},
            "stability_draws": study["stability_draws"], "stability": stab,
            "seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
