"""Nuclei from frozen encoders (issue 21, after Vadori et al., "Mind the Gap"): encoders x levels.

For every row of the config (encoder, its weights or a random initialisation, the stages used), one decoder is
trained on MoNuSeg's training images minus the held-out organs, CPM-15 and CoNSeP train (type head from CoNSeP's
types; the encoder frozen), then tested on the held-out MoNuSeg images (organs unseen in training) and on CoNSeP
test (type F1 as HoVer-Net reports it). Metrics are means over images with bootstrap 95 % CIs by image (CoNSeP:
by source image, its tiles' components pooled); each row's AJI and PQ are compared with the default row's by a
paired bootstrap over the same images. Encoder maps are cached per image (study.cache), so reruns only train.

    python -m pipelines.nuclei_study --out out/nuclei_study [--config configs/nuclei_study.yaml] [--steps N]
"""

from __future__ import annotations

import wsi_qc  # noqa: F401  first: it sets OMP_WAIT_POLICY, which OpenMP reads when torch loads

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from wsi_qc.errors import ConfigError
from wsi_qc.nuclei.data import CONSEP_TYPES, read_folder
from wsi_qc.nuclei.model import NucleiModel
from wsi_qc.nuclei.train import evaluate, prepare, train, tune_postprocess

log = logging.getLogger("pipelines.nuclei_study")
ROOT = Path(__file__).resolve().parents[1]
SHARED_NUCLEI = ROOT.parent / "shared" / "data" / "nuclei"
DEFAULT_CONFIG = ROOT / "configs" / "nuclei_study.yaml"
METRICS = ("dice", "aji", "pq", "dq", "sq")


def load_study(path: str | Path = DEFAULT_CONFIG) -> dict:
    with open(path) as fh:
        config = yaml.safe_load(fh)
    if not isinstance(config, dict) or "study" not in config:
        raise ConfigError(f"{path} has no study section; copy configs/nuclei_study.yaml")
    return config["study"]


def split_data(root: Path, held_out_organs: list[str]) -> dict[str, list]:
    """train (MoNuSeg minus held-out organs, CPM-15, CoNSeP train), test_monuseg, test_consep."""
    monuseg = read_folder(root / "monuseg_train")
    held = [s for s in monuseg if any(o in s.meta.get("organ", "") for o in held_out_organs)]
    if not held:
        raise ConfigError(f"no MoNuSeg image of the held-out organs {held_out_organs}; see {root / 'monuseg_train'}")
    held_names = {s.name for s in held}
    train_set = [s for s in monuseg if s.name not in held_names] + read_folder(root / "cpm15") + read_folder(root / "consep", "train")
    return {"train": train_set, "test_monuseg": held, "test_consep": read_folder(root / "consep", "test")}


