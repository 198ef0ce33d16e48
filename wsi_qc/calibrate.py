"""Calibration: labelled tiles (1 = bad, 0 = good) -> scores -> threshold with ROC, AUC and its CI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from wsi_qc.errors import ConfigError
from wsi_qc.report import roc_png
from wsi_qc.scorer import Scorer, batches, encode, image_paths, read_tile_images
from wsi_qc.slide import Slide
from wsi_qc.threshold import Threshold

log = logging.getLogger(__name__)


def read_labels(labels: str | Path | None = None, good: str | Path | None = None,
                bad: str | Path | None = None) -> pd.DataFrame:
    """Labelled tiles as a table: `path,label` (tile images) or `slide,x,y,label`, plus optional `artifact`.

    Rows of a `split` column other than "calibration" (e.g. the reference tiles) are left out.
    """
    if labels is not None:
        labels = Path(labels)
        if not labels.is_file():
            raise ConfigError(f"labels file {labels} does not exist; pass a CSV with path,label or slide,x,y,label")
        table = pd.read_csv(labels)
        if "label" not in table:
            raise ConfigError(f"{labels} has no 'label' column (columns: {', '.join(table.columns)}); "
                              f"add label with 1 = bad tile, 0 = good tile")
        if "split" in table:
            table = table[table["split"] == "calibration"]
        for col in ("path", "slide"):
            if col in table:
                table[col] = [str(p if Path(p).is_absolute() else labels.parent / p) for p in table[col]]
        if "path" not in table and not {"slide", "x", "y"} <= set(table.columns):
            raise ConfigError(f"{labels} names no tiles: give a 'path' column (tile images) or 'slide','x','y'")
    elif good is not None and bad is not None:
        table = pd.concat([pd.DataFrame({"path": list(map(str, image_paths(good))), "label": 0}),
                           pd.DataFrame({"path": list(map(str, image_paths(bad))), "label": 1})])
    else:
        raise ConfigError("no labelled tiles given; pass --labels labels.csv or both --good DIR and --bad DIR")
    where = table["path"] if "path" in table else table["slide"]
    missing = sorted({p for p in where if not Path(p).is_file()})
    if missing:
        raise ConfigError(f"{len(missing)} labelled tiles name files that do not exist: {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}; "
                          f"fix the paths (relative paths are read from the labels file's folder)")
    return table.reset_index(drop=True)


def labelled_images(table: pd.DataFrame, config: dict) -> np.ndarray:
    """The tiles a label table names, uint8 (N, size, size, 3)."""
    size = config["tiles"]["size"]
    if "path" in table:
        return read_tile_images(table["path"], size)
    images = np.zeros((len(table), size, size, 3), np.uint8)
    for slide_path, rows in table.groupby("slide"):
        with Slide.from_config(slide_path, config) as slide:
            for i, row in rows.iterrows():
                images[i] = slide.read_region((int(row.x), int(row.y)), (size, size), config["tiles"]["mpp"])
    return images


def per_artifact_auc(scores: np.ndarray, table: pd.DataFrame) -> dict[str, float]:
    """AUC of each artifact type against all good tiles."""
    if "artifact" not in table:
        return {}
    good = table["label"].to_numpy() == 0
    out = {}
    for kind in sorted(table.loc[~good, "artifact"].dropna().unique()):
        bad = (table["artifact"] == kind).to_numpy() & ~good
        y = np.r_[np.zeros(good.sum()), np.ones(bad.sum())]
        out[kind] = float(roc_auc_score(y, np.r_[scores[good], scores[bad]]))
    return out


def calibrate(config: dict, scorer_path: str | Path, labels=None, good=None, bad=None,
              out: str | Path = "calibration.json", roc: str | Path | None = None, verbose: bool = True) -> dict:
    """Fit the threshold on labelled tiles (or, rule false_discard, on the scorer's held-out reference tiles);
    write calibration JSON and ROC PNG; print operating points."""
    scorer = Scorer.load(scorer_path, config)
    config = scorer.config
    out = Path(out)
    if config["threshold"]["rule"] != "false_discard" and labels is None and good is None:
        if scorer.inlier_ is None:
            raise ConfigError("calibration needs labelled tiles (a labels CSV, or folders of good and bad tiles) or a "
                              "false-discard rate for a label-free cut: wsi-qc calibrate --labels CSV | --good DIR "
                              "--bad DIR | --false-discard 0.02; in Python fit_threshold(labels=...) or "
                              "false_discard=0.02")
        config["threshold"] = {**config["threshold"], "rule": "false_discard",  # a cohort scorer: its own cut
                               "value": config["reference"]["false_discard"]}
    if config["threshold"]["rule"] == "false_discard":
        threshold = Threshold(**config["threshold"]).fit_label_free(scorer.heldout_scores(), scorer.trimmed)
        threshold.save(out, scorer.fingerprint, config["score"])
        if verbose:
            core = f" (the cohort's inlier core; {threshold.trimmed_} above it left out)" if threshold.trimmed_ else ""
            print(f"label-free threshold {threshold.threshold_:.4f}: a good tile like the {threshold.n_good_} "
                  f"calibration tiles{core} scores above it with probability at most {100 * threshold.bound_:.2f} % "
                  f"(target {100 * threshold.value:g} %); calibration -> {out}")
        return {"threshold": threshold.threshold_, "rule": threshold.rule, "calibration": str(out),
                "false_discard_bound": threshold.bound_, "trimmed": threshold.trimmed_}
    table = read_labels(labels, good, bad)
    images = labelled_images(table, config)
    features = encode(scorer.encoder, batches(images, config["tiles"]["batch_size"]), len(images), desc="labelled")
    scores = scorer.score(features)
    y = table["label"].to_numpy()
    threshold = Threshold(**config["threshold"]).fit(scores, y)
    types = per_artifact_auc(scores, table)
    threshold.save(out, scorer.fingerprint, config["score"])
    roc = Path(roc) if roc else out.with_name(out.stem + "_roc.png")
    fpr, tpr, _ = threshold.roc_
    keep = threshold.keep(scores)
    point = (float(np.mean(~keep[y == 0])), float(np.mean(~keep[y == 1])))  # (FPR, TPR) at the threshold
    roc_png(roc, fpr, tpr, threshold.auc_, threshold.auc_ci_, point, None)
    summary = {"auc": threshold.auc_, "auc_ci": threshold.auc_ci_, "threshold": threshold.threshold_,
               "per_artifact_auc": types, "n_good": threshold.n_good_, "n_bad": threshold.n_bad_,
               "calibration": str(out), "roc": str(roc)}
    if verbose:
        lo, hi = threshold.auc_ci_
        print(f"AUC {threshold.auc_:.3f} (95 % CI {lo:.3f}-{hi:.3f}) on {threshold.n_good_} good and "
              f"{threshold.n_bad_} bad tiles; threshold {threshold.threshold_:.4f} ({threshold.rule})")
        print(f"{'operating point':<18}{'threshold':>10}{'TPR':>8}{'FPR':>8}{'kept %':>8}")
        for op in threshold.operating_points(scores, y):
            print(f"{op['name']:<18}{op['threshold']:>10.4f}{op['tpr']:>8.3f}{op['fpr']:>8.3f}{100 * op['kept']:>8.1f}")
        if types:
            print("AUC per artifact type: " + ", ".join(f"{k} {v:.3f}" for k, v in types.items()))
        print(f"calibration -> {out}; ROC -> {roc}")
    return summary
