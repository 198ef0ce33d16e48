"""Training the decoder on cached frozen-encoder maps, and evaluating a model on labelled samples.

Each sample's encoder maps are computed once (image padded to a multiple of 32) and cached on disk as
float16 (``cache_dir/<encoder key>/<image sha1>.npz``), so a training step is a decoder step only. Crops are
taken at offsets that are multiples of the largest stride, so encoder maps and targets stay aligned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wsi_qc.errors import ConfigError
from wsi_qc.identity import Digest
from wsi_qc.nuclei import metrics
from wsi_qc.nuclei.data import Sample, distance_map, resample, type_map
from wsi_qc.nuclei.model import NucleiModel
from wsi_qc.nuclei.network import PAD, FrozenEncoder, pad_to

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A sample ready for training: padded RGB, encoder maps by level (float16), targets, valid size."""

    sample: Sample
    rgb: np.ndarray            # (Hp, Wp, 3) uint8, padded
    maps: dict[int, np.ndarray]  # level -> (C, Hp / s, Wp / s) float16
    fg: np.ndarray             # (H, W) float32 0/1
    dist: np.ndarray           # (H, W) float32
    types: np.ndarray | None   # (H, W) int64 type per pixel, or None when the sample has no types


def _encoder_key(frozen: FrozenEncoder) -> str:
    """The encoder-maps cache's folder: encoder name, weights sha256 and levels (each image's file inside it is keyed
    by identity.Digest of its padded pixels and shape)."""
    m = frozen.meta()
    return f"{m['name']}-{m['weights_sha256'][:12]}-L{'_'.join(map(str, m['levels']))}"


def prepare(samples: list[Sample], frozen: FrozenEncoder, mpp: float, cache_dir: str | Path | None = None,
            progress: bool = True) -> list[Prepared]:
    """Resample to `mpp`, pad, compute (or read from the cache) the encoder maps, and build the targets."""
    folder = Path(cache_dir) / _encoder_key(frozen) if cache_dir else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for sample in tqdm(samples, desc=f"encoder maps ({frozen.meta()['name']})", disable=not progress, leave=False):
        s = resample(sample, mpp)
        rgb = pad_to(s.image, PAD)
        key = Digest().array(rgb).text(str(rgb.shape)).hex()  # the padded image's pixels and shape
        path = folder / f"{key}.npz" if folder else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                maps = {lv: z[f"l{lv}"] for lv in frozen.levels}
        else:
            found = frozen.maps(frozen.normalise(rgb[None]))
            maps = {lv: m[0].numpy().astype(np.float16) for lv, m in zip(frozen.levels, found)}
            if path is not None:
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, **{f"l{lv}": m for lv, m in maps.items()})
                tmp.replace(path)
        out.append(Prepared(s, rgb, maps, (s.instances > 0).astype(np.float32), distance_map(s.instances),
                            None if s.types is None else type_map(s.instances, s.types).astype(np.int64)))
    return out


