"""Nuclei metrics on hand-made masks with known answers, and watershed post-processing of touching discs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsi_qc.nuclei import metrics
from wsi_qc.nuclei.data import distance_map
from wsi_qc.nuclei.postprocess import instance_table, instances_from_maps


def _squares():
    """Truth: A (rows 0-9, cols 0-9) and B (rows 0-9, cols 20-29), 100 px each. Prediction: the left half of A
    (50 px), B exactly, and a false 50 px nucleus (rows 15-19, cols 0-9)."""
    true = np.zeros((20, 30), np.uint16)
    true[0:10, 0:10], true[0:10, 20:30] = 1, 2
    pred = np.zeros_like(true)
    pred[0:10, 0:5], pred[0:10, 20:30], pred[15:20, 0:10] = 7, 3, 9  # ids need not be consecutive
    return true, pred


def test_aji_pq_dice_known_answers():
    s = metrics.scores(metrics.image_parts(*_squares()))
    assert s["aji"] == pytest.approx(150 / 250)      # C = 50 + 100; U = 100 + 100 + 50 (the unpaired FP)
    assert s["dq"] == pytest.approx(1 / (1 + 0.5 * 2 + 0.5 * 1))  # IoU(A, half) = 0.5 is not > 0.5
    assert s["sq"] == pytest.approx(1.0)
    assert s["pq"] == pytest.approx(0.4)
    assert s["dice"] == pytest.approx(2 * 150 / 400)


def test_aji_counts_a_merged_prediction_once_per_nucleus():
    true = np.zeros((10, 20), np.uint16)
    true[:, :10], true[:, 10:] = 1, 2
    pred = (true > 0).astype(np.uint16)  # one prediction over both nuclei
    s = metrics.scores(metrics.image_parts(true, pred))
    assert s["aji"] == pytest.approx(200 / 400)  # both pair with it: C = 100 + 100, U = 200 + 200
    assert s["pq"] == 0.0 and s["dq"] == 0.0


def test_perfect_prediction_scores_one_and_empty_pairs_are_handled():
    true, _ = _squares()
    s = metrics.scores(metrics.image_parts(true, true))
    assert s["aji"] == s["pq"] == s["dice"] == 1.0
    empty = metrics.scores(metrics.image_parts(true, np.zeros_like(true)))
    assert empty["aji"] == 0.0 and empty["pq"] == 0.0


def test_parts_pool_over_tiles_of_one_image():
    true, pred = _squares()
    left = metrics.image_parts(true[:, :15], pred[:, :15])
    right = metrics.image_parts(true[:, 15:], pred[:, 15:])
    pooled = metrics.scores(metrics.add_parts(left, right))
    assert pooled["aji"] == pytest.approx(150 / 250) and pooled["pq"] == pytest.approx(0.4)


def test_type_f1_as_hovernet():
    # 3 true nuclei (types 2, 2, 3), 3 predicted: pairs (2->2), (2->3); true type 3 missed; one FP of type 3
    counts = metrics.type_counts([(10, 10), (50, 50), (90, 90)], [2, 2, 3],
                                 [(11, 10), (50, 52), (200, 200)], [2, 3, 3], radius=12)
    assert len(counts["paired_true"]) == 2
    # type 2: tp 1, fn 1 (2 predicted as 3) -> 2 * 1 / (2 + 2 * 1) = 0.5
    assert metrics.type_f1(counts, 2) == pytest.approx(0.5)
    # type 3: fp 1 (true 2 predicted 3), fp_d 1, fn_d 1 -> 0 / (2 + 1 + 1)
    assert metrics.type_f1(counts, 3) == 0.0
    assert metrics.detection_f1(counts) == pytest.approx(2 * 2 / (4 + 1 + 1))


def _touching_discs(shape=(64, 80), centres=((32, 28), (32, 50)), radius=13):
    yy, xx = np.indices(shape)
    inst = np.zeros(shape, np.uint16)
    for i, (cy, cx) in enumerate(centres, 1):
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (inst == 0)] = i
    return inst


def test_watershed_splits_touching_discs():
    true = _touching_discs()
    fg = (true > 0).astype(np.float32)
    assert ndi.label(fg)[1] == 1  # one blob of foreground
    pred = instances_from_maps(fg, distance_map(true))
    assert pred.dtype == np.uint16 and pred.max() == 2
    assert metrics.scores(metrics.image_parts(true, pred))["pq"] > 0.9
    table = instance_table(pred, fg)
    assert sorted(round(r["x"]) for r in table) == pytest.approx([28, 50], abs=2)
    assert all(r["probability"] == 1.0 and r["type"] is None for r in table)


def test_watershed_keeps_markerless_blobs_and_drops_specks():
    fg = np.zeros((40, 40), np.float32)
    fg[5:15, 5:15] = 1       # a nucleus without any distance above the marker threshold
    fg[30:32, 30:32] = 1     # 4 px: below min_area
    pred = instances_from_maps(fg, np.zeros_like(fg))
    assert pred.max() == 1 and (pred > 0).sum() == 100


def test_bootstrap_ci_covers_the_mean():
    lo, hi = metrics.bootstrap_ci(np.array([0.5, 0.6, 0.7, 0.55, 0.65]))
    assert lo < 0.6 < hi and hi - lo < 0.2
