"""A scorer fitted on a cohort that may hold artifacts: trimmed refitting, and the inlier core for the cut.

A flow fitted on every tile of a contaminated cohort learns part of its artifacts as normal, most of all those
that change a whole tile the way another tissue or stain would (blur, defocus, under-staining). So tiles whose
image statistics (sharpness, noise, stain, brightness) lie far from their own slide's (`stat_z`) are left out
first (SLIDE_CHECKS): artifacts hit some tiles of a slide, while rare normal tissue or a rare stain is consistent
over its slide.
Then trimmed refitting
(after the trimmed likelihood of robust statistics; SoftPatch and MeDS do the same for anomaly detection with
contaminated training data) scores the fitting tiles, drops those whose score lies more than `trim_z` robust
standard deviations (1.4826 x MAD) above the median, and refits on the rest, `rounds` times. A tile that is
rare but normal (fat, mucus, a lymphoid aggregate) is dropped only when it is as far out as an artifact; the
bound is on the whole cohort's score spread, not a fixed share, so a clean cohort loses only its extreme tail.

The label-free cut is set by calibration tiles (whole slides held out of fitting and early stopping), scored
by the final flow, of which only the inlier core (within `core_z` robust SDs of their median) counts: artifacts
among them would otherwise raise the cut above the artifacts themselves. `core_z` is wider than `trim_z`: a good
tile wrongly left out of the core lowers the cut (more false discards), one wrongly trimmed from fitting costs
little.
"""

from __future__ import annotations

import logging

import numpy as np

from wsi_qc.encoder import Encoder, stats_names
from wsi_qc.flow import held_out
from wsi_qc.image_stats import IMAGE_STATS
from wsi_qc.scorer import Scorer, holdout_groups

log = logging.getLogger(__name__)
MAD_TO_SD = 1.4826  # MAD of a normal distribution x this = its standard deviation


def inliers(scores: np.ndarray, z: float) -> np.ndarray:
    """Boolean (N,): tile scores at most `z` robust SDs (1.4826 x MAD) above the median of all of them."""
    scores = np.asarray(scores, np.float64)
    centre = np.median(scores)
    spread = MAD_TO_SD * np.median(np.abs(scores - centre))
    if not spread > 0:
        return np.ones(len(scores), bool)
    return (scores - centre) / spread <= z


# The image statistics (wsi_qc.image_stats.IMAGE_STATS) a tile must not stray on from its own slide, with the side
# that counts: focus (sharpness falls), noise (fine grain rises), stain amount and colour (either way). The
# zero-inflated pixel fractions (dark, off-palette) and the texture statistics are left to the flow: within a
# slide they spread too widely for a robust bound (24 % of the clean benchmark cohort flagged at 6 robust SDs).
SLIDE_CHECKS = {"log_laplacian_var": -1, "log_laplacian_mad": 1, "od_red": 0, "od_green": 0, "od_blue": 0,
                "hematoxylin_mean": 0, "eosin_mean": 0}


def tile_statistics(features: np.ndarray, encoder) -> np.ndarray | None:
    """The SLIDE_CHECKS image statistics carried in an encoder's features, (N, 7), sign-adjusted so that the side
    that counts is positive (two-sided ones as they are); None when its features have none."""
    names = stats_names(getattr(encoder, "image_stats", False), getattr(encoder, "grid", None))
    if len(names) < len(IMAGE_STATS):
        return None
    tile = features[:, 0, 0] if features.ndim == 4 else features  # a local tile's statistics repeat at each position
    tile = tile[:, tile.shape[-1] - len(IMAGE_STATS):].astype(np.float64)
    return np.stack([tile[:, IMAGE_STATS.index(n)] * (side or 1) for n, side in SLIDE_CHECKS.items()], axis=1)


def statistic_outliers(stats: np.ndarray | None, groups: np.ndarray, z: float | None,
                       two_sided: np.ndarray | None = None) -> np.ndarray:
    """Boolean (N,): tiles with a statistic more than `z` robust SDs from its slide's median (each statistic
    centred per slide, scaled by the cohort's MAD of those deviations; above only, or either way where
    `two_sided`, default SLIDE_CHECKS'). Blur, stain loss and noise on some tiles of a slide stand out; a slide of
    rare but normal tissue or stain is consistent with itself and does not. None: no tile (or no statistics)."""
    n = len(groups)
    if z is None or stats is None:
        return np.zeros(n, bool)
    if two_sided is None:
        two_sided = np.array([side == 0 for side in SLIDE_CHECKS.values()])
    deviation = stats.copy()
    for g in np.unique(groups):
        deviation[groups == g] -= np.median(stats[groups == g], axis=0)
    spread = MAD_TO_SD * np.median(np.abs(deviation), axis=0)
    usable = spread > 0
    z_scores = deviation[:, usable] / spread[usable]
    return (np.where(two_sided[usable], np.abs(z_scores), z_scores) > z).any(axis=1)


def fit_robust(features: np.ndarray, encoder: Encoder, config: dict, groups=None, trusted=None) -> Scorer:
    """A scorer fitted on cohort features (N, D) or (N, g, g, D) that may hold artifacts (`reference` section:
    trim_z, rounds, core_z, calibration_fraction, max_rows: each fit on at most that many feature vectors).
    `trusted` (N,) bool marks curated known-good tiles: never trimmed,
    never calibration tiles. `scorer.fitted_` (N,) bool: the tiles the last refit used (not the trimmed ones);
    `scorer.calibration_` (N,) bool: the calibration tiles."""
    r = config["reference"]
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    trusted = np.zeros(n, bool) if trusted is None else np.asarray(trusted, bool)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    cohort = np.flatnonzero(~trusted)
    calibration = np.zeros(n, bool)
    rng = np.random.default_rng(config["flow"]["seed"])
    calibration[cohort] = held_out(holdout_groups(groups[cohort], len(cohort)), r["calibration_fraction"], rng)
    fit = np.flatnonzero(~calibration)
    odd = statistic_outliers(tile_statistics(features, encoder), groups, r["stat_z"]) & ~trusted
    keep = ~odd[fit]
    for round_ in range(r["rounds"] + 1):
        rows = fit[keep]
        scorer = Scorer.fit(features[rows], encoder, config, groups=groups[rows], calibration=np.zeros(len(rows), bool),
                            max_rows=r["max_rows"])
        if round_ == r["rounds"]:
            break
        keep = (inliers(scorer.score(features[fit]), r["trim_z"]) & ~odd[fit]) | trusted[fit]
        log.info("cohort fit, round %d: %d of %d fitting tiles kept (%d trimmed)", round_ + 1, keep.sum(), len(fit),
                 (~keep).sum())
    scorer.n_reference_, scorer.fitted_, scorer.calibration_ = n, np.zeros(n, bool), calibration
    scorer.fitted_[fit[keep]] = True
    return scorer.set_calibration(features[calibration], core_z=r["core_z"], excluded=odd[calibration])
