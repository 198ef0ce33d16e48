"""Threshold: ROC rules, AUC with bootstrap CI, operating points, calibration JSON, input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from wsi_qc import __version__
from wsi_qc.errors import ConfigError, NotFittedError
from wsi_qc.threshold import Threshold, conformal_threshold


@pytest.fixture(scope="module")
def data():
    """Overlapping good (0) and bad (1) rl2 scores; bad scores are higher, as rl2 is."""
    rng = np.random.default_rng(3)
    good = rng.normal(1.0, 0.2, 300)
    bad = rng.normal(1.5, 0.35, 120)
    scores = np.r_[good, bad].astype(np.float32)
    labels = np.r_[np.zeros(300, int), np.ones(120, int)]
    return scores, labels


def rates(keep: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(TPR, FPR) of flagging discarded tiles as bad."""
    return float(np.mean(~keep[labels == 1])), float(np.mean(~keep[labels == 0]))


def test_youden_fit_sets_attributes_and_maximises_j(data):
    scores, labels = data
    t = Threshold(n_bootstrap=200).fit(scores, labels)
    assert t.n_good_ == 300 and t.n_bad_ == 120
    assert t.auc_ == pytest.approx(roc_auc_score(labels, scores))
    lo, hi = t.auc_ci_
    assert lo < t.auc_ < hi and hi - lo < 0.2
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(t.roc_[0], fpr)
    np.testing.assert_array_equal(t.roc_[2], thr)
    tp, fp = rates(t.keep(scores), labels)
    assert tp - fp == pytest.approx(np.max(tpr - fpr))
    # the cut sits between two observed scores, not on one
    assert not np.any(scores.astype(float) == t.threshold_)
    assert t.keep(scores).dtype == bool


def test_fpr_rule_gives_largest_tpr_within_target(data):
    scores, labels = data
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.01, 0.05, 0.2):
        t = Threshold("fpr", target, n_bootstrap=0).fit(scores, labels)
        tp, fp = rates(t.keep(scores), labels)
        assert fp <= target
        assert tp == pytest.approx(tpr[fpr <= target].max())


def test_tpr_rule_gives_smallest_fpr_reaching_target(data):
    scores, labels = data
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.5, 0.9, 0.99):
        t = Threshold("tpr", target, n_bootstrap=0).fit(scores, labels)
        tp, fp = rates(t.keep(scores), labels)
        assert tp >= target
        assert fp == pytest.approx(fpr[tpr >= target].min())


def test_fixed_rule_uses_the_value(data):
    scores, labels = data
    t = Threshold("fixed", 1.25, n_bootstrap=0).fit(scores, labels)
    assert t.threshold_ == 1.25
    np.testing.assert_array_equal(t.keep(scores), scores <= 1.25)
    assert t.auc_ == pytest.approx(roc_auc_score(labels, scores))


def test_perfect_separation_keeps_all_good_and_no_bad():
    scores = np.r_[np.linspace(0.5, 1.0, 50), np.linspace(2.0, 3.0, 20)]
    labels = np.r_[np.zeros(50), np.ones(20)]
    t = Threshold(n_bootstrap=100).fit(scores, labels)
    assert t.auc_ == 1.0 and t.auc_ci_ == (1.0, 1.0)
    assert 1.0 < t.threshold_ < 2.0
    np.testing.assert_array_equal(t.keep(scores), labels == 0)
    assert not t.keep(np.array([np.nan]))[0]


