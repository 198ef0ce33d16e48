"""Encoder CPU runtimes in one run: the default encoder under torch eager fp32 NCHW (the baseline), eager
channels_last, bf16 autocast, torch.compile, ONNX Runtime and OpenVINO (`encoder.cpu_runtime`).

The encoder is the default config's (wsi_qc/configs/default.yaml: tf_efficientnet_lite0, levels [1, 2, 3], grid 14,
image statistics), on 224 px tiles at 0.5 mpp from the tissue of ../shared/data/slides/CMU-1-Small-Region.svs (a
generated example slide when that is absent), batches of 64. Every runtime runs with --threads torch threads (ONNX
Runtime and OpenVINO take the same count) and is warmed up on one batch; then the runtimes take turns batch by batch
for --repeats rounds over --batches batches, so machine load falls on all alike (one more than SLOW times slower than
eager fp32 on its first batch is timed only once); tiles/s come from the median seconds per batch.

Agreement with eager fp32, on the warm-up batch: per feature column, max |f - f_eager| over its tiles and grid
positions, divided by the column's std; the table shows the worst column. Tolerance 1e-3: the flow standardises
every column before anything else, so this is at most a 1e-3 shift in the flow's input units, far below the
tile-to-tile spread; fp32 runtimes that only reorder sums stay near 1e-5, bf16 moves features far more. The verdict
names the fastest runtime within tolerance and whether it beats channels_last (the torch default) by >= 10 %.
Run: python benchmarks/runtimes.py [--batches 2] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import wsi_qc  # noqa: F401  first: it sets OMP_WAIT_POLICY, which OpenMP reads when torch loads

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_qc.config import load_config
from wsi_qc.data import write_example_slide
from wsi_qc.image_stats import image_statistics, rgb_tensor
from wsi_qc.scorer import encoder_from_config
from wsi_qc.slide import Slide
from wsi_qc.tiles import iter_tile_batches, tile_slide

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
BATCH = 64
TOLERANCE = 1e-3
MIN_GAIN = 1.10
SLOW = 5  # a runtime this many times slower than eager fp32 on its first timed batch is timed once
TORCH = {"cpu_runtime": "torch", "channels_last": True}
RUNTIMES = {  # label -> encoder config overrides
    "eager fp32 NCHW": {**TORCH, "channels_last": False},
    "eager channels_last": TORCH,
    "bf16 autocast": {**TORCH, "precision": "bf16"},
    "torch.compile": {**TORCH, "compile": True},
    "onnxruntime": {"cpu_runtime": "onnxruntime"},
    "openvino": {"cpu_runtime": "openvino"},
}
BASELINE, TORCH_DEFAULT = "eager fp32 NCHW", "eager channels_last"


def real_tiles(config: dict, n: int) -> tuple[np.ndarray, str]:
    """n tissue tiles (uint8, n x 224 x 224 x 3) of the real slide, topped up with their rotations; and the source."""
    with tempfile.TemporaryDirectory() as tmp:
        path = REAL if REAL.is_file() else write_example_slide(Path(tmp) / "example.tif", size=(8192, 8192))
        with Slide(path) as slide:
            tiles = tile_slide(slide, config)[-1]
            images = np.concatenate([im for _, im in iter_tile_batches(slide, tiles, batch_size=BATCH, workers=0)])
    found = len(images)
    while len(images) < n:
        images = np.concatenate([images, np.rot90(images, axes=(1, 2))])
    return np.ascontiguousarray(images[:n]), f"{path.name}, {found} tissue tiles"


def build(label: str, config: dict):
    """(encoder, None) or (None, the reason this runtime is unavailable)."""
    overrides = {**config["encoder"], **RUNTIMES[label]}
    try:
        return encoder_from_config({**config, "encoder": overrides}), None
    except Exception as exc:  # a runtime that does not install or export here is a row, not a crash
        return None, f"{type(exc).__name__}: {str(exc)[:90]}"


def deviation(features: np.ndarray, reference: np.ndarray) -> float:
    """Worst feature column's max |difference| in units of that column's std in the reference."""
    d = features.shape[-1]
    ref, got = reference.reshape(-1, d), features.reshape(-1, d)
    return float((np.abs(got - ref).max(0) / np.maximum(ref.std(0), 1e-6)).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2, help="distinct batches of 64 tiles")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the batches")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and each runtime's own)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(overrides={"encoder": {"device": "cpu"}})
    images, source = real_tiles(config, args.batches * BATCH)
    batches = [images[i:i + BATCH] for i in range(0, len(images), BATCH)]

    encoders, features, unavailable = {}, {}, {}
    for label in RUNTIMES:
        start = time.perf_counter()
        encoder, reason = build(label, config)
        if encoder is None:
            unavailable[label] = reason
            print(f"  {label}: unavailable ({reason})", flush=True)
            continue
        encoders[label] = encoder
        features[label] = encoder(batches[0])  # the warm-up (torch.compile compiles here)
        print(f"  {label}: built and warmed up in {time.perf_counter() - start:.0f} s", flush=True)

    seconds = {label: [] for label in encoders}
    for i in range(args.repeats * len(batches)):
        for label, encoder in encoders.items():
            if i and seconds[label][0] > SLOW * seconds[BASELINE][0]:
                continue
            start = time.perf_counter()
            encoder(batches[i % len(batches)])
            seconds[label].append(time.perf_counter() - start)
    stats_seconds = []
    with torch.inference_mode():
        for batch in batches:
            start = time.perf_counter()
            image_statistics(rgb_tensor(batch))
            stats_seconds.append(time.perf_counter() - start)

    e = config["encoder"]
    print(f"\nEncoder CPU runtimes: {e['name']} levels {e['levels']} grid {e['grid']} image_stats {e['image_stats']}, "
          f"{args.threads} threads, batch {BATCH} of 224 px ({source}); median of {args.repeats} x {len(batches)} "
          f"batches (torch {torch.__version__}; * timed once, over {SLOW}x slower than eager fp32)")
    print(f"Agreement: worst feature column's max |f - f_eager fp32| / its std, tolerance {TOLERANCE:g}")
    header = f"{'runtime':<22} {'tiles/s':>8} {'vs eager fp32':>13} {'max |diff| / std':>16}  within tolerance"
    print(header)
    print("-" * len(header))
    rate = {label: BATCH / float(np.median(s)) for label, s in seconds.items()}
    dev = {label: deviation(f, features[BASELINE]) for label, f in features.items()}
    for label in RUNTIMES:
        if label in unavailable:
            print(f"{label:<22} {'unavailable: ' + unavailable[label]}")
            continue
        mark = "*" if len(seconds[label]) == 1 < len(seconds[BASELINE]) else " "
        print(f"{label + mark:<22} {rate[label]:>8.1f} {rate[label] / rate[BASELINE]:>12.2f}x {dev[label]:>16.1e}  "
              f"{'yes' if dev[label] < TOLERANCE else 'no'}")
    best = max((label for label in rate if dev[label] < TOLERANCE), key=rate.get)
    gain = rate[best] / rate[TORCH_DEFAULT]
    print(f"\nfastest within tolerance: {best}, {gain:.2f}x {TORCH_DEFAULT} "
          f"({'>=' if gain >= MIN_GAIN else '<'} {MIN_GAIN:.2f}x: "
          f"{'worth being the default' if gain >= MIN_GAIN else 'not worth a change of default'})")
    share = float(np.median(stats_seconds)) / float(np.median(seconds[best]))
    print(f"image statistics alone: {BATCH / float(np.median(stats_seconds)):.0f} tiles/s "
          f"= {100 * share:.0f} % of {best}'s encoder time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
