"""Instance segmentation metrics as HoVer-Net reports them: Dice, AJI (Kumar et al.), PQ = DQ x SQ, type F1.

Per-image functions return additive components, so that tiles of one source image (CoNSeP) can be pooled
into one score per source image before averaging and bootstrapping over images.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _overlaps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection (n_true, n_pred) and areas of the instances of two maps with ids 1..N (dense)."""
    nt, np_ = int(true.max()), int(pred.max())
    joint = np.bincount(true.ravel().astype(np.int64) * (np_ + 1) + pred.ravel(), minlength=(nt + 1) * (np_ + 1))
    joint = joint.reshape(nt + 1, np_ + 1)
    return joint[1:, 1:], joint[1:, :].sum(1), joint[:, 1:].sum(0)


def _dense(labels: np.ndarray) -> np.ndarray:
    ids, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape)
    return out if ids[0] == 0 else out + 1


def dice_parts(true: np.ndarray, pred: np.ndarray) -> dict:
    """Foreground Dice components: intersection and the two areas."""
    t, p = true > 0, pred > 0
    return {"inter": int((t & p).sum()), "sum": int(t.sum() + p.sum())}


def aji_parts(true: np.ndarray, pred: np.ndarray) -> dict:
    """AJI (Kumar et al. 2017) components: each true nucleus is paired with the prediction of highest IoU
    (its intersection to C, its union to U); predictions never paired add their area to U."""
    true, pred = _dense(true), _dense(pred)
    inter, a_true, a_pred = _overlaps(true, pred)
    c = u = 0
    used = np.zeros(len(a_pred), bool)
    for i in range(len(a_true)):
        if len(a_pred) == 0 or inter[i].max() == 0:
            u += a_true[i]
            continue
        iou = inter[i] / (a_true[i] + a_pred - inter[i])
        j = int(iou.argmax())
        c += inter[i, j]
        u += a_true[i] + a_pred[j] - inter[i, j]
        used[j] = True
    u += a_pred[~used].sum()
    return {"c": int(c), "u": int(u)}


def pq_parts(true: np.ndarray, pred: np.ndarray) -> dict:
    """PQ components: pairs with IoU > 0.5 (unique by construction), their IoU sum, FP and FN counts."""
    true, pred = _dense(true), _dense(pred)
    inter, a_true, a_pred = _overlaps(true, pred)
    iou = inter / np.maximum(a_true[:, None] + a_pred[None, :] - inter, 1)
    tp_iou = iou[iou > 0.5]
    tp = len(tp_iou)
    return {"tp": tp, "fp": len(a_pred) - tp, "fn": len(a_true) - tp, "iou_sum": float(tp_iou.sum())}


def scores(parts: dict) -> dict:
    """Dice, AJI, DQ, SQ, PQ from (summed) components."""
    dq_den = parts["tp"] + 0.5 * parts["fp"] + 0.5 * parts["fn"]
    dq = parts["tp"] / dq_den if dq_den else 1.0
    sq = parts["iou_sum"] / parts["tp"] if parts["tp"] else 0.0
    return {"dice": 2 * parts["inter"] / parts["sum"] if parts["sum"] else 1.0,
            "aji": parts["c"] / parts["u"] if parts["u"] else 1.0, "dq": dq, "sq": sq, "pq": dq * sq}


def image_parts(true: np.ndarray, pred: np.ndarray) -> dict:
    """All components of one image (or tile)."""
    return {**dice_parts(true, pred), **aji_parts(true, pred), **pq_parts(true, pred)}


def add_parts(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def pair_centroids(true_xy: np.ndarray, pred_xy: np.ndarray, radius: float = 12.0):
    """Hungarian pairing of centroids within `radius` px (HoVer-Net's pair_coordinates): paired indices
    (true, pred), unpaired true, unpaired pred."""
    if len(true_xy) == 0 or len(pred_xy) == 0:
        return np.zeros((0, 2), int), np.arange(len(true_xy)), np.arange(len(pred_xy))
    d = np.linalg.norm(true_xy[:, None, :] - pred_xy[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(d)
    keep = d[rows, cols] <= radius
    paired = np.stack([rows[keep], cols[keep]], 1)
    return paired, np.setdiff1d(np.arange(len(true_xy)), paired[:, 0]), np.setdiff1d(np.arange(len(pred_xy)), paired[:, 1])


def type_counts(true_xy, true_type, pred_xy, pred_type, radius: float = 12.0) -> dict:
    """Detection and per-type pairing of one image, as arrays to pool over a data set (see type_f1)."""
    true_type, pred_type = np.asarray(true_type, int), np.asarray(pred_type, int)
    paired, ut, up = pair_centroids(np.asarray(true_xy, float).reshape(-1, 2), np.asarray(pred_xy, float).reshape(-1, 2),
                                    radius)
    return {"paired_true": true_type[paired[:, 0]], "paired_pred": pred_type[paired[:, 1]],
            "unpaired_true": true_type[ut], "unpaired_pred": pred_type[up]}


def concat_counts(items: list[dict]) -> dict:
    keys = ("paired_true", "paired_pred", "unpaired_true", "unpaired_pred")
    return {k: np.concatenate([np.asarray(i[k], int) for i in items]) if items else np.zeros(0, int) for k in keys}


def type_f1(counts: dict, type_id: int) -> float:
    """HoVer-Net's per-type F1 over pooled counts: 2 (TP + TN) / (2 (TP + TN) + 2 FP + 2 FN + FP_d + FN_d), where
    TP/TN/FP/FN count paired nuclei of which the true or the predicted type is `type_id`, and FP_d/FN_d the unpaired
    predicted/true nuclei of that type."""
    pt, pp = counts["paired_true"], counts["paired_pred"]
    sel = (pt == type_id) | (pp == type_id)
    pt, pp = pt[sel], pp[sel]
    tp = int(((pt == type_id) & (pp == type_id)).sum())
    tn = int(((pt != type_id) & (pp != type_id)).sum())
    fp = int(((pt != type_id) & (pp == type_id)).sum())
    fn = int(((pt == type_id) & (pp != type_id)).sum())
    fp_d = int((counts["unpaired_pred"] == type_id).sum())
    fn_d = int((counts["unpaired_true"] == type_id).sum())
    den = 2 * (tp + tn) + 2 * fp + 2 * fn + fp_d + fn_d
    return 2 * (tp + tn) / den if den else float("nan")


def detection_f1(counts: dict) -> float:
    """Detection F1 of the centroid pairing (HoVer-Net's F_d)."""
    tp, fn, fp = len(counts["paired_true"]), len(counts["unpaired_true"]), len(counts["unpaired_pred"])
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of the mean of per-image values, images resampled with replacement."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))
