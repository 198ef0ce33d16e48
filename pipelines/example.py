"""The README's main job on generated example slides (no download): the whole QC workflow, step by step.

1. write example slides (pyramidal JPEG TIFFs from real stained images shipped in tiatoolbox and scikit-image)
2. wsi-qc run on the slide folder with no reference and no labels: the folder's own cohort scorer and label-free
   cut -> folder.zarr (+ folder-cohort/, folder-report/)
then the curated workflow:
3. make a labelled calibration set (clean reference tiles, clean and synthetic-artifact calibration tiles)
4. wsi-qc fit-reference on the clean reference tiles
5. wsi-qc calibrate on the labelled tiles (ROC, AUC, threshold)
6. wsi-qc run on the slide folder -> qc.zarr, overlays, GeoJSON, report.csv / report.html

    python -m pipelines.example --out example
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from wsi_qc import cli
from wsi_qc.data import write_example_slide


def step(title: str, argv: list[str]) -> int:
    print(f"\n== {title}\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    code = cli.main(argv[1:])
    if code != 0:
        raise SystemExit(f"step '{title}' exited {code}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example", help="folder for slides, scorer, calibration and results")
    parser.add_argument("--slides", type=int, default=4, help="number of example slides")
    parser.add_argument("--size", type=int, default=8192, help="side of each example slide in px at 0.25 mpp")
    args = parser.parse_args(argv)
    out = Path(args.out)
    slides = out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    print(f"== 1. example slides in {slides}")
    for i in range(args.slides):
        path = slides / f"example-{i + 1}.tif"
        if not path.exists():
            write_example_slide(path, size=(args.size, args.size), mpp=0.25, seed=i)
        print(f"   {path} ({path.stat().st_size / 1e6:.1f} MB)")
    step("2. QC the slide folder with no reference and no labels (its own cohort scorer)",
         ["wsi-qc", "run", str(slides), "--out", str(out / "folder.zarr")])
    cal, scorer, calibration = out / "calibration", out / "scorer", out / "calibration.json"
    step("3. labelled calibration set", ["wsi-qc", "make-calibration-set", "--slides", str(slides), "--out", str(cal),
                                         "--overwrite"])
    step("4. fit the reference flow", ["wsi-qc", "fit-reference", str(cal / "reference"), "--out", str(scorer)])
    step("5. calibrate the threshold", ["wsi-qc", "calibrate", "--scorer", str(scorer), "--labels",
                                        str(cal / "labels.csv"), "--out", str(calibration)])
    step("6. QC the slide folder with the curated scorer", ["wsi-qc", "run", str(slides), "--scorer", str(scorer),
                                                            "--calibration", str(calibration), "--out",
                                                            str(out / "qc.zarr")])
    print(f"\nDone. Open {out / 'folder-report' / 'report.html'} (cohort) and {out / 'qc-report' / 'report.html'} "
          f"(curated) in a browser; masks are in {out / 'folder.zarr'} and {out / 'qc.zarr'}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