def paired_diff_ci(a: dict, b: dict, key: str, n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean difference a - b of per-image `key` over the images both have, with a paired bootstrap 95 % CI."""
    images = sorted(set(a) & set(b))
    d = np.array([a[i][key] - b[i][key] for i in images])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _trained(folder: Path, row: dict, study: dict) -> NucleiModel | None:
    """The row's model saved by an earlier run with the same encoder, weights, levels and training, else None."""
    if not (folder / "nuclei.json").is_file():
        return None
    meta = json.loads((folder / "nuclei.json").read_text())
    same = (meta["encoder"]["name"] == row["encoder"] and meta["encoder"]["weights"] == row["weights"]
            and meta["levels"] == sorted(row["levels"]) and meta["mpp"] == study["mpp"]
            and all(meta.get("training", {}).get(k) == v for k, v in study["train"].items()))
    return NucleiModel.load(folder) if same else None


def tuning_items(train_items: list) -> dict[str, list]:
    """Per test set, the training images of the same data set its watershed thresholds are picked on: 8 MoNuSeg
    training images for the MoNuSeg test, every 10th CoNSeP train tile for the CoNSeP test."""
    return {"test_monuseg": [it for it in train_items if it.sample.name.startswith("TCGA-")][:8],
            "test_consep": [it for it in train_items if it.sample.name.startswith("train_")][::10]}


def run_row(row: dict, data: dict, study: dict, cache: Path, out: Path) -> dict:
    """Train one decoder (saved to out/models/<row>; reused by a rerun with the same settings), evaluate it on
    both test sets."""
    from wsi_qc.nuclei.network import FrozenEncoder

    torch.set_num_threads(study["train"]["threads"])
    start = time.perf_counter()
    # the cache holds all four stages of the encoder once; every row of that encoder slices its levels
    frozen = FrozenEncoder(row["encoder"], row["weights"], [0, 1, 2, 3])
    prepared = {k: prepare(v, frozen, study["mpp"], cache, progress=True) for k, v in data.items()}
    t_maps = time.perf_counter() - start
    folder = out / "models" / "".join(c if c.isalnum() else "-" for c in row["name"]).strip("-")
    model = _trained(folder, row, study)
    if model is None:
        model = NucleiModel.create(row["encoder"], row["weights"], row["levels"], n_types=len(CONSEP_TYPES),
                                   type_names=CONSEP_TYPES, mpp=study["mpp"], tile_size=study["train"]["crop"],
                                   seed=study["train"]["seed"])
        train(model, prepared["train"], **{k: study["train"][k] for k in
                                           ("steps", "batch_size", "crop", "lr", "seed", "threads")})
    t = model.meta["training"]
    result = {"row": row, "model": str(folder), "maps_seconds": round(t_maps, 1), "train_seconds": t["seconds"],
              "loss_first": t["loss_first"], "loss_last": t["loss_last"]}
    for key, items in tuning_items(prepared["train"]).items():  # the saved model keeps MoNuSeg's thresholds
        tuned = tune_postprocess(model, items)
        result[key] = {**evaluate(model, prepared[key]), "postprocess": dict(model.postprocess),
                       "tuning": {f"marker {k[0]} fg {k[1]}": v for k, v in tuned.items()}}
        if key == "test_monuseg":
            model.save(folder)
    return result


def fmt(r: dict, key: str) -> str:
    lo, hi = r[f"{key}_ci"]
    return f"{r[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def table(results: list[dict], not_run: list[str], study: dict) -> str:
    pub = study["published"]
    head = ("| encoder (frozen) | levels | MoNuSeg held-out Dice | AJI | PQ | CoNSeP test Dice | AJI | PQ | "
            "F1 det | F1 infl. | F1 epi. | F1 spindle | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        m, c = r["test_monuseg"], r["test_consep"]
        f1 = c.get("f1_type", {})
        lines.append(f"| {r['row']['name']} | {r['row']['levels']} | {fmt(m, 'dice')} | {fmt(m, 'aji')} | "
                     f"{fmt(m, 'pq')} | {fmt(c, 'dice')} | {fmt(c, 'aji')} | {fmt(c, 'pq')} | "
                     f"{c.get('f1_detection', float('nan')):.3f} | {f1.get(2, float('nan')):.3f} | "
                     f"{f1.get(3, float('nan')):.3f} | {f1.get(4, float('nan')):.3f} | {r['train_seconds']:.0f} |")
    for name in not_run:
        lines.append(f"| {name} | not run | | | | | | | | | | | |")
    k, c = pub["kumar"], pub["consep"]
    lines.append(f"| HoVer-Net (published, end to end, its own Kumar split) | - | {k['dice']} | {k['aji']} | {k['pq']} | "
                 f"{c['dice']} | {c['aji']} | {c['pq']} | | | | | |")
    return "\n".join(lines)


def contrasts(results: list[dict], n: int) -> list[str]:
    """Paired differences of each row against the first (default) row, per test set, AJI and PQ."""
    if len(results) < 2:
        return []
    base, lines = results[0], []
    for r in results[1:]:
        parts = []
        for key, label in (("test_monuseg", "MoNuSeg"), ("test_consep", "CoNSeP")):
            for metric in ("aji", "pq"):
                d, lo, hi = paired_diff_ci(base[key]["per_image"], r[key]["per_image"], metric, n)
                parts.append(f"{label} {metric.upper()} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"{base['row']['name']} minus {r['row']['name']}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/nuclei_study")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--data", help="the nuclei data folder (default study.data or ../shared/data/nuclei)")
    parser.add_argument("--steps", type=int, help="training steps per row (overrides study.train.steps)")
    parser.add_argument("--only", nargs="+", help="row names to run (overrides study.only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        study = copy.deepcopy(load_study(args.config))
        if args.steps:
            study["train"]["steps"] = args.steps
        root = Path(args.data or study.get("data") or SHARED_NUCLEI)
        if not (root / "monuseg_train").is_dir():
            raise ConfigError(f"nuclei data not found at {root} (needs monuseg_train, cpm15, consep); pass --data")
        only = args.only or study.get("only")
        rows = [r for r in study["rows"] if not only or r["name"] in only]
        not_run = [r["name"] for r in study["rows"] if r not in rows]
        data = split_data(root, study["held_out_organs"])
    except ConfigError as exc:
        print(f"nuclei_study: error: {exc}", file=sys.stderr)
        return 2
    print(f"train {len(data['train'])} images (MoNuSeg minus {', '.join(study['held_out_organs'])}, CPM-15, CoNSeP "
          f"train tiles); test {len(data['test_monuseg'])} MoNuSeg images, {len(data['test_consep'])} CoNSeP tiles")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = ROOT / study["cache"] if not Path(study["cache"]).is_absolute() else Path(study["cache"])
    results = []
    for row in rows:
        results.append(run_row(row, data, study, cache, out))
        r = results[-1]
        print(f"{row['name']}: MoNuSeg AJI {r['test_monuseg']['aji']:.3f} PQ {r['test_monuseg']['pq']:.3f}; CoNSeP "
              f"AJI {r['test_consep']['aji']:.3f} PQ {r['test_consep']['pq']:.3f} (train {r['train_seconds']:.0f} s)",
              flush=True)
        (out / "study.json").write_text(json.dumps({"study": study, "results": results}, indent=1, default=str))
    text = table(results, not_run, study)
    diffs = contrasts(results, study["n_bootstrap"])
    print(text)
    for line in diffs:
        print(line)
    (out / "study.md").write_text(text + "\n\n" + "\n".join(diffs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
