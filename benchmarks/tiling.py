"""Tiling throughput and memory: wsi-qc's tiler (0 and 2 workers) vs tiatoolbox's extractor vs bare OpenSlide.

Reads 224 px tiles from generated slides (10k and 20k px written at 0.5 mpp and read at 0.5 mpp, which
gives a 20k slide enough tissue for the tile cap) and from the real slides (CMU-1-Small-Region at 0.5 mpp;
the TCGA slide, which has no mpp in its metadata, with an mpp override of 1.0 read at 1.0). Each case runs
in its own forked process; its memory is the peak of the summed PSS (proportional set size: shared pages
split between the processes sharing them) of that process and its reader workers, sampled every 20 ms;
"+ over start" is the growth during the reads. Tile planning (thumbnail, tissue, grid) is not timed.
Prints one table. Run: python benchmarks/tiling.py [--max-tiles 1000] [--sizes 10240 20480] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import psutil

from wsi_qc.data import write_example_slide
from wsi_qc.slide import Slide
from wsi_qc.tiles import Tiles, iter_tile_batches, make_tiles
from wsi_qc.tissue import find_tissue

SLIDES = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
SIZE = 224
THUMBNAIL_MPP = 8.0
GOAL_TILES_PER_S = 300


class PeakPSS:
    """Samples the summed PSS of this process and its children in a thread; `peak` and `baseline` in MiB."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        me = psutil.Process()
        total = me.memory_full_info().pss
        for child in me.children(recursive=True):
            try:
                total += child.memory_full_info().pss
            except psutil.Error:
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakPSS:
        self.baseline = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def plan_tiles(path: Path, mpp: float, slide_mpp: float | None, max_tiles: int) -> tuple[Tiles, np.ndarray, float]:
    """Tiles (224 px, min_tissue 0.5) cut to the first max_tiles, the tissue mask at 8 mpp, the level-0 mpp."""
    with Slide(path, mpp=slide_mpp) as slide:
        tissue = find_tissue(slide.thumbnail(THUMBNAIL_MPP), THUMBNAIL_MPP)
        tiles = make_tiles(slide, tissue, THUMBNAIL_MPP, mpp=mpp, size=SIZE)
        level0_mpp = slide.mpp
    n = min(len(tiles), max_tiles)
    cut = dataclasses.replace(
        tiles, coords=tiles.coords[:n], grid_index=tiles.grid_index[:n], tissue_fraction=tiles.tissue_fraction[:n]
    )
    return cut, tissue, level0_mpp


def read_ours(path: Path, tiles: Tiles, slide_mpp: float | None, workers: int) -> int:
    n = 0
    for _, images in iter_tile_batches(path, tiles, batch_size=64, workers=workers, slide_mpp=slide_mpp):
        n += len(images)
    return n


def read_openslide(path: Path, tiles: Tiles, level0_mpp: float) -> int:
    """Bare openslide.read_region at the finest level not finer than the target, resized only when needed."""
    from PIL import Image

    slide = openslide.OpenSlide(str(path))
    level = slide.get_best_level_for_downsample(tiles.mpp / level0_mpp * 1.01)
    side = round(SIZE * tiles.mpp / (level0_mpp * slide.level_downsamples[level]))
    for x, y in tiles.coords:
        image = slide.read_region((int(x), int(y)), level, (side, side)).convert("RGB")
        if side != SIZE:
            image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
        np.asarray(image)
    slide.close()
    return len(tiles)


def tiatoolbox_extractor(path: Path, tiles: Tiles, tissue: np.ndarray, level0_mpp: float):
    """tiatoolbox's sliding-window extractor over the same tissue mask, min_mask_ratio and tile size."""
    from tiatoolbox.tools.patchextraction import get_patch_extractor
    from tiatoolbox.wsicore.wsireader import WSIReader

    # tiatoolbox does not read the mpp of a generic TIFF, and TCGA's needs the override: give it ours
    reader = WSIReader.open(path, mpp=(level0_mpp, level0_mpp))
    return get_patch_extractor(
        "slidingwindow", input_img=reader, patch_size=(SIZE, SIZE), resolution=tiles.mpp, units="mpp",
        input_mask=tissue.astype(np.uint8), min_mask_ratio=0.5, within_bound=True,
    )


def read_tiatoolbox(extractor, max_tiles: int) -> int:
    n = min(len(extractor), max_tiles)
    for i in range(n):
        np.asarray(extractor[i])
    return n


def run_case(conn, case: dict) -> None:
    """In a forked process: plan the tiles (untimed), then read them with one reader under the PSS sampler."""
    try:
        path, slide_mpp = Path(case["path"]), case["slide_mpp"]
        tiles, tissue, level0_mpp = plan_tiles(path, case["mpp"], slide_mpp, case["max_tiles"])
        extra = {}
        if case["reader"] == "tiatoolbox":
            extractor = tiatoolbox_extractor(path, tiles, tissue, level0_mpp)
            extra["note"] = f"its grid: {len(extractor)} tiles"
        with PeakPSS() as memory:
            start = time.perf_counter()
            if case["reader"] == "wsi-qc":
                n = read_ours(path, tiles, slide_mpp, case["workers"])
            elif case["reader"] == "openslide":
                n = read_openslide(path, tiles, level0_mpp)
            else:
                n = read_tiatoolbox(extractor, case["max_tiles"])
            seconds = time.perf_counter() - start
        conn.send({"tiles": n, "seconds": seconds, "peak": memory.peak, "baseline": memory.baseline, **extra})
    except Exception as error:  # noqa: BLE001  (a failed case becomes a row with its error)
        conn.send({"error": f"{type(error).__name__}: {error}"})
    finally:
        conn.close()