def _batch(items: list[Prepared], picks, rng, crop: int, levels: list[int], strides: list[int]):
    step = max(strides)
    rgb, maps, fg, dist, types = [], [[] for _ in levels], [], [], []
    for k in picks:
        it = items[k]
        h, w = it.fg.shape
        y = int(rng.integers(0, (h - crop) // step + 1)) * step
        x = int(rng.integers(0, (w - crop) // step + 1)) * step
        rgb.append(it.rgb[y:y + crop, x:x + crop])
        for j, (lv, s) in enumerate(zip(levels, strides)):
            maps[j].append(it.maps[lv][:, y // s:(y + crop) // s, x // s:(x + crop) // s])
        fg.append(it.fg[y:y + crop, x:x + crop])
        dist.append(it.dist[y:y + crop, x:x + crop])
        t = it.types[y:y + crop, x:x + crop] if it.types is not None else np.full((crop, crop), -100, np.int64)
        types.append(t)
    rgb_t = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float().div_(255)
    maps_t = [torch.from_numpy(np.stack(m).astype(np.float32)) for m in maps]
    return rgb_t, maps_t, torch.from_numpy(np.stack(fg)), torch.from_numpy(np.stack(dist)), torch.from_numpy(np.stack(types))


def loss_terms(out: torch.Tensor, fg: torch.Tensor, dist: torch.Tensor, types: torch.Tensor, n_types: int) -> dict:
    """BCE + soft Dice on foreground, MSE on the distance map, cross-entropy of types on typed nucleus pixels."""
    logit = out[:, 0]
    prob = torch.sigmoid(logit)
    terms = {"bce": F.binary_cross_entropy_with_logits(logit, fg),
             "dice": 1 - (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1),
             "dist": 2 * F.mse_loss(torch.sigmoid(out[:, 1]), dist)}
    if n_types:
        if (types >= 0).any():  # every pixel of typed samples (0 = background); untyped samples are -100
            terms["type"] = F.cross_entropy(out[:, 2:], types, ignore_index=-100)
    return terms


def train(model: NucleiModel, items: list[Prepared], steps: int = 1500, batch_size: int = 8, crop: int = 128,
          lr: float = 2e-3, seed: int = 0, threads: int = 2, progress: bool = True) -> dict:
    """Train `model`'s decoder in place on prepared samples (their maps must hold the model's levels).

    Seeded (crop draws, decoder init from model creation, deterministic torch algorithms); returns the
    history (loss per step, seconds). Crops of `crop` px (a multiple of 32) drawn in proportion to image area.
    """
    if crop % PAD or crop < PAD:
        raise ConfigError(f"training crop {crop} px is not a multiple of {PAD}; use e.g. 128 or 256")
    small = [it.sample.name for it in items if min(it.fg.shape) < crop]
    if small:
        raise ConfigError(f"images {small[:3]} are smaller than the training crop of {crop} px; lower the crop")
    levels, strides = model.encoder.levels, model.encoder.strides
    missing = [lv for lv in levels if lv not in items[0].maps]
    if missing:
        raise ConfigError(f"prepared samples lack encoder levels {missing}; prepare them with levels {levels}")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    area = np.array([it.fg.size for it in items], float)
    decoder = model.decoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc="nuclei decoder", disable=not progress, leave=False)
    for _ in bar:
        picks = rng.choice(len(items), batch_size, p=area / area.sum())
        rgb, maps, fg, dist, types = _batch(items, picks, rng, crop, levels, strides)
        terms = loss_terms(decoder(maps, rgb), fg, dist, types, model.n_types)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if len(history) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
    decoder.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    summary = {"steps": steps, "batch_size": batch_size, "crop": crop, "lr": lr, "seed": seed, "threads": threads,
               "seconds": round(seconds, 1), "n_images": len(items), "loss_first": float(np.mean(history[:20])),
               "loss_last": float(np.mean(history[-20:]))}
    model.meta["training"] = summary
    return {"loss": history, **summary}


def _maps_of(model: NucleiModel, it: Prepared):
    """Foreground, distance and type maps of a prepared sample (cropped to its valid size), from its cached maps."""
    h, w = it.fg.shape
    rgb = torch.from_numpy(np.require(it.rgb[None], requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255)
    maps = [torch.from_numpy(it.maps[lv][None].astype(np.float32)) for lv in model.encoder.levels]
    fg, dist, types = model.forward_maps(rgb, maps)
    return fg[0, :h, :w], dist[0, :h, :w], None if types is None else types[0, :, :h, :w]


def tune_postprocess(model: NucleiModel, items: list[Prepared],
                     marker_thresholds=(0.2, 0.3, 0.4, 0.5, 0.6), fg_thresholds=(0.4, 0.5)) -> dict:
    """Pick the watershed's thresholds by mean AJI + PQ over `items` (labelled images the model may have seen:
    thresholds, not weights); stores them in the model's post-processing and returns {setting: score}."""
    maps = [_maps_of(model, it) for it in items]
    found = {}
    for mt in marker_thresholds:
        for ft in fg_thresholds:
            model.postprocess.update(marker_threshold=mt, fg_threshold=ft)
            s = [metrics.scores(metrics.image_parts(it.sample.instances, model.instances(*m)[0]))
                 for it, m in zip(items, maps)]
            found[(mt, ft)] = float(np.mean([x["aji"] + x["pq"] for x in s]))
    best = max(found, key=found.get)
    model.postprocess.update(marker_threshold=best[0], fg_threshold=best[1])
    model.meta["postprocess"] = dict(model.postprocess)
    return found


def evaluate(model: NucleiModel, items: list[Prepared], radius: float = 12.0) -> dict:
    """Per source image (group): Dice, AJI, DQ, SQ, PQ from components pooled over its tiles; and, when the
    samples have types, detection F1 and HoVer-Net's per-type F1 over all images (centroids within `radius`)."""
    groups: dict[str, dict] = {}
    counts = []
    for it in items:
        inst, table = model.instances(*_maps_of(model, it))
        parts = metrics.image_parts(it.sample.instances, inst)
        g = it.sample.group
        groups[g] = metrics.add_parts(groups.get(g, {}), parts)
        if model.n_types and it.sample.types is not None:
            true = _true_centroids(it.sample)
            counts.append(metrics.type_counts(true[0], true[1], [(r["x"], r["y"]) for r in table],
                                              [r["type"] for r in table], radius))
    per_image = {g: metrics.scores(p) for g, p in groups.items()}
    result = {"per_image": per_image, "n_images": len(per_image)}
    for key in ("dice", "aji", "dq", "sq", "pq"):
        values = np.array([s[key] for s in per_image.values()])
        result[key] = float(values.mean())
        result[f"{key}_ci"] = metrics.bootstrap_ci(values)
    if counts:
        pooled = metrics.concat_counts(counts)
        result["f1_detection"] = metrics.detection_f1(pooled)
        result["f1_type"] = {t: metrics.type_f1(pooled, t) for t in range(1, model.n_types + 1)}
    return result


def _true_centroids(sample: Sample) -> tuple[np.ndarray, list[int]]:
    """Centroids (x, y) and types of a sample's typed nuclei."""
    from scipy import ndimage as ndi

    present = [int(i) for i in np.unique(sample.instances) if i]
    cy_cx = ndi.center_of_mass(np.ones_like(sample.instances), sample.instances, present)
    xy = np.array([(x, y) for y, x in cy_cx], float).reshape(-1, 2)
    return xy, [sample.types.get(i, 0) for i in present]
