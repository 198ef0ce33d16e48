"""A scorer fitted on a cohort that may hold artifacts: trimmed refitting, and the inlier core for the cut.

A flow fitted on every tile of a contaminated cohort learns part of its artifacts as normal. Trimmed refitting
(after the trimmed likelihood of robust statistics; SoftPatch and MeDS do the same for anomaly detection with
contaminated training data) scores the fitting tiles, drops those whose score lies more than `trim_z` robust
standard deviations (1.4826 x MAD) above the median, and refits on the rest, `rounds` times. A tile that is
rare but normal (fat, mucus, a lymphoid aggregate) is dropped only when it is as far out as an artifact; the
bound is on the whole cohort's score spread, not a fixed share, so a clean cohort loses only its extreme tail.

The label-free cut is set by calibration tiles (whole slides held out of fitting and early stopping), scored
by the final flow, of which only the inlier core (inside the same bound) counts: artifacts among them would
otherwise raise the cut above the artifacts themselves.
"""

from __future__ import annotations

import logging

import numpy as np

from wsi_qc.encoder import Encoder
from wsi_qc.flow import held_out
from wsi_qc.scorer import Scorer, holdout_groups

log = logging.getLogger(__name__)
MAD_TO_SD = 1.4826  # MAD of a normal distribution x this = its standard deviation


def inliers(scores: np.ndarray, trim_z: float) -> np.ndarray:
    """Boolean (N,): tile scores at most `trim_z` robust SDs (1.4826 x MAD) above the median of all of them."""
    scores = np.asarray(scores, np.float64)
    centre = np.median(scores)
    spread = MAD_TO_SD * np.median(np.abs(scores - centre))
    if not spread > 0:
        return np.ones(len(scores), bool)
    return (scores - centre) / spread <= trim_z


def fit_robust(features: np.ndarray, encoder: Encoder, config: dict, groups=None, trusted=None) -> Scorer:
    """A scorer fitted on cohort features (N, D) or (N, g, g, D) that may hold artifacts (`reference` section:
    trim_z, rounds, calibration_fraction, max_rows: each fit on at most that many feature vectors). `trusted` (N,) bool marks curated known-good tiles: never trimmed,
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
    keep = np.ones(len(fit), bool)
    for round_ in range(r["rounds"] + 1):
        rows = fit[keep]
        scorer = Scorer.fit(features[rows], encoder, config, groups=groups[rows], calibration=np.zeros(len(rows), bool),
                            max_rows=r["max_rows"])
        if round_ == r["rounds"]:
            break
        keep = inliers(scorer.score(features[fit]), r["trim_z"]) | trusted[fit]
        log.info("cohort fit, round %d: %d of %d fitting tiles kept (%d trimmed)", round_ + 1, keep.sum(), len(fit),
                 (~keep).sum())
    scorer.n_reference_, scorer.fitted_, scorer.calibration_ = n, np.zeros(n, bool), calibration
    scorer.fitted_[fit[keep]] = True
    return scorer.set_calibration(features[calibration], trim_z=r["trim_z"])
