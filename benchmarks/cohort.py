"""What fitting the cohort scorer adds to `wsi-qc run` on a slide folder (goal: at most 25 %).

A folder of N generated example slides (default 20 of 12288 x 12288 px at 0.25 mpp, cached in out/cohort_bench;
default config: 224 px tiles at 0.5 mpp, tf_efficientnet_lite0). Timed in this process, one after the other:

1. `wsi_qc.qc_folder(slides, out=A)` without a scorer (warm-up: it also builds the runtimes' caches);
2. `wsi_qc.qc_folder(slides, scorer, calibration, out=B)` with the cohort scorer of step 1: the run alone;
3. `wsi_qc.qc_folder(slides, out=C)` without a scorer again (its own cohort folder): fit + run.

Prints one table: run alone, cohort fit + run, the fit's share of the run, and the tiles the fit used.
Run: python benchmarks/cohort.py [--slides 20] [--size 12288]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import wsi_qc
from wsi_qc.cohort.folder import KEY_FILE, cohort_folder
from wsi_qc.data import write_example_slide

GOAL = 0.25  # the cohort fit's time over the run alone


def timed(**kwargs) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    rows = wsi_qc.qc_folder(**kwargs)
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=20, help="slides in the folder")
    parser.add_argument("--size", type=int, default=12288, help="side of each generated slide in px at 0.25 mpp")
    parser.add_argument("--out", default="out/cohort_bench")
    args = parser.parse_args(argv)
    root = Path(args.out)
    folder = root / f"slides-{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    slides = [folder / f"slide-{i:02d}.tif" for i in range(args.slides)]
    for i, path in enumerate(slides):
        if not path.is_file():
            write_example_slide(path, size=(args.size, args.size), mpp=0.25, seed=100 + i)
    for name in ("A", "B", "C"):
        for path in (root / f"{name}.zarr", root / f"{name}-report", root / f"{name}-cohort"):
            shutil.rmtree(path, ignore_errors=True)
    timed(inputs=slides, out=root / "A.zarr")
    cohort = cohort_folder(root / "A.zarr")
    run_s, rows = timed(inputs=slides, scorer=cohort / "scorer", calibration=cohort / "calibration.json",
                        out=root / "B.zarr")
    both_s, _ = timed(inputs=slides, out=root / "C.zarr")
    info = json.loads((cohort_folder(root / "C.zarr") / KEY_FILE).read_text())
    tiles = sum(r["n_tiles"] for r in rows)
    fit_s = both_s - run_s
    print(f"| slides | tiles | run alone | cohort fit + run | fit / run (goal <= {GOAL:.0%}) | cohort tiles drawn "
          f"/ fitted |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(slides)} x {args.size} px | {tiles} | {run_s:.1f} s | {both_s:.1f} s | {fit_s / run_s:.1%} "
          f"({'met' if fit_s / run_s <= GOAL else 'not met'}) | {info['tiles']} / {info['fitted']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
