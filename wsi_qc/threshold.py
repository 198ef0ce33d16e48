"""The keep/discard threshold on rl2, fitted by ROC/AUC on labelled tiles (1 = bad tile, 0 = good).

A tile is kept when ``rl2 <= threshold_``. Fitting picks one point of the ROC curve (rl2 is the score of
"bad") by a rule, and places the cut halfway between that point's score and the next lower one, so the
cut generalises to new scores instead of sitting on a calibration tile.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from wsi_qc import __version__
from wsi_qc.errors import ConfigError, NotFittedError
from wsi_qc.schema import Limit, check_value

log = logging.getLogger(__name__)

RULES = ("youden", "fpr", "tpr", "fixed", "false_discard")
FITTED = ("threshold_", "auc_", "auc_ci_", "roc_", "n_good_", "n_bad_")
MIN_PER_CLASS = 1       # tiles of each class fit() needs at all
FEW_PER_CLASS = 30      # below this many of a class, the AUC's CI is wide; fit() warns


class Threshold:
    """Cut on the tile score: ROC-fitted by rule "youden" (max TPR - FPR), "fpr"/"tpr" (a target rate) or
    "fixed"; or label-free, rule "false_discard" (`fit_label_free`: the conformal quantile of held-out reference
    tile scores at the target false-discard rate `value`)."""

    def __init__(self, rule: str = "youden", value: float | None = None, n_bootstrap: int = 1000, seed: int = 0):
        self.rule = rule
        self.value = value
        self.n_bootstrap = n_bootstrap
        self.seed = seed

    def __getattr__(self, name: str) -> Any:
        if name in FITTED:
            raise NotFittedError(f"this Threshold is not fitted ({name} is not set); call fit(scores, labels) "
                                 f"or Threshold.load(path, scorer_fingerprint) first")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"Threshold(rule={self.rule!r}, value={self.value!r}, n_bootstrap={self.n_bootstrap}, seed={self.seed})"

    def _check_params(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"unknown threshold rule {self.rule!r}; use one of {', '.join(RULES)} "
                              f"(threshold.rule in the config)")
        try:
            value = None if self.value is None else float(self.value)
        except (TypeError, ValueError):
            value = None
        if self.rule in ("fpr", "tpr", "false_discard") and (value is None or not 0.0 < value < 1.0):
            raise ConfigError(f"threshold rule {self.rule!r} needs a target rate strictly between 0 and 1, "
                              f"got value={self.value!r}; set threshold.value, e.g. 0.05")
        if self.rule == "fixed" and (value is None or not math.isfinite(value)):
            raise ConfigError(f"threshold rule 'fixed' needs the cut itself as a finite number, got "
                              f"value={self.value!r}; set threshold.value to an rl2 value")
        if int(self.n_bootstrap) < 0:
            raise ConfigError(f"n_bootstrap must be >= 0, got {self.n_bootstrap!r}; use 0 to skip the AUC's CI")

    def fit(self, scores, labels) -> Threshold:
        """Fit the cut on rl2 scores of labelled tiles (labels: 1 = bad, 0 = good); returns self."""
        self._check_params()
        scores, labels = check_scores_labels(scores, labels)
        n_bad = int(labels.sum())
        n_good = int(len(labels) - n_bad)
        if min(n_bad, n_good) < FEW_PER_CLASS:
            log.warning("only %d good and %d bad tiles: the AUC and its CI are rough; label at least %d of each",
                        n_good, n_bad, FEW_PER_CLASS)
        fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
        if self.rule == "fixed":
            cut = float(self.value)
        else:
            cut = _cut(thresholds, _pick(fpr, tpr, self.rule, None if self.value is None else float(self.value)))
        self.threshold_ = cut
        self.auc_ = float(roc_auc_score(labels, scores))
        self.auc_ci_ = bootstrap_auc_ci(scores, labels, int(self.n_bootstrap), int(self.seed))
        self.roc_ = (fpr, tpr, thresholds)
        self.n_good_, self.n_bad_ = n_good, n_bad
        log.info("threshold %.4g (%s), AUC %.3f on %d good / %d bad tiles", cut, self.rule, self.auc_, n_good, n_bad)
        return self

    def fit_label_free(self, reference_scores, trimmed: int = 0) -> Threshold:
        """Fit rule "false_discard" on the scores of calibration tiles (known-good, or a cohort's inlier core with
        `trimmed` tiles above it left out); returns self. `bound_` is the false-discard rate the cut achieves
        (achieved_bound)."""
        self._check_params()
        if self.rule != "false_discard":
            raise ConfigError(f"a label-free threshold needs rule 'false_discard', got {self.rule!r}; pass "
                              f"--false-discard RATE or set threshold.rule: false_discard and threshold.value")
        scores = np.asarray(reference_scores, dtype=float).ravel()
        rate = float(self.value)
        self.threshold_ = conformal_threshold(scores, rate)
        self.bound_, self.trimmed_ = achieved_bound(len(scores), rate), int(trimmed)
        if conformal_rank(len(scores), rate) == len(scores):  # the cut is the highest score
            log.warning("%d calibration tiles cannot resolve a %g %% false-discard rate (that needs %d): the cut is "
                        "their highest score, and it holds at most %.1f %%; fit the reference on more slides for a "
                        "finer cut", len(scores), 100 * rate, math.ceil(round(2 / rate - 1, 9)), 100 * self.bound_)
        self.auc_, self.auc_ci_ = float("nan"), (float("nan"), float("nan"))
        self.roc_ = (np.zeros(0), np.zeros(0), np.sort(scores)[::-1])  # no ROC: the held-out scores as thresholds
        self.n_good_, self.n_bad_ = len(scores), 0
        log.info("label-free threshold %.4g: a good tile like the %d calibration tiles scores above it with "
                 "probability at most %.2f %% (target %g %%)%s", self.threshold_, len(scores), 100 * self.bound_,
                 100 * rate, f"; {trimmed} calibration tiles above the cohort's inlier core left out (were any of "
                 f"them good, add up to {100 * trimmed / (len(scores) + trimmed):.1f} %)" if trimmed else "")
        return self

    def keep(self, scores) -> np.ndarray:
        """Boolean keep mask: rl2 <= threshold_ (NaN scores are not kept)."""
        return np.asarray(scores) <= self.threshold_

    def operating_points(self, scores, labels, fpr: tuple[float, ...] = (0.01, 0.05, 0.1),
                         tpr: tuple[float, ...] = (0.9, 0.95, 0.99)) -> list[dict]:
        """Rows (name, threshold, tpr, fpr, kept fraction) for a table: fitted cut, Youden, target FPRs/TPRs."""
        scores, labels = check_scores_labels(scores, labels)
        roc_fpr, roc_tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
        cuts: list[tuple[str, float]] = []
        if "threshold_" in self.__dict__:
            cuts.append((f"fitted ({self.rule})", self.threshold_))
        cuts.append(("youden", _cut(thresholds, _pick(roc_fpr, roc_tpr, "youden", None))))
        cuts += [(f"FPR <= {100 * v:g} %", _cut(thresholds, _pick(roc_fpr, roc_tpr, "fpr", v))) for v in fpr]
        cuts += [(f"TPR >= {100 * v:g} %", _cut(thresholds, _pick(roc_fpr, roc_tpr, "tpr", v))) for v in tpr]
        bad = labels == 1
        rows = []
        for name, cut in cuts:
            kept = scores <= cut
            rows.append({"name": name, "threshold": float(cut), "tpr": float(np.mean(~kept[bad])),
                         "fpr": float(np.mean(~kept[~bad])), "kept": float(np.mean(kept))})
        return rows

    def to_dict(self) -> dict:
        """JSON-able calibration: threshold, rule, AUC with CI, ROC arrays, counts, package version."""
        fpr, tpr, thresholds = self.roc_
        return {
            "threshold": float(self.threshold_), "rule": self.rule,
            "value": None if self.value is None else float(self.value),
            "n_bootstrap": int(self.n_bootstrap), "seed": int(self.seed),
            "auc": _finite_or_none(self.auc_), "auc_ci": [_finite_or_none(v) for v in self.auc_ci_],
            "roc": {"fpr": np.asarray(fpr, float).tolist(), "tpr": np.asarray(tpr, float).tolist(),
                    "thresholds": [_finite_or_none(v) for v in thresholds]},
            "n_good": int(self.n_good_), "n_bad": int(self.n_bad_), "wsi_qc_version": __version__,
            **({"false_discard_bound": float(self.bound_), "trimmed": int(self.trimmed_)}
               if self.rule == "false_discard" and "bound_" in self.__dict__ else {}),
        }

    def save(self, path: str | Path, scorer_fingerprint: str, score: dict | None = None) -> Path:
        """Write the calibration JSON, tied to the fingerprint of the scorer and the `score` settings (kind,
        aggregate) whose scores it was fitted on."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps({**self.to_dict(), "scorer_fingerprint": scorer_fingerprint,
                                   "score": score}, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, scorer_fingerprint: str | None, score: dict | None = None) -> Threshold:
        """Read a calibration; refuses one fitted for another scorer or other `score` settings (None skips)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"calibration file {path} not found; create it with "
                              f"wsi-qc calibrate --scorer SCORER --out {path}")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"calibration file {path} is not JSON ({exc}); "
                              f"recreate it with wsi-qc calibrate --scorer SCORER --out {path}") from exc
        _check_calibration(d, path)
        saved = d["scorer_fingerprint"]
        self = cls(d["rule"], d["value"], d["n_bootstrap"], d["seed"])
        roc = d["roc"]
        self.threshold_ = float(d["threshold"])
        self.auc_ = np.nan if d["auc"] is None else float(d["auc"])  # None: a label-free calibration
        self.auc_ci_ = tuple(np.nan if v is None else float(v) for v in d["auc_ci"])
        self.roc_ = (np.asarray(roc["fpr"], float), np.asarray(roc["tpr"], float),
                     np.array([np.inf if v is None else v for v in roc["thresholds"]], float))
        self.n_good_, self.n_bad_ = int(d["n_good"]), int(d["n_bad"])
        if "false_discard_bound" in d:
            self.bound_, self.trimmed_ = float(d["false_discard_bound"]), int(d.get("trimmed", 0))
        if scorer_fingerprint is not None and saved != scorer_fingerprint:
            raise ConfigError(f"calibration {path} was fitted for scorer fingerprint {saved}, but the scorer in use "
                              f"has fingerprint {scorer_fingerprint}; recalibrate with "
                              f"wsi-qc calibrate --scorer SCORER --out {path}")
        if score is not None and d.get("score") != score:
            raise ConfigError(f"calibration {path} was fitted on scores {d.get('score')} but the run scores with "
                              f"{score}; recalibrate with wsi-qc calibrate, or set score.kind / score.aggregate "
                              f"back to the calibration's")
        self._check_params()
        self.scorer_fingerprint_ = saved
        return self


CALIBRATION_KEYS = {
    "threshold": (float, Limit()), "rule": (str, Limit(choices=RULES)), "value": (float, Limit(null=True)),
    "n_bootstrap": (int, Limit(low=0)), "seed": (int, Limit(low=0)), "auc": (float, Limit(low=0, high=1, null=True)),
    "auc_ci": (list, Limit()), "roc": (dict, Limit()), "n_good": (int, Limit(low=1)), "n_bad": (int, Limit(low=0)),
    "scorer_fingerprint": (str, Limit()),
}
# A threshold further than this many times the span of the calibration's own ROC thresholds (its scores)
# outside that span is refused: it keeps every tile or none of any slide the calibration could describe.
THRESHOLD_SPAN_MARGIN = 10.0


def _check_calibration(d, path: Path) -> None:
    """Every key of a calibration JSON present, typed and in range; the threshold finite and near its ROC."""
    fix = f"recreate it with wsi-qc calibrate --scorer SCORER --out {path}"
    if not isinstance(d, dict):
        raise ConfigError(f"calibration file {path} holds a {type(d).__name__}, not a calibration; {fix}")
    for key, (kind, limit) in CALIBRATION_KEYS.items():
        if key not in d:
            raise ConfigError(f"calibration file {path} is not a wsi-qc calibration: it has no key {key!r}; {fix}")
        check_value(key, d[key], kind, limit, f"calibration file {path}", fix)
    for key in ("fpr", "tpr", "thresholds"):
        values = d["roc"].get(key)
        if not isinstance(values, list) or not all(v is None or _is_number(v) for v in values):
            raise ConfigError(f"roc.{key} in calibration file {path} must be a list of numbers, got {values!r:.80}; "
                              f"{fix}")
    if d["rule"] != "false_discard" and (d["n_bad"] < 1 or d["auc"] is None):  # only a label-free cut has neither
        raise ConfigError(f"calibration file {path} has rule {d['rule']!r} but n_bad={d['n_bad']} and auc={d['auc']}; "
                          f"a labelled calibration needs bad tiles and an AUC; {fix}")
    if len(d["auc_ci"]) != 2 or not all(v is None or _is_number(v) for v in d["auc_ci"]):
        raise ConfigError(f"auc_ci={d['auc_ci']!r} in calibration file {path} must be two numbers (or null); {fix}")
    scores = np.array([v for v in d["roc"]["thresholds"] if v is not None], float)
    scores = scores[np.isfinite(scores)]
    if len(scores):
        lo, hi = float(scores.min()), float(scores.max())
        margin = THRESHOLD_SPAN_MARGIN * max(hi - lo, 1e-6 * max(1.0, abs(hi)))
        if not lo - margin <= d["threshold"] <= hi + margin:
            raise ConfigError(f"threshold={d['threshold']!r} in calibration file {path} is far outside the scores it "
                              f"was calibrated on ({lo:.4g} to {hi:.4g}; allowed {lo - margin:.4g} to "
                              f"{hi + margin:.4g}); set a threshold within that range or {fix}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate labelled scores; returns float64 scores and int labels (ConfigError with the fix)."""
    scores = np.asarray(scores, dtype=float).ravel()
    labels_in = np.asarray(labels).ravel()
    if len(scores) != len(labels_in):
        raise ConfigError(f"got {len(scores)} scores but {len(labels_in)} labels; pass one label per scored tile")
    bad_values = ~np.isin(labels_in, (0, 1))
    if bad_values.any():
        seen = np.unique(labels_in[bad_values])[:5]
        raise ConfigError(f"labels must be 0 (good tile) or 1 (bad tile); {int(bad_values.sum())} are not, "
                          f"e.g. {seen.tolist()}; map your labels to 0/1 first")
    labels_out = labels_in.astype(np.int8)
    n_bad = int(labels_out.sum())
    n_good = len(labels_out) - n_bad
    if min(n_good, n_bad) < MIN_PER_CLASS:
        raise ConfigError(f"the ROC needs good (0) and bad (1) tiles, at least {MIN_PER_CLASS} of each "
                          f"({FEW_PER_CLASS}+ for a useful AUC), got {n_good} good and {n_bad} bad; "
                          f"add labelled tiles of the missing class")
    nonfinite = ~np.isfinite(scores)
    if nonfinite.any():
        raise ConfigError(f"{int(nonfinite.sum())} of {len(scores)} scores are NaN or infinite; "
                          f"check the scorer's features for these tiles or drop them before fitting")
    return scores, labels_out


