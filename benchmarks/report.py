"""report.html at scale: size and the time headless Chromium takes to open it, for a run of 1000 slides.

Rows are synthetic (as a run leaves them: done slides, every 50th failed with a traceback, timings); each
slide gets a real 160 px thumbnail PNG. Cases: images linked beside the page (the default) and embedded
(`--embed`). Chromium's time is the wall time of `chromium --headless --dump-dom` on the page (it returns
after load, scripts run), minus the same on an empty page. Prints one table.
Run: python benchmarks/report.py [--slides 1000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.data import immunohistochemistry

from wsi_qc.report import thumbnail_png, write_report_html


def synthetic_rows(n: int = 1000) -> list[dict]:
    """Report rows as a run of `n` slides leaves them: done, every 50th failed with a traceback, timings."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        tiles = int(rng.integers(200, 40000))
        keep = int(tiles * rng.uniform(0.3, 1.0))
        row = {"slide": f"TCGA-{i:04d}-01Z-00-DX1", "path": f"/data/slides/TCGA-{i:04d}-01Z-00-DX1.svs",
               "status": "done", "error": "", "traceback": "", "n_tiles": tiles, "n_keep": keep,
               "kept_pct": round(100 * keep / tiles, 2), "rl2_median": float(rng.uniform(0.5, 1.5)),
               "rl2_p95": float(rng.uniform(1.5, 3.0)), "seconds": float(rng.uniform(60, 900)),
               "tile_s": 3.2, "encode_s": 512.3, "score_s": 1.1, "write_s": 0.4, "report_s": 2.2,
               "tiles_per_s": 51.0, "peak_rss_mb": 1984.5}
        if i % 50 == 7:
            row.update(status="failed", n_tiles=0, n_keep=0, kept_pct=np.nan, rl2_median=np.nan, rl2_p95=np.nan,
                       error=f"SlideError: {row['path']} has no mpp in its metadata; pass --mpp",
                       traceback="Traceback (most recent call last):\n" + '  File "wsi_qc/run.py"\n' * 20)
        rows.append(row)
    return rows


def chromium_seconds(binary: str, page: Path, profile: Path, repeats: int = 3) -> float:
    """Best of `repeats` wall times of headless Chromium loading `page` and dumping its DOM."""
    best = float("inf")
    for i in range(repeats):
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
               "--disable-background-networking", "--allow-file-access-from-files",
               f"--user-data-dir={profile}-{i}", "--dump-dom", page.as_uri()]
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, timeout=300, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--workdir", help="folder for the reports (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsi-qc-report-bench-"))
    rows = synthetic_rows(args.slides)
    thumb = immunohistochemistry()
    images = {}
    for row in rows:
        if row["status"] != "failed":
            png = thumbnail_png(work / "thumbnails" / f"{row['slide']}.png", thumb, max_side=160)
            images[row["slide"]] = {"thumbnail": png}
    pages = {r["slide"]: work / "slides" / f"{r['slide']}.html" for r in rows}
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    empty = work / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>\n")
    base = chromium_seconds(binary, empty, work / "profile-empty") if binary else None
    print(f"{args.slides} slides ({sum(r['status'] == 'failed' for r in rows)} failed); "
          f"chromium: {binary or 'not found (times left out)'}; empty page {base or float('nan'):.2f} s")
    print(f"{'case':<10} {'write s':>8} {'HTML MB':>8} {'chromium s':>11} {'over empty s':>13}")
    for case, embed in (("linked", False), ("embedded", True)):
        start = time.perf_counter()
        page = write_report_html(work / f"report-{case}.html", rows, images, slide_pages=pages, embed=embed)
        written = time.perf_counter() - start
        opened = chromium_seconds(binary, page, work / f"profile-{case}") if binary else float("nan")
        print(f"{case:<10} {written:>8.2f} {page.stat().st_size / 1e6:>8.2f} {opened:>11.2f} "
              f"{opened - (base or float('nan')):>13.2f}")
    print(f"reports in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
