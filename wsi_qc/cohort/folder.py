"""`wsi-qc run slides/` without a scorer: the folder's cohort scorer and its label-free cut, fitted once.

Tiles are drawn across the slides (`reference.tiles_per_slide` per slide, at most `reference.max_tiles` in all,
seeded), the scorer is fitted on them as a cohort (wsi_qc.cohort.robust: the folder may hold bad slides and
tiles), optionally beside curated known-good inputs (trusted: never trimmed), and its cut is set without labels
on the inlier core of its calibration slides at `reference.false_discard`. Both are kept in `<store>-cohort/`
beside the store with `cohort.json` (written last) naming what they were fitted from: a rerun on the same slides
and config reuses them, so the run fingerprint, and with it resume, is unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from wsi_qc import __version__
from wsi_qc.cohort.robust import fit_robust
from wsi_qc.errors import ConfigError, WSIQCError
from wsi_qc.identity import file_state, json_digest
from wsi_qc.scorer import encoder_from_config, reference_features, slide_features
from wsi_qc.slide import Slide
from wsi_qc.threshold import Threshold

log = logging.getLogger(__name__)
KEY_FILE = "cohort.json"
FITTED_SECTIONS = ("slide", "tissue", "tiles", "encoder", "flow", "score", "reference")  # what the scorer depends on


def cohort_folder(out: str | Path) -> Path:
    """Where a run's cohort scorer lives: <store name>-cohort beside the store."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".zarr") + "-cohort")


def _files(paths) -> list:
    """Path and identity.file_state of each input: a changed or replaced slide changes the cohort key."""
    return [[str(Path(p).resolve()), file_state(p) if Path(p).is_file() else None] for p in paths]


def cohort_key(slides, reference, config: dict) -> str:
    """What a cohort scorer is fitted from (identity.json_digest): the slides and curated inputs (path, size, mtime,
    head digest), the config sections it depends on (FITTED_SECTIONS) and the wsi-qc version."""
    return json_digest({"slides": _files(slides), "reference": _files(reference), "version": __version__,
                        "config": {s: config[s] for s in FITTED_SECTIONS}}, 16)


def sample_features(paths: list[Path], encoder, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(features, slide index of each tile) of tiles drawn across the slides; a slide that cannot be read is left
    out with a warning (the run reports it as failed)."""
    r = config["reference"]
    per_slide = max(1, min(r["tiles_per_slide"], r["max_tiles"] // max(1, len(paths))))
    parts, groups = [], []
    for i, path in enumerate(tqdm(paths, desc="cohort", unit="slide", disable=None)):
        try:
            with Slide.from_config(path, config) as slide:
                found = slide_features(slide, encoder, config, sample=per_slide).features
        except (WSIQCError, OSError) as exc:
            log.warning("%s left out of the cohort: %s", path, exc)
            continue
        parts.append(found)
        groups.append(np.full(len(found), i))
    if not parts:
        return np.zeros((0,), np.float32), np.zeros(0, int)
    return np.concatenate(parts), np.concatenate(groups)


def cohort_scorer(slides: list[Path], config: dict, out: str | Path, reference=()) -> tuple[Path, Path]:
    """(scorer folder, calibration file) of the slides' cohort scorer in cohort_folder(out): reused when fitted
    from the same slides, curated `reference` inputs and config, else fitted (see the module docstring)."""
    folder = cohort_folder(out)
    scorer_dir, calibration = folder / "scorer", folder / "calibration.json"
    key = cohort_key(slides, reference, config)
    try:
        if json.loads((folder / KEY_FILE).read_text()).get("key") == key and calibration.is_file():
            log.info("cohort scorer %s reused (same slides and config)", scorer_dir)
            return scorer_dir, calibration
    except (OSError, ValueError):
        pass
    r = config["reference"]
    encoder = encoder_from_config(config)
    features, groups = sample_features(slides, encoder, config)
    trusted = np.zeros(len(features), bool)
    if reference:
        curated, curated_groups = reference_features(reference, encoder, config)
        features = curated if not len(features) else np.concatenate([features, curated])
        groups = np.concatenate([groups, curated_groups + len(slides)])
        trusted = np.r_[trusted, np.ones(len(curated), bool)]
    if (~trusted).sum() < config["flow"]["min_reference"]:
        raise ConfigError(f"the {len(slides)} slide(s) gave {int((~trusted).sum())} tissue tiles; a cohort scorer "
                          f"needs at least {config['flow']['min_reference']} (flow.min_reference): add slides, raise "
                          f"reference.tiles_per_slide (now {r['tiles_per_slide']}), or pass --scorer and --calibration")
    scorer = fit_robust(features, encoder, {**config, "reference": {**r, "robust": True}}, groups=groups,
                        trusted=trusted)
    shutil.rmtree(folder, ignore_errors=True)
    scorer.save(scorer_dir)
    threshold = Threshold("false_discard", r["false_discard"]).fit_label_free(scorer.heldout_scores(), scorer.trimmed)
    threshold.save(calibration, scorer.fingerprint, config["score"])
    (folder / KEY_FILE).write_text(json.dumps({"key": key, "slides": len(slides), "tiles": len(features),
                                               "fitted": int(scorer.fitted_.sum()),
                                               "calibration_core": len(scorer.heldout_scores()),
                                               "calibration_trimmed": scorer.trimmed,
                                               "false_discard_bound": threshold.bound_}, indent=1))
    log.info("cohort scorer: %d of %d tiles from %d slides fitted, %d calibration tiles above the inlier core left "
             "out; label-free cut %.4f -> %s", scorer.fitted_.sum(), len(features), len(slides), scorer.trimmed,
             threshold.threshold_, folder)
    return scorer_dir, calibration
