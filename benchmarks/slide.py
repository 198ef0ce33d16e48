"""One real-sized slide at a time: `wsi-qc run` single pass and cascade against the encoder alone, per step.

Slides: generated example slides (wsi_qc.data.write_example_slide, 0.25 mpp, seed 0): 10k x 10k, the issue's
40k x 40k reference slide and a 60k x 45k one (tissue over about a third of it), cached in --cache.
Scorer: wsi_qc/configs/default.yaml (tf_efficientnet_lite0 with its ImageNet weights, grid 14, OpenVINO), its
flow fitted with the default architecture but few epochs on another generated slide (seed 7), once with and
once without the cascade's coarse pass (cached too); label-free threshold (false_discard 2 %).
Modes, each in its own child process (so the peak RSS, VmHWM, is per slide and mode):
- single pass: `wsi_qc.api.qc_folder` (what `wsi-qc run` calls) into a fresh store, overlays on;
- cascade: the same with the cascade scorer;
- encoder alone: the scorer's encoder on a seeded random subset of the slide's tiles (at most --subset),
  read into memory first: the ceiling the pipeline can reach.
Seconds of a run count loading the scorer but not importing Python packages.
Run: python benchmarks/slide.py [--sizes 10k 40k 60k] [--quick] [--size-px N] [--cache out/slide_bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_qc.config import load_config

SLIDES = {"10k": (10000, 10000), "40k": (40000, 40000), "60k": (60000, 45000)}  # (w, h) px at 0.25 mpp
MPP = 0.25
SEED = 0  # the benchmarked slides (the issue counts 2,252 tiles on the 40k slide with seed 0)
REFERENCE = ("reference", (8192, 8192), 7)  # the slide the scorers are fitted on: name, size, seed
FLOW = {"epochs": 5}  # the default flow's architecture, fewer epochs: its quality does not change its cost
FALSE_DISCARD = 0.02
MODES = ("single pass", "cascade", "encoder alone")
# (column, timing key): seconds per step; "read" is computed, "rest" is what no step accounts for
STEPS = (("load", "load_s"), ("tiling", "tile_s"), ("read", "read_s"), ("encode", "encode_s"),
         ("score", "score_s"), ("coarse", "coarse_s"), ("focus", "focus_s"), ("fine", "fine_s"),
         ("write", "write_s"), ("report", "report_s"), ("rest", "rest_s"))
LOOP_KEYS = ("encode_s", "score_s", "coarse_s", "focus_s", "fine_s")  # inside the tile loop besides reading
GOAL_VS_ENCODER = 0.9
GOAL_RSS = 1.2  # peak RSS of the 60k slide over the 10k slide's
GOAL_SECONDS = {"60k": 60.0, "40k": 30.0}
HEADS = {"single pass": "local flow", "cascade": "cascade"}  # mode -> head of the QC benchmark's results.json


def slide_sizes(names: list[str]) -> dict[str, tuple[int, int]]:
    """{name: (w, h)} of the named slides, or a ConfigError naming an unknown name and the known ones."""
    from wsi_qc.errors import ConfigError

    for name in names:
        if name not in SLIDES:
            raise ConfigError(f"--sizes {name!r} is unknown; use some of {', '.join(SLIDES)}")
    return {name: SLIDES[name] for name in dict.fromkeys(names)}


def cached_slide(cache: Path, name: str, size: tuple[int, int], seed: int) -> Path:
    """The generated slide `name` in the cache, written there first when missing."""
    from wsi_qc.data import write_example_slide

    path = cache / "slides" / f"{name}-{size[0]}x{size[1]}-seed{seed}.tif"
    if not path.is_file():
        partial = path.with_name(f"{path.stem}.partial.tif")
        print(f"writing {path} ...", flush=True)
        write_example_slide(partial, size=size, mpp=MPP, seed=seed)
        partial.replace(path)
    return path


def in_child(task: dict) -> dict:
    """Run `task` in a fresh Python process (this file with --child); returns its result."""
    with tempfile.TemporaryDirectory(prefix="wsi-qc-slide-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, "--child", json.dumps({**task, "result": str(out)})], check=True)
        return json.loads(out.read_text())


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    from wsi_qc.run import _peak_rss_mb

    return _peak_rss_mb()


def fit_scorers(reference: Path, folder: Path) -> dict:
    """Fit the single-pass and the cascade scorer on the reference slide and their label-free calibrations."""
    from wsi_qc.api import fit_threshold
    from wsi_qc.cascade import coarse_config
    from wsi_qc.scorer import Scorer, encoder_from_config, slide_features
    from wsi_qc.slide import Slide

    config = load_config(overrides={"flow": FLOW})
    encoder, coarse = encoder_from_config(config), encoder_from_config(coarse_config(config))
    with Slide.from_config(reference, config) as slide:
        features = slide_features(slide, encoder, config).features
        coarse_features = slide_features(slide, coarse, config).features
    scorer = Scorer.fit(features, encoder, config)
    scorer.save(folder / "single pass")
    scorer.fit_cascade(coarse_features, coarse).save(folder / "cascade")
    for name in HEADS:
        fit_threshold(folder / name, false_discard=FALSE_DISCARD, out=folder / name / "calibration.json")
    return {"reference_tiles": len(features)}


def run_pipeline(slide: Path, scorer: Path) -> dict:
    """QC one slide as `wsi-qc run` does (default config, fresh store, overlays on); seconds per step."""
    from wsi_qc.api import qc_folder
    from wsi_qc.run import check_inputs
    from wsi_qc.store import open_store, read_slide

    calibration = scorer / "calibration.json"
    t0 = time.perf_counter()
    check_inputs(scorer, calibration, load_config())  # cached: qc_folder reuses the loaded scorer
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="wsi-qc-slide-run-") as tmp:
        rows = qc_folder([slide], scorer, calibration, out=Path(tmp) / "qc.zarr")
        seconds = time.perf_counter() - t0
        row = rows[0]
        if row["status"] != "done":
            raise RuntimeError(f"{slide} failed: {row['error']}\n{row['traceback']}")
        stored = read_slide(open_store(Path(tmp) / "qc.zarr", create=False), row["slide"])
    timings = {k: v for k, v in {**stored["attrs"]["timings"], **row}.items()
               if k.endswith("_s") and isinstance(v, (int, float)) and v == v}
    timings["read_s"] = timings["score_loop_s"] - sum(timings.get(k, 0.0) for k in LOOP_KEYS)
    timings["load_s"] = load_s
    steps = sum(timings.get(key, 0.0) for _, key in STEPS if key != "rest_s")
    timings["rest_s"] = seconds - steps
    return {"tiles": row["n_tiles"], "encoded": row["n_tiles"], "seconds": seconds, "timings": timings,
            "tissue_pct": 100 * float(stored["tissue"].mean()), "grid": list(stored["grid"].shape),
            "passes": row.get("passes", "")}


def encoder_alone(slide: Path, scorer: Path, subset: int) -> dict:
    """The scorer's encoder on a seeded random subset of the slide's tiles, read into memory first."""
    from wsi_qc.run import check_inputs, fixed_threads
    from wsi_qc.slide import Slide
    from wsi_qc.tiles import iter_tile_batches, tile_slide

    config = load_config()
    t0 = time.perf_counter()
    loaded, _ = check_inputs(scorer, scorer / "calibration.json", config)
    config = loaded.config
    t1 = time.perf_counter()
    with Slide.from_config(slide, config) as opened:
        _, _, _, tiles = tile_slide(opened, config)
        t2 = time.perf_counter()
        pick = np.sort(np.random.default_rng(0).choice(len(tiles), min(subset, len(tiles)), replace=False))
        some = dataclasses.replace(tiles, coords=tiles.coords[pick], grid_index=tiles.grid_index[pick],
                                   tissue_fraction=tiles.tissue_fraction[pick])
        images = np.concatenate([im for _, im in iter_tile_batches(opened, some, workers=0)])
    t3 = time.perf_counter()
    batch = config["tiles"]["batch_size"]
    with fixed_threads(config["run"]["threads"]):
        loaded.encoder(images[:batch])  # warm-up, as the pipeline's first batch is too
        t4 = time.perf_counter()
        for start in range(0, len(images), batch):
            loaded.encoder(images[start:start + batch])
        encode_s = time.perf_counter() - t4
    return {"tiles": len(tiles), "encoded": len(images), "seconds": encode_s,
            "timings": {"load_s": t1 - t0, "tile_s": t2 - t1, "read_s": t3 - t2, "encode_s": encode_s}}


def child(task: dict) -> None:
    """The work of one child process; writes its result (with the process's peak RSS) to task["result"]."""
    cache, mode = Path(task["cache"]), task["mode"]
    if mode == "fit":
        out = fit_scorers(Path(task["slide"]), cache / "scorers.partial")
        (cache / "scorers.partial").replace(cache / "scorers")
    elif mode == "encoder alone":
        out = encoder_alone(Path(task["slide"]), cache / "scorers" / "single pass", task["subset"])
    else:
        out = run_pipeline(Path(task["slide"]), cache / "scorers" / mode)
    Path(task["result"]).write_text(json.dumps({**out, "peak_rss_mb": peak_rss_mb()}))


def load_average() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min)"