def measure(case: dict) -> dict:
    parent, child = mp.get_context("fork").Pipe(duplex=False)
    process = mp.get_context("fork").Process(target=run_case, args=(child, case))
    process.start()
    child.close()
    result = parent.recv() if parent.poll(600) else {"error": "no result within 600 s"}
    process.join()
    return {**case, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tiles", type=int, default=1000, help="tiles read per case (the first N of the grid)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-qc-benchmark",
                        help="where generated slides are written (reused when present)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10240, 20480],
                        help="sides in px of the generated slides (at 0.5 mpp)")
    args = parser.parse_args(argv)

    try:  # imported once here, so that the forked cases do not each pay its 10-20 s import
        import tiatoolbox.tools.patchextraction  # noqa: F401

        has_tiatoolbox = True
    except ImportError:
        has_tiatoolbox = False
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = []
    for side in args.sizes:
        path = args.workdir / f"example-{side}-mpp0.5.tif"
        if not path.is_file():
            start = time.perf_counter()
            write_example_slide(path, size=(side, side), mpp=0.5, seed=0)
            print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
        slides.append((f"generated {side // 1024}k", path, None, 0.5, side == max(args.sizes)))
    if (SLIDES / "CMU-1-Small-Region.svs").is_file():
        slides.append(("CMU-1-Small-Region", SLIDES / "CMU-1-Small-Region.svs", None, 0.5, True))
        slides.append(("tcga-cr-7395 (mpp=1.0)", SLIDES / "tcga-cr-7395-01a-01-ts1.svs", 1.0, 1.0, True))
    else:
        print(f"real slides not found in {SLIDES}; only generated slides are measured")

    rows = []
    for label, path, slide_mpp, mpp, all_readers in slides:
        with Slide(path, mpp=slide_mpp) as slide:
            dims = "x".join(str(v) for v in slide.dimensions)
        readers = [("wsi-qc", 0), ("wsi-qc", 2)]
        if all_readers:
            readers += [("tiatoolbox", 0), ("openslide", 0)]
        for reader, workers in readers:
            case = {"slide": label, "dims": dims, "path": str(path), "slide_mpp": slide_mpp, "mpp": mpp,
                    "reader": reader, "workers": workers, "max_tiles": args.max_tiles}
            if reader == "tiatoolbox" and not has_tiatoolbox:
                rows.append({**case, "error": "skipped: tiatoolbox not installed"})
                continue
            rows.append(measure(case))
            print(f"  {label} {reader} w={workers}: {rows[-1].get('error') or 'done'}", flush=True)

    header = f"{'slide':24} {'level-0 px':>12} {'mpp':>4} {'reader':11} {'workers':>7} {'tiles':>6} " \
             f"{'tiles/s':>8} {'peak PSS MiB':>12} {'+ over start':>12}"
    print()
    print(f"Tiling: {SIZE} px tiles, tissue at {THUMBNAIL_MPP:g} mpp, min_tissue 0.5, first {args.max_tiles} tiles, "
          f"{psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(header)
    print("-" * len(header))
    for r in rows:
        worker_text = str(r["workers"]) if r["reader"] == "wsi-qc" else "-"
        start = f"{r['slide']:24} {r['dims']:>12} {r['mpp']:>4} {r['reader']:11} {worker_text:>7}"
        if "error" in r:
            print(f"{start} {r['error']}")
        else:
            print(f"{start} {r['tiles']:>6} {r['tiles'] / r['seconds']:>8.0f} {r['peak']:>12.0f} "
                  f"{r['peak'] - r['baseline']:>12.0f}  {r.get('note', '')}")
    print()
    generated = [r for r in rows if r["slide"].startswith("generated") and r["reader"] == "wsi-qc" and "error" not in r]
    two = [r for r in generated if r["workers"] == 2]
    if two:
        rate = two[-1]["tiles"] / two[-1]["seconds"]
        print(f"Goal: >= {GOAL_TILES_PER_S} tiles/s with 2 workers ({two[-1]['slide']}): {rate:.0f} tiles/s -> "
              f"{'met' if rate >= GOAL_TILES_PER_S else 'NOT met'}")
    for workers in (0, 2):
        same = [r for r in generated if r["workers"] == workers]
        if len(same) >= 2:
            peaks = ", ".join(f"{r['dims']}: {r['peak']:.0f} MiB" for r in same)
            print(f"Goal: memory flat in slide size, {workers} workers: peak PSS {peaks} "
                  f"({same[-1]['peak'] - same[0]['peak']:+.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
