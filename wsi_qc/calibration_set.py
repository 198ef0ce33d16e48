"""A labelled calibration set: clean tissue tiles from real slides plus synthetic artifact versions of them.

Source tiles (tiles.mpp, tiles.size, at least `min_tissue` tissue) are drawn at random over all
slides and split three ways, each source tile used in one part only:

- reference: written clean (label 0, split "reference") for fitting the reference flow;
- calibration, good: written clean (label 0, split "calibration");
- calibration, artifact: written once per severity with one artifact kind (label 1, split "calibration");
  kinds are assigned in turn so every kind gets the same number of source tiles.

With `paired: true` the artifact source tiles are also written clean (label 0). Writes
out/reference/*.png (clean tiles to fit the reference flow), out/calibration/*.png and
out/labels.csv (path,label,artifact,severity,split,source,slide,x,y; paths
relative to out/, x, y level-0 top-left) and out/summary.json. Defaults: wsi_qc/configs/calibration_set.yaml.

    wsi-qc make-calibration-set --out out/calibration [--slides DIR] [--n-clean 300]
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tqdm.auto import tqdm

from wsi_qc.artifacts import ARTIFACT_KINDS, SEVERITIES, make_artifact
from wsi_qc.config import load_config, package_file
from wsi_qc.data import write_example_slide
from wsi_qc.errors import ConfigError
from wsi_qc.slide import Slide
from wsi_qc.tiles import Tiles, iter_tile_batches, make_tiles
from wsi_qc.tissue import find_tissue

log = logging.getLogger(__name__)
# the real slides beside a wsi-qc checkout (../shared/data/slides), used when no slide is given
SHARED_SLIDES = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
DEFAULT_CONFIG = package_file("configs", "calibration_set.yaml")
SECTION = "calibration_set"
COLUMNS = ("path", "label", "artifact", "severity", "split", "source", "slide", "x", "y")


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a mapping of sections")
    return data


def read_config(path: str | Path | None = None) -> tuple[dict, dict]:
    """(wsi-qc config, calibration_set section): wsi_qc/configs/calibration_set.yaml overlaid with `path`.

    Keys of the section unknown to that file are refused, as are unknown wsi-qc keys.
    """
    base = _read(DEFAULT_CONFIG)
    own = base.pop(SECTION)
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG:
        user = _read(Path(path))
        user_own = user.pop(SECTION, None) or {}
        unknown = sorted(set(user_own) - set(own))
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in the {SECTION} section of {path}; "
                              f"known keys: {', '.join(own)}")
        own = {**own, **user_own}
        base = _deep_merge(base, user)
    return load_config(overrides=base), own


def check(own: dict) -> None:
    bad_kinds = [k for k in own["kinds"] if k not in ARTIFACT_KINDS]
    if bad_kinds or not own["kinds"]:
        raise ConfigError(f"{SECTION}.kinds {own['kinds']!r} must name artifacts among: {', '.join(ARTIFACT_KINDS)}")
    if not own["severities"] or any(s not in SEVERITIES for s in own["severities"]):
        raise ConfigError(f"{SECTION}.severities {own['severities']!r} must be a non-empty list of {SEVERITIES}")
    for key in ("reference_fraction", "artifact_fraction", "min_tissue"):
        if not 0 <= own[key] <= 1:
            raise ConfigError(f"{SECTION}.{key} = {own[key]!r} must lie in [0, 1]")
    if not int(own["n_clean"]) > 0:
        raise ConfigError(f"{SECTION}.n_clean = {own['n_clean']!r} must be a positive number of tiles")


def slide_paths(given: list[str] | None, own: dict, pattern: str, out: Path) -> list[Path]:
    """Slide files: given (files or folders), else ../shared/data/slides, else generated example slides."""
    given = given or own["slides"]
    if isinstance(given, str):
        given = [given]
    if not given:
        if SHARED_SLIDES.is_dir():
            given = [SHARED_SLIDES]
        else:
            log.info("no slides given and %s is absent: writing %d example slides", SHARED_SLIDES,
                     own["example_slides"])
            side = int(own["example_size"])
            return [write_example_slide(out / "slides" / f"example-{i}.tif", size=(side, side), seed=own["seed"] + i)
                    for i in range(int(own["example_slides"]))]
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    paths: list[Path] = []
    for item in map(Path, given):
        if item.is_dir():
            paths += sorted({p for g in globs for p in item.rglob(g) if p.is_file()})
        elif item.is_file():
            paths.append(item)
        else:
            raise ConfigError(f"slide path {item} does not exist; pass slide files or folders holding slides")
    if not paths:
        raise ConfigError(f"no slides matching {pattern} under {', '.join(map(str, given))}; pass other --slides")
    return paths


def candidate_tiles(path: Path, config: dict, own: dict) -> tuple[float, Tiles]:
    """(slide mpp, tissue tiles) of one slide at the configured tile mpp and size."""
    s, t, tis = config["slide"], config["tiles"], config["tissue"]
    mpp = (own["slide_mpp"] or {}).get(path.name, s["mpp"])
    with Slide(path, mpp=mpp, mpp_fallback=s["mpp_fallback"]) as slide:
        if slide.mpp > t["mpp"] * 1.01:
            raise ConfigError(f"{path.name} is scanned at {slide.mpp:g} mpp, coarser than tiles.mpp {t['mpp']:g}; "
                              f"leave it out or ask for tiles.mpp >= {slide.mpp:g}")
        thumb_mpp = max(tis["thumbnail_mpp"], slide.mpp)
        tissue = find_tissue(slide.thumbnail(thumb_mpp), thumb_mpp, method=tis["method"],
                             min_area_um2=tis["min_area_um2"], closing_um=tis["closing_um"],
                             fill_holes=tis["fill_holes"])
        tiles = make_tiles(slide, tissue, thumb_mpp, t["mpp"], t["size"], overlap=t["overlap"],
                           min_tissue=own["min_tissue"])
        return slide.mpp, tiles


def _subset(tiles: Tiles, index: np.ndarray) -> Tiles:
    return replace(tiles, coords=tiles.coords[index], grid_index=tiles.grid_index[index],
                   tissue_fraction=tiles.tissue_fraction[index])


def assign(n: int, own: dict, rng: np.random.Generator) -> tuple[list[str], list[str | None]]:
    """Per source tile: its part ("reference" | "good" | "artifact") and artifact kind (None when clean)."""
    n_ref = int(round(own["reference_fraction"] * n))
    n_bad = int(round(own["artifact_fraction"] * (n - n_ref)))
    parts = np.array(["reference"] * n_ref + ["artifact"] * n_bad + ["good"] * (n - n_ref - n_bad), dtype=object)
    parts = parts[rng.permutation(n)]
    kinds: list[str | None] = [None] * n
    order = rng.permutation(len(own["kinds"]))
    for j, i in enumerate(np.flatnonzero(parts == "artifact")):
        kinds[i] = own["kinds"][order[j % len(order)]]
    return list(parts), kinds


def build(paths: list[Path], config: dict, own: dict, out: Path, n_clean: int, seed: int) -> dict:
    """Tile the slides, draw source tiles, write the PNGs and labels.csv; returns a summary."""
    rng = np.random.default_rng(seed)
    slides, failed = [], {}
    for path in tqdm(paths, desc="slides", unit="slide", disable=None):
        try:
            mpp, tiles = candidate_tiles(path, config, own)
        except Exception as exc:  # one slide's failure never stops the set; it is reported
            log.warning("skipping %s: %s: %s", path.name, type(exc).__name__, exc)
            failed[str(path)] = f"{type(exc).__name__}: {exc}"
            continue
        log.info("%s: %d tissue tiles of %d px at %g mpp", path.name, len(tiles), tiles.size, tiles.mpp)
        if len(tiles):
            slides.append((path, mpp, tiles))
    total = sum(len(t) for _, _, t in slides)
    if total == 0:
        raise ConfigError(f"no slide gave a tile with >= {own['min_tissue']} tissue at {config['tiles']['mpp']} mpp; "
                          f"pass other --slides or lower {SECTION}.min_tissue")
    if total < n_clean:
        log.warning("only %d tissue tiles on %d slides, fewer than n_clean = %d: using all",
                    total, len(slides), n_clean)
    chosen = np.sort(rng.choice(total, size=min(n_clean, total), replace=False))
    parts, kinds = assign(len(chosen), own, rng)
    for split in ("reference", "calibration"):
        (out / split).mkdir(parents=True, exist_ok=True)
    rows, offset, source, per_slide = [], 0, 0, {}
    with tqdm(total=len(chosen), desc="source tiles", unit="tile", disable=None) as bar:
        for path, mpp, tiles in slides:
            local = chosen[(chosen >= offset) & (chosen < offset + len(tiles))] - offset
            offset += len(tiles)
            slide_name = _relative(path, out)
            per_slide[slide_name] = len(local)
            if not len(local):
                continue
            sub = _subset(tiles, local)
            for index, images in iter_tile_batches(path, sub, batch_size=config["tiles"]["batch_size"], workers=0,
                                                   slide_mpp=mpp):
                for i, image in zip(index, images):
                    x, y = (int(v) for v in sub.coords[i])
                    rows += _write_source(image, source, parts[source], kinds[source], own, seed, out,
                                          f"{path.stem}_x{x}_y{y}", dict(slide=slide_name, x=x, y=y))
                    source += 1
                    bar.update()
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    counts = {
        "source_tiles": len(chosen),
        "reference": sum(r["split"] == "reference" for r in rows),
        "calibration_good": sum(r["split"] == "calibration" and r["label"] == 0 for r in rows),
        "calibration_bad": sum(r["label"] == 1 for r in rows),
        "per_kind": {k: sum(r["artifact"] == k for r in rows) for k in own["kinds"]},
        "per_slide": per_slide,
    }
    return {"counts": counts, "failed": failed, "tile_mpp": config["tiles"]["mpp"],
            "tile_size": config["tiles"]["size"], "seed": seed, "config": own}


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


def _write_source(image: np.ndarray, source: int, part: str, kind: str | None, own: dict, seed: int,
                  out: Path, stem: str, where: dict) -> list[dict]:
    """Write one source tile's PNG(s) into out/reference/ or out/calibration/; return their label rows."""
    rows = []
    if part != "artifact" or own["paired"]:
        split = "reference" if part == "reference" else "calibration"
        name = f"{split}/{stem}.png"
        Image.fromarray(image).save(out / name)
        rows.append(dict(path=name, label=0, artifact="", severity=0, split=split, source=source, **where))
    if part == "artifact":
        for severity in own["severities"]:
            rng = np.random.default_rng([seed, source, severity])  # independent of the order tiles are read in
            name = f"calibration/{stem}_{kind}{severity}.png"
            Image.fromarray(make_artifact(image, kind, severity, rng)).save(out / name)
            rows.append(dict(path=name, label=1, artifact=kind, severity=severity, split="calibration",
                             source=source, **where))
    return rows


def make_calibration_set(out: str | Path, config: str | Path | None = None, slides: list[str] | None = None,
                         n_clean: int | None = None, seed: int | None = None, overwrite: bool = False) -> dict:
    """Write a calibration set into `out` (refused when one is there, unless `overwrite`); returns its summary,
    also written to out/summary.json. `n_clean` and `seed` override the config's calibration_set values."""
    out = Path(out)
    config, own = read_config(config)
    if n_clean is not None:
        own["n_clean"] = n_clean
    if seed is not None:
        own["seed"] = seed
    check(own)
    if (out / "labels.csv").exists():
        if not overwrite:
            raise ConfigError(f"{out} already holds a calibration set (labels.csv); pass --overwrite or another --out")
        for split in ("reference", "calibration"):
            shutil.rmtree(out / split, ignore_errors=True)
        (out / "labels.csv").unlink()
    out.mkdir(parents=True, exist_ok=True)
    paths = slide_paths(slides, own, config["run"]["pattern"], out)
    summary = build(paths, config, own, out, int(own["n_clean"]), int(own["seed"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