def qc_quality(path: Path) -> str:
    """The single pass's and the cascade's test AUROC from the QC benchmark's results.json, or how to get them."""
    if not path.is_file():
        return (f"QC quality: {path} not found; `python -m pipelines.qc_benchmark --out {path.parent}` writes it "
                f"(or pass --qc-results PATH)")
    heads = json.loads(path.read_text())["heads"]
    parts = [f"{mode} ({head}) {heads[head]['test']['overall']:.3f}" for mode, head in HEADS.items() if head in heads]
    return f"QC quality, test AUROC ({path}): " + "; ".join(parts)


def print_table(sizes: dict, results: dict) -> None:
    head = f"{'slide':<18}{'mode':<15}{'tiles':>7}{'timed':>7}{'seconds':>9}{'tiles/s':>9}"
    head += "".join(f"{name:>8}" for name, _ in STEPS) + f"{'peak MiB':>10}"
    print(head)
    for name, modes in results.items():
        w, h = sizes[name]
        for mode, r in modes.items():
            cells = "".join(f"{r['timings'][key]:>8.1f}" if key in r["timings"] else f"{'-':>8}" for _, key in STEPS)
            print(f"{f'{name} {w}x{h}':<18}{mode:<15}{r['tiles']:>7}{r['encoded']:>7}{r['seconds']:>9.1f}"
                  f"{r['encoded'] / r['seconds']:>9.1f}{cells}{r['peak_rss_mb']:>10.0f}")
    print("timed: tiles in tiles/s (encoder alone: a random subset). Seconds per step: load scorer; tiling = "
          "thumbnail + tissue + grid; read = tile loop minus encoder and flow (pipeline: waiting for the background "
          "readers; encoder alone: reading the subset beforehand, not in its seconds); coarse/focus/fine = the "
          "cascade's passes; report = overlay, thumbnail and GeoJSON; rest = the rest of the run (store, report.html).")
    for name, modes in results.items():
        single = modes.get("single pass")
        if single:
            print(f"{name}: {single['tissue_pct']:.0f} % tissue, grid {single['grid'][0]} x {single['grid'][1]}"
                  + (f"; cascade passes: {modes['cascade']['passes']}" if "cascade" in modes else ""))