def _pick(fpr: np.ndarray, tpr: np.ndarray, rule: str, value: float | None) -> int:
    """Index of the chosen ROC point (roc_curve order: FPR and TPR non-decreasing)."""
    if rule == "youden":
        return int(np.argmax(tpr - fpr))  # first maximum: the lowest FPR among ties
    if rule == "fpr":
        idx = np.flatnonzero(fpr <= value)  # never empty: the first point has FPR 0
        return int(idx[np.argmax(tpr[idx])])
    idx = np.flatnonzero(tpr >= value)  # never empty: the last point has TPR 1
    return int(idx[np.flatnonzero(fpr[idx] == fpr[idx].min())[-1]])


def _cut(thresholds: np.ndarray, i: int) -> float:
    """Cut reproducing ROC point i under keep = score <= cut: midway to the next lower distinct score."""
    if i == 0:  # nothing flagged: keep everything up to the highest score
        return float(thresholds[1])
    if i == len(thresholds) - 1:  # everything flagged
        return float(np.nextafter(thresholds[i], -np.inf))
    return float((thresholds[i] + thresholds[i + 1]) / 2)


def bootstrap_auc_ci(scores: np.ndarray, labels: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the AUC from stratified resampling (good and bad tiles resampled separately).

    Each draw's AUC (ties count 1/2) comes from cumulative counts of resampled good scores below each bad one.
    """
    if n_bootstrap == 0:
        return (float("nan"), float("nan"))
    good = np.sort(scores[labels == 0])
    bad = scores[labels == 1]
    lo_idx = np.searchsorted(good, bad, "left")
    hi_idx = np.searchsorted(good, bad, "right")
    rng = np.random.default_rng(seed)
    ng, nb = len(good), len(bad)
    aucs = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        cw = np.concatenate([[0], np.cumsum(np.bincount(rng.integers(0, ng, ng), minlength=ng))])
        w_bad = np.bincount(rng.integers(0, nb, nb), minlength=nb)
        below, upto = cw[lo_idx], cw[hi_idx]
        aucs[b] = np.sum(w_bad * (below + 0.5 * (upto - below))) / (ng * nb)
    alpha = 100 * (1 - level) / 2
    lo, hi = np.percentile(aucs, [alpha, 100 - alpha])
    return (float(lo), float(hi))


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def conformal_threshold(reference_scores, false_discard: float) -> float:
    """Label-free cut: the split-conformal (1 - false_discard) quantile of held-out reference tile scores.

    A new tile from the reference's distribution scores above it with probability at most `false_discard`
    (the ceil((n + 1)(1 - false_discard))-th smallest of n held-out scores; the largest when n is too small).
    """
    scores = np.sort(np.asarray(reference_scores, dtype=np.float64).ravel())
    if not 0 < false_discard < 1:
        raise ConfigError(f"false-discard rate {false_discard!r} must be in (0, 1); 0.02 is typical")
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise ConfigError(f"the label-free threshold needs finite held-out reference scores, got {len(scores)}; "
                          f"refit the scorer with flow.val_fraction > 0")
    return float(scores[conformal_rank(len(scores), false_discard) - 1])


def conformal_rank(n: int, false_discard: float) -> int:
    """Rank (1-based, ascending) of the label-free cut among n held-out scores: ceil((n + 1)(1 - false_discard)),
    at most n."""
    return min(int(np.ceil((n + 1) * (1 - false_discard))), n)


def achieved_bound(n: int, false_discard: float) -> float:
    """The false-discard rate the label-free cut of n calibration scores achieves: a new tile exchangeable with
    them scores above the conformal_rank-th smallest with probability (n + 1 - rank) / (n + 1) (at most
    `false_discard` when n >= 1 / false_discard - 1; 1 / (n + 1) when the cut is their highest score)."""
    return (n + 1 - conformal_rank(n, false_discard)) / (n + 1)
