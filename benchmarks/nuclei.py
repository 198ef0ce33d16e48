"""Nuclei: predict throughput (256 x 256 images per second, goal >= 20 on 2 cores) and training time of the
default decoder (tf_efficientnet_lite0, levels [0, 1, 2, 3], 1500 steps of 8 crops of 128 px).

Images: CoNSeP test tiles from ../shared/data/nuclei (256 px at 0.25 mpp; random pink noise when absent). Predict
is timed end to end (encoder + decoder + watershed + nucleus table, as `wsi-qc nuclei predict` runs them without
file I/O) in OpenVINO (the default) and in torch, batches of 16, after one warm-up batch; the network and the
post-processing are also timed alone. Training: the encoder maps of --train-images CoNSeP train tiles
(computed once, as the cache does), then --train-steps decoder steps; the default's 1500 steps are extrapolated
from the measured seconds per step and printed as such (pipelines/nuclei_study.py prints the measured full runs).
Run: python benchmarks/nuclei.py [--model out/nuclei_study/models/...] [--images 128] [--threads 2]
"""

from __future__ import annotations

import wsi_qc  # noqa: F401  first: it sets OMP_WAIT_POLICY, which OpenMP reads when torch loads

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from wsi_qc.nuclei.data import read_folder
from wsi_qc.nuclei.model import NucleiModel

CONSEP = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei" / "consep"
DEFAULT_STEPS = 1500


def images(n: int, split: str = "test") -> tuple[np.ndarray, list, str]:
    """n 256 px tiles (uint8) with their samples (None when generated) and where they came from."""
    if (CONSEP / "types.csv").is_file():
        samples = read_folder(CONSEP, split=split)[:n]
        return np.stack([s.image for s in samples]), samples, f"CoNSeP {split} tiles"
    rng = np.random.default_rng(0)
    noise = np.clip(np.array([220, 160, 190]) + rng.normal(0, 30, (n, 256, 256, 3)), 0, 255).astype(np.uint8)
    return noise, [], "generated pink noise (CoNSeP absent)"


def rate(fn, batches: list[np.ndarray]) -> float:
    """Images per second of fn over the batches, after a warm-up call on the first."""
    fn(batches[0])
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained nuclei model folder (default: an untrained default decoder; "
                        "throughput does not depend on the weights, but the nucleus count does)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tiles, _, source = images(args.images)
    batches = [tiles[i:i + args.batch] for i in range(0, len(tiles), args.batch)]
    rows = []
    for runtime in ("openvino", "torch"):
        model = (NucleiModel.load(args.model, runtime=runtime) if args.model else
                 NucleiModel.create(runtime=runtime, n_types=4))
        found = []
        rows.append((f"predict end to end ({runtime})", rate(lambda b: found.extend(model.predict(b)), batches), "img/s"))
        rows.append((f"  network alone ({runtime})", rate(model.predict_maps, batches), "img/s"))
        if runtime == "openvino":
            maps = [model.predict_maps(b) for b in batches]
            start = time.perf_counter()
            for fg, dist, types in maps:
                for i in range(len(fg)):
                    model.instances(fg[i], dist[i], None if types is None else types[i])
            rows.append(("  watershed + table alone", len(tiles) / (time.perf_counter() - start), "img/s"))
            nuclei = sum(len(t) for _, t in found[-len(tiles):])
    # training: maps once, then decoder steps
    from wsi_qc.nuclei.train import prepare, train

    train_tiles, samples, train_source = images(args.train_images, "train")
    model = NucleiModel.create(n_types=4 if samples else 0, runtime="torch")
    if not samples:
        raise SystemExit("training time needs labelled tiles (../shared/data/nuclei/consep)")
    start = time.perf_counter()
    items = prepare(samples, model.encoder, 0.25, progress=False)
    t_maps = time.perf_counter() - start
    history = train(model, items, steps=args.train_steps, progress=False, threads=args.threads)
    per_step = history["seconds"] / args.train_steps
    rows += [("encoder maps for training (once per image)", len(items) / t_maps, "img/s"),
             (f"decoder training step (8 crops of 128 px, {args.train_steps} steps)", 1 / per_step, "steps/s"),
             (f"default training, {DEFAULT_STEPS} steps (extrapolated)", DEFAULT_STEPS * per_step / 60, "min")]
    print(f"nuclei benchmark: {source}, 256 x 256 px, batches of {args.batch}, {args.threads} threads, "
          f"{'model ' + args.model if args.model else 'untrained default decoder'} ({nuclei} nuclei found)")
    print("| what | value | unit |\n|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:.1f} | {unit} |")
    goal = rows[0][1]
    print(f"predict goal >= 20 img/s on 2 cores: {'met' if goal >= 20 else 'not met'} ({goal:.1f} img/s, OpenVINO)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
