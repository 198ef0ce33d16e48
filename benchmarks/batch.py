"""Batch-run throughput: `wsi_qc.run.run_slides` over a folder of generated and real slides, against the encoder alone.

Slides: generated example slides of two sizes (so memory can be compared across slide size) plus the real
slides in ../shared/data/slides when present (broken ones fail per slide and are left out of the counts).
Encoder and settings: wsi_qc/configs/default.yaml (tf_efficientnet_lite0 with its ImageNet weights, 224 px tiles at
0.5 mpp, batch 64, 2 reader processes), overlays and GeoJSON on, as `wsi-qc run` does by default. The flow
is fitted (few epochs) on the features of one generated slide and calibrated on synthetic labels: the flow
costs microseconds per tile, so its quality does not matter here.

Modes, each into a fresh store: 1 local worker (in process), 2 local worker processes, a local Dask
cluster of 2 worker processes. Encoder-only: the same encoder and batch size on the same tiles, read
into memory beforehand (the ceiling the pipeline can reach). Peak memory per worker is each slide's peak
RSS in the process that ran it (reset per slide), so it can be compared across slide sizes.
Run: python benchmarks/batch.py [--sizes 4096 8192] [--no-real] [--no-dask]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_qc.config import load_config
from wsi_qc.data import write_example_slide
from wsi_qc.run import collect_slides, run_slides
from wsi_qc.scorer import Scorer, encoder_from_config, slide_features
from wsi_qc.slide import Slide
from wsi_qc.threshold import Threshold
from wsi_qc.tiles import iter_tile_batches, tile_slide

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
GOAL = 0.90  # end-to-end tiles/s over encoder-only tiles/s


def make_folder(folder: Path, sizes: list[int], real: bool) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        write_example_slide(folder / f"generated-{size}-{i}.tif", size=(size, size), mpp=0.25, seed=i)
    if real and REAL.is_dir():
        for path in sorted(REAL.iterdir()):
            if path.is_file():
                os.symlink(path, folder / path.name)
    return collect_slides([folder], "*.svs,*.tif,*.tiff")


def fit_scorer(reference: Path, config: dict, workdir: Path) -> tuple[Path, Path]:
    encoder = encoder_from_config(config)
    with Slide(reference) as slide:
        features = slide_features(slide, encoder, config).features
    scorer = Scorer.fit(features, encoder, config)
    scorer.save(workdir / "scorer")
    scores = scorer.score(features)
    Threshold(n_bootstrap=50).fit(scores, (scores > np.percentile(scores, 80)).astype(int)).save(
        workdir / "calibration.json", scorer.fingerprint, config["score"])
    return workdir / "scorer", workdir / "calibration.json"


def encoder_only(paths: list[Path], config: dict) -> tuple[int, float, float]:
    """(tiles, read seconds, encode seconds) of the encoder alone on the readable slides' tiles, held in memory."""
    encoder = encoder_from_config(config)
    t = config["tiles"]
    images = []
    t0 = time.perf_counter()
    for path in paths:
        try:
            with Slide(path) as slide:
                _, _, _, tiles = tile_slide(slide, config)
                images += [im for _, im in iter_tile_batches(slide, tiles, batch_size=t["batch_size"], workers=0)]
        except Exception:  # the broken slides of the folder
            continue
    read_s = time.perf_counter() - t0
    tiles = np.concatenate(images)
    encoder(tiles[: t["batch_size"]])  # warm-up, as the pipeline's first batch is too
    t0 = time.perf_counter()
    for start in range(0, len(tiles), t["batch_size"]):
        encoder(tiles[start:start + t["batch_size"]])
    return len(tiles), read_s, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192],
                        help="sides (px at 0.25 mpp) of the generated slides")
    parser.add_argument("--no-real", action="store_true", help="leave out ../shared/data/slides")
    parser.add_argument("--no-dask", action="store_true", help="leave out the local Dask cluster")
    parser.add_argument("--config", help="YAML overriding wsi_qc/configs/default.yaml")
    args = parser.parse_args(argv)
    config = load_config(args.config, overrides={"flow": {"epochs": 20, "min_reference": 20, "pca_dim": 32}})

    with tempfile.TemporaryDirectory(prefix="wsi-qc-batch-") as tmp:
        workdir = Path(tmp)
        paths = make_folder(workdir / "slides", args.sizes, not args.no_real)
        scorer, calibration = fit_scorer(paths[0] if args.no_real else sorted(paths)[0], config, workdir)
        modes = [("1 local worker", {"workers": 1}), ("2 local workers", {"workers": 2})]
        if not args.no_dask:
            modes.append(("local Dask, 2 workers", {"workers": 2, "scheduler": "local"}))
        results, per_slide = [], {}
        for label, run in modes:
            cfg = {**config, "run": {**config["run"], **run}}
            out = workdir / f"{label.replace(' ', '-').replace(',', '')}.zarr"
            t0 = time.perf_counter()
            rows = run_slides(paths, scorer, calibration, cfg, out, workdir / f"{out.stem}-report")
            wall = time.perf_counter() - t0
            done = [r for r in rows if r["status"] == "done"]
            n_tiles = sum(r["n_tiles"] for r in done)
            results.append((label, len(done), len(rows) - len(done), n_tiles, wall,
                            max(r["peak_rss_mb"] for r in done)))
            per_slide[label] = done
        n_enc, read_s, enc_s = encoder_only(paths, config)

    enc_tps = n_enc / enc_s
    print(f"\nwsi-qc batch benchmark: {len(paths)} slides, encoder {config['encoder']['name']} "
          f"({config['encoder']['weights']}), {config['tiles']['size']} px tiles at {config['tiles']['mpp']} mpp, "
          f"batch {config['tiles']['batch_size']}, tiles.workers {config['tiles']['workers']}, "
          f"{os.cpu_count()} CPUs\n")
    print(f"{'mode':<24}{'slides ok':>10}{'failed':>8}{'tiles':>8}{'wall s':>9}{'slides/h':>10}{'tiles/s':>9}"
          f"{'vs enc':>8}{'peak MiB/worker':>17}")
    for label, n_done, n_failed, n_tiles, wall, peak in results:
        tps = n_tiles / wall
        print(f"{label:<24}{n_done:>10}{n_failed:>8}{n_tiles:>8}{wall:>9.1f}{3600 * n_done / wall:>10.0f}"
              f"{tps:>9.1f}{100 * tps / enc_tps:>7.0f}%{peak:>17.0f}")
    print(f"{'encoder only':<24}{'':>10}{'':>8}{n_enc:>8}{enc_s:>9.1f}{'':>10}{enc_tps:>9.1f}{'100%':>8}{'':>17}")
    print(f"(reading those tiles alone, one thread, no encoder: {n_enc / read_s:.0f} tiles/s)")
    print("\npeak memory per slide (MiB) by slide size:")
    for label, done in per_slide.items():
        parts = []
        for r in sorted(done, key=lambda r: r["n_tiles"]):
            parts.append(f"{r['slide']} ({r['n_tiles']} tiles) {r['peak_rss_mb']:.0f}")
        print(f"  {label}: " + "; ".join(parts))
    best = max(n / w for _, _, _, n, w, _ in results) / enc_tps
    print(f"\ngoal: end-to-end tiles/s >= {100 * GOAL:.0f} % of encoder-only: best mode {100 * best:.0f} % "
          f"({'met' if best >= GOAL else 'not met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