def time_beyond_encoder(single: dict, encoder_rate: float) -> str:
    """Where the single pass's seconds go beyond the encoder alone on the same tiles, and what the 0.9x goal allows."""
    t = single["timings"]
    alone = single["encoded"] / encoder_rate
    parts = {"encoder alone": alone, "encoder slowdown beside the readers": t["encode_s"] - alone,
             "flow + aggregation": t.get("score_s", 0.0), "tiling": t["tile_s"], "report": t.get("report_s", 0.0)}
    parts["other"] = single["seconds"] - sum(parts.values())
    return (f"single pass {single['seconds']:.1f} s = " + " + ".join(f"{k} {v:.1f} s" for k, v in parts.items())
            + f"; {GOAL_VS_ENCODER}x the encoder allows {alone / GOAL_VS_ENCODER:.1f} s")


def print_ratios(results: dict) -> None:
    def speed(r):
        return r["encoded"] / r["seconds"]

    vs_enc = {n: speed(m["single pass"]) / speed(m["encoder alone"]) for n, m in results.items()}
    cascade = {n: m["single pass"]["seconds"] / m["cascade"]["seconds"] for n, m in results.items()}
    worst = min(vs_enc.values())
    print(f"\nsingle-pass tiles/s / encoder-alone tiles/s: " + ", ".join(f"{n} {v:.2f}" for n, v in vs_enc.items())
          + f" (goal >= {GOAL_VS_ENCODER}: {'met' if worst >= GOAL_VS_ENCODER else 'not met'})")
    for name, modes in results.items():
        print(f"{name}: " + time_beyond_encoder(modes["single pass"], speed(modes["encoder alone"])))
    print("cascade speed-up over single pass (seconds): " + ", ".join(f"{n} {v:.2f}x" for n, v in cascade.items()))
    if "10k" in results and "60k" in results:
        rss = {m: results["60k"][m]["peak_rss_mb"] / results["10k"][m]["peak_rss_mb"] for m in HEADS}
        print("peak RSS 60k slide / 10k slide: " + ", ".join(f"{m} {v:.2f}" for m, v in rss.items())
              + f" (goal <= {GOAL_RSS}: {'met' if max(rss.values()) <= GOAL_RSS else 'not met'})")
    else:
        print(f"peak RSS 60k slide / 10k slide: n/a (needs --sizes 10k 60k; goal <= {GOAL_RSS})")
    for name, goal in GOAL_SECONDS.items():
        w, h = SLIDES[name]
        if name in results:
            got = {m: results[name][m]["seconds"] for m in HEADS}
            print(f"goal: {w} x {h} slide <= {goal:.0f} s: " + ", ".join(
                f"{m} {v:.0f} s ({'met' if v <= goal else 'not met'})" for m, v in got.items()))
        else:
            print(f"goal: {w} x {h} slide <= {goal:.0f} s: n/a (needs --sizes {name})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SLIDES), help=f"slides to run, of {', '.join(SLIDES)}")
    parser.add_argument("--quick", action="store_true", help="only the 10k slide (a smoke test)")
    parser.add_argument("--size-px", type=int, help="instead, one square slide of this side (px at 0.25 mpp)")
    parser.add_argument("--subset", type=int, default=512, help="tiles the encoder alone is timed on, at most")
    parser.add_argument("--cache", default="out/slide_bench", help="folder of the generated slides and the scorers")
    parser.add_argument("--qc-results", default="out/qc_benchmark/results.json",
                        help="results.json of `python -m pipelines.qc_benchmark` (for the AUROC lines)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    sizes = slide_sizes(["10k"] if args.quick else args.sizes)
    if args.size_px:
        sizes = {f"{args.size_px}px": (args.size_px, args.size_px)}
    print(f"start: {load_average()}, {os.cpu_count()} CPUs", flush=True)
    cache = Path(args.cache)
    slides = {name: cached_slide(cache, name, size, SEED) for name, size in sizes.items()}
    if not (cache / "scorers").is_dir():
        shutil.rmtree(cache / "scorers.partial", ignore_errors=True)
        name, size, seed = REFERENCE
        in_child({"mode": "fit", "cache": str(cache), "slide": str(cached_slide(cache, name, size, seed))})
    results = {name: {mode: in_child({"mode": mode, "cache": str(cache), "slide": str(path), "subset": args.subset})
                      for mode in MODES} for name, path in slides.items()}
    config = load_config()
    print(f"\nwsi-qc slide benchmark: encoder {config['encoder']['name']} ({config['encoder']['weights']}, grid "
          f"{config['encoder']['grid']}, {config['encoder']['cpu_runtime']}), {config['tiles']['size']} px tiles at "
          f"{config['tiles']['mpp']} mpp, batch {config['tiles']['batch_size']}, tiles.workers "
          f"{config['tiles']['workers']}, run.threads {config['run']['threads']}, {os.cpu_count()} CPUs\n")
    print_table(sizes, results)
    print_ratios(results)
    print(qc_quality(Path(args.qc_results)))
    print(f"end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