def test_bootstrap_ci_matches_sklearn_on_the_same_draws():
    """Stratified draws (good resampled among good, bad among bad), tied scores included."""
    rng = np.random.default_rng(0)
    good = np.round(rng.normal(1.0, 0.3, 80), 1)
    bad = np.round(rng.normal(1.3, 0.3, 40), 1)
    scores, labels = np.r_[good, bad], np.r_[np.zeros(80, int), np.ones(40, int)]
    n_boot, seed = 150, 7
    t = Threshold(n_bootstrap=n_boot, seed=seed).fit(scores, labels)
    draws = np.random.default_rng(seed)
    good_sorted, y = np.sort(good), np.r_[np.zeros(80), np.ones(40)]
    aucs = []
    for _ in range(n_boot):
        g = good_sorted[draws.integers(0, 80, 80)]
        b = bad[draws.integers(0, 40, 40)]
        aucs.append(roc_auc_score(y, np.r_[g, b]))
    np.testing.assert_allclose(t.auc_ci_, np.percentile(aucs, [2.5, 97.5]), rtol=1e-12)
    assert Threshold(n_bootstrap=n_boot, seed=seed).fit(scores, labels).auc_ci_ == t.auc_ci_
    assert Threshold(n_bootstrap=n_boot, seed=seed + 1).fit(scores, labels).auc_ci_ != t.auc_ci_


def test_operating_points_table(data):
    scores, labels = data
    t = Threshold("fpr", 0.05, n_bootstrap=0).fit(scores, labels)
    rows = t.operating_points(scores, labels)
    names = [r["name"] for r in rows]
    assert names == ["fitted (fpr)", "youden", "FPR <= 1 %", "FPR <= 5 %", "FPR <= 10 %",
                     "TPR >= 90 %", "TPR >= 95 %", "TPR >= 99 %"]
    by = dict(zip(names, rows))
    assert by["fitted (fpr)"]["threshold"] == t.threshold_
    assert by["FPR <= 5 %"]["threshold"] == pytest.approx(t.threshold_)
    assert by["youden"]["threshold"] == pytest.approx(Threshold(n_bootstrap=0).fit(scores, labels).threshold_)
    for r in rows:
        keep = scores <= r["threshold"]
        assert r["kept"] == pytest.approx(keep.mean())
        assert (r["tpr"], r["fpr"]) == pytest.approx(rates(keep, labels))
    for v in (0.01, 0.05, 0.1):
        assert by[f"FPR <= {100 * v:g} %"]["fpr"] <= v
    for v in (0.9, 0.95, 0.99):
        assert by[f"TPR >= {100 * v:g} %"]["tpr"] >= v
    # kept fraction falls as the cut tightens towards high TPR
    assert by["TPR >= 99 %"]["kept"] < by["FPR <= 1 %"]["kept"]
    assert [r["name"] for r in Threshold().operating_points(scores, labels)][0] == "youden"


def test_save_load_round_trip_and_fingerprint_check(data, tmp_path):
    scores, labels = data
    t = Threshold("tpr", 0.9, n_bootstrap=100, seed=2).fit(scores, labels)
    path = t.save(tmp_path / "sub" / "calibration.json", "fp-abc")

    def strict(token):
        raise AssertionError(f"non-standard JSON constant {token}")
    d = json.loads(path.read_text(), parse_constant=strict)
    assert d["scorer_fingerprint"] == "fp-abc" and d["wsi_qc_version"] == __version__
    assert d["rule"] == "tpr" and d["value"] == 0.9 and d["n_good"] == 300 and d["n_bad"] == 120
    assert d["threshold"] == t.threshold_ and d["auc"] == t.auc_ and d["auc_ci"] == list(t.auc_ci_)
    assert d["roc"]["thresholds"][0] is None  # roc_curve's leading inf
    assert d == {**t.to_dict(), "scorer_fingerprint": "fp-abc", "score": None}

    u = Threshold.load(path, "fp-abc")
    assert (u.rule, u.value, u.threshold_, u.auc_, u.auc_ci_) == (t.rule, t.value, t.threshold_, t.auc_, t.auc_ci_)
    assert u.scorer_fingerprint_ == "fp-abc"
    for a, b in zip(u.roc_, t.roc_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(u.keep(scores), t.keep(scores))

    with pytest.raises(ConfigError) as err:
        Threshold.load(path, "fp-other")
    msg = str(err.value)
    assert str(path) in msg and "fp-abc" in msg and "fp-other" in msg and "wsi-qc calibrate --scorer" in msg
    with pytest.raises(ConfigError, match="not found"):
        Threshold.load(tmp_path / "missing.json", "fp-abc")
    (tmp_path / "junk.json").write_text('{"threshold": 1}')
    with pytest.raises(ConfigError, match="junk.json is not a wsi-qc calibration"):
        Threshold.load(tmp_path / "junk.json", "fp-abc")


def test_no_bootstrap_gives_nan_ci_saved_as_null(data, tmp_path):
    scores, labels = data
    t = Threshold(n_bootstrap=0).fit(scores, labels)
    assert all(np.isnan(t.auc_ci_))
    t.save(tmp_path / "c.json", "fp")
    assert json.loads((tmp_path / "c.json").read_text())["auc_ci"] == [None, None]
    assert all(np.isnan(Threshold.load(tmp_path / "c.json", "fp").auc_ci_))


def test_not_fitted():
    t = Threshold()
    with pytest.raises(NotFittedError, match="fit"):
        t.keep(np.array([1.0]))
    with pytest.raises(NotFittedError):
        t.threshold_
    assert not hasattr(t, "auc_")
    with pytest.raises(AttributeError) as err:
        t.no_such_attribute
    assert not isinstance(err.value, NotFittedError)


@pytest.mark.parametrize(("scores", "labels", "match"), [
    ([1.0, 2.0, 3.0], [0, 0, 0], r"at least 1 of each.*got 3 good and 0 bad"),
    ([1.0, 2.0, 3.0], [1, 1, 1], r"got 0 good and 3 bad"),
    ([1.0, np.nan, np.inf, 2.0], [0, 0, 1, 1], r"2 of 4 scores are NaN or infinite"),
    ([1.0, 2.0, 3.0], [0, 1], r"3 scores but 2 labels"),
    ([1.0, 2.0, 3.0], [0, 1, 2], r"0 \(good tile\) or 1 \(bad tile\).*\[2\]"),
])
def test_bad_inputs(scores, labels, match):
    with pytest.raises(ConfigError, match=match):
        Threshold(n_bootstrap=0).fit(np.array(scores), np.array(labels))


@pytest.mark.parametrize(("rule", "value", "match"), [
    ("otsu", None, r"unknown threshold rule 'otsu'; use one of youden, fpr, tpr, fixed"),
    ("fpr", None, r"rule 'fpr' needs a target rate strictly between 0 and 1, got value=None"),
    ("tpr", 1.5, r"got value=1.5"),
    ("fpr", 0.0, r"got value=0.0"),
    ("fixed", None, r"'fixed' needs the cut itself"),
    ("fixed", "abc", r"'fixed' needs the cut itself"),
])
def test_bad_rules(rule, value, match):
    t = Threshold(rule, value)
    assert (t.rule, t.value) == (rule, value)  # __init__ only stores parameters
    with pytest.raises(ConfigError, match=match):
        t.fit(np.array([1.0, 2.0]), np.array([0, 1]))


def test_bool_and_float_labels_are_accepted(data):
    scores, labels = data
    a = Threshold(n_bootstrap=0).fit(scores, labels)
    b = Threshold(n_bootstrap=0).fit(scores, labels.astype(bool))
    c = Threshold(n_bootstrap=0).fit(scores, labels.astype(float))
    assert a.threshold_ == b.threshold_ == c.threshold_


def test_conformal_threshold_is_the_finite_sample_quantile():
    scores = np.arange(1, 100, dtype=float)  # 99 held-out scores 1..99
    assert conformal_threshold(scores, 0.05) == 95.0  # ceil(100 * 0.95) = 95th smallest
    assert conformal_threshold(scores[:10], 0.05) == 10.0  # too few scores: the largest
    rng = np.random.default_rng(0)
    held, new = rng.standard_normal(500), rng.standard_normal(100000)
    assert np.mean(new > conformal_threshold(held, 0.02)) == pytest.approx(0.02, abs=0.015)
    with pytest.raises(ConfigError, match="false-discard rate"):
        conformal_threshold(scores, 1.5)


def test_a_labelled_calibration_without_bad_tiles_or_auc_is_refused(calibration):
    path, d = calibration
    for edit in ({"n_bad": 0}, {"auc": None}):
        path.write_text(json.dumps({**d, **edit}))
        with pytest.raises(ConfigError, match="a labelled calibration needs bad tiles and an AUC"):
            Threshold.load(path, "fp-abc")


def test_label_free_threshold_round_trip_and_score_binding(tmp_path):
    t = Threshold("false_discard", 0.02).fit_label_free(np.linspace(0, 1, 201))
    assert t.threshold_ == pytest.approx(0.985, abs=0.006) and t.n_bad_ == 0
    score = {"kind": "rl2", "aggregate": "top5"}
    t.save(tmp_path / "c.json", "fp", score)
    assert Threshold.load(tmp_path / "c.json", "fp", score).threshold_ == t.threshold_
    with pytest.raises(ConfigError, match="recalibrate") as err:
        Threshold.load(tmp_path / "c.json", "fp", {"kind": "nll", "aggregate": "top5"})
    assert "nll" in str(err.value)
    with pytest.raises(ConfigError, match="false_discard"):
        Threshold("youden").fit_label_free(np.ones(10))


@pytest.fixture()
def calibration(data, tmp_path):
    scores, labels = data
    path = Threshold(n_bootstrap=10).fit(scores, labels).save(tmp_path / "calibration.json", "fp-abc")
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("key, value, match", [
    ("threshold", "NaN", "threshold=nan .* is not finite"),
    ("threshold", "Infinity", "threshold=inf .* is not finite"),
    ("threshold", "-1e9", r"threshold=-1000000000.0 .* far outside the scores it was calibrated on"),
    ("threshold", "1e9", "far outside the scores"),
    ("threshold", '"0.5"', "threshold='0.5' .* is a str, not a number"),
    ("n_bootstrap", '"many"', "n_bootstrap='many' .* is a str, not an integer"),
    ("rule", '"bogus"', "rule='bogus' in calibration file .* one of youden"),
    ("auc", "1.5", "auc=1.5 .* out of range"),
    ("seed", "true", "seed=True .* not an integer"),
])
def test_hand_edited_calibration_is_refused_naming_file_key_value_fix(calibration, key, value, match):
    path, d = calibration
    text = json.dumps({**d, key: "@@"}).replace('"@@"', value)  # NaN / Infinity as Python's json writes them
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        Threshold.load(path, "fp-abc")
    assert str(path) in str(err.value) and "wsi-qc calibrate" in str(err.value)


def test_calibration_threshold_near_its_scores_is_accepted(calibration):
    path, d = calibration
    finite = [v for v in d["roc"]["thresholds"] if v is not None]
    span = max(finite) - min(finite)
    for value in (min(finite) - 5 * span, max(finite) + 5 * span):  # a fixed cut may sit outside the scores
        path.write_text(json.dumps({**d, "threshold": value}))
        assert Threshold.load(path, "fp-abc").threshold_ == value
    path.write_text(json.dumps({**d, "roc": {**d["roc"], "tpr": "x"}}))
    with pytest.raises(ConfigError, match="roc.tpr .* must be a list of numbers"):
        Threshold.load(path, "fp-abc")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a list, not a calibration"):
        Threshold.load(path, "fp-abc")


def test_label_free_cut_warns_when_too_few_tiles_resolve_the_rate(caplog):
    with caplog.at_level("WARNING", logger="wsi_qc.threshold"):
        few = Threshold("false_discard", 0.02).fit_label_free(np.arange(98.0))
    assert few.threshold_ == 97.0  # the highest of 98
    assert "98 calibration tiles cannot resolve a 2 % false-discard rate (that needs 99)" in caplog.text
    assert "it holds at most 1.0 %" in caplog.text and few.bound_ == pytest.approx(1 / 99)  # conservative: 1/(n+1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_qc.threshold"):
        enough = Threshold("false_discard", 0.02).fit_label_free(np.arange(99.0))
    assert enough.threshold_ == 97.0 and caplog.text == ""  # the 98th of 99: below the highest, no warning
    assert enough.bound_ == pytest.approx(0.02)  # (99 + 1 - 98) / 100
