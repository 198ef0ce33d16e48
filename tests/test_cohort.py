"""The cohort reference: trimmed refitting, the inlier core's label-free cut, and `wsi-qc run` without a scorer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from wsi_qc.cli import main
from wsi_qc.cohort.folder import KEY_FILE, cohort_folder
from wsi_qc.cohort.robust import fit_robust, inliers, statistic_outliers, tile_statistics
from wsi_qc.config import load_config
from wsi_qc.scorer import Scorer
from wsi_qc.threshold import Threshold, achieved_bound

POOLED = SimpleNamespace(grid=None)  # a Scorer of pooled features needs no network to fit and score them
SMALL_FLOW = {"n_blocks": 2, "hidden": 32, "epochs": 30, "patience": 5, "batch_size": 256, "min_reference": 20,
              "device": "cpu", "cpu_runtime": "torch"}


def _cohort(seed: int, n_slides: int = 8, per_slide: int = 60, contamination: float = 0.15):
    """Pooled 6-d features of a cohort: clean tiles N(0, I) and, at `contamination`, artifact tiles shifted by 6
    along a random direction; (features, slide of each tile, is artifact)."""
    rng = np.random.default_rng(seed)
    n = n_slides * per_slide
    x = rng.normal(size=(n, 6)).astype(np.float32)
    bad = rng.uniform(size=n) < contamination
    direction = rng.normal(size=(int(bad.sum()), 6))
    x[bad] += 6 * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    return x, np.repeat(np.arange(n_slides), per_slide), bad


@pytest.fixture(scope="module")
def fits():
    config = load_config(overrides={"flow": SMALL_FLOW, "reference": {"rounds": 2, "trim_z": 2.5, "core_z": 2.5}})
    x, groups, bad = _cohort(0)
    naive = Scorer.fit(x, POOLED, config, groups=groups)
    robust = fit_robust(x, POOLED, config, groups=groups)
    test_x, _, test_bad = _cohort(1, n_slides=4, contamination=0.5)
    return naive, robust, (x, groups, bad), (test_x, test_bad)


def test_inliers_are_within_trim_z_robust_sds_of_the_median_score():
    scores = np.r_[np.linspace(-1, 1, 101), [3.0, 5.0]]  # MAD 0.5 -> robust SD 0.741
    keep = inliers(scores, 2.5)
    assert keep[:101].all() and not keep[101:].any()  # 3.0 is 4.05 robust SDs out
    assert inliers(scores, 5.0)[101] and not inliers(scores, 5.0)[102]
    assert inliers(np.ones(10), 1.0).all()  # no spread: nothing is an outlier


def test_statistic_outliers_are_odd_within_their_slide_not_a_rare_slide():
    rng = np.random.default_rng(0)
    stats = rng.normal(size=(60, 3))
    groups = np.repeat(np.arange(6), 10)
    stats[groups == 5] += 20.0  # a whole slide of a rare stain: consistent with itself
    stats[3, 0] += 8.0  # one tile of slide 0 far less sharp than its neighbours (the counted side is positive)
    stats[4, 0] -= 8.0  # one far sharper: not an artifact, one-sided
    stats[5, 1] -= 8.0  # one far off on a two-sided statistic
    two_sided = np.array([False, True, True])
    odd = statistic_outliers(stats, groups, 4.0, two_sided)
    assert odd[3] and odd[5] and odd.sum() == 2
    assert not statistic_outliers(stats, groups, None).any()
    local = np.zeros((2, 3, 3, 40), np.float32)
    local[..., -18:] = np.arange(1, 19)  # a local tile's statistics close its vector at every position
    checked = tile_statistics(local, SimpleNamespace(grid=3, image_stats=True))
    assert checked.shape == (2, 7) and checked[0, 0] == -1.0 and checked[0, 1] == 2.0  # sharpness sign-flipped
    assert tile_statistics(local, SimpleNamespace(grid=3, image_stats=False)) is None


def test_robust_fit_trims_planted_artifacts_and_scores_them_higher_than_a_naive_fit(fits):
    naive, robust, (x, _, bad), (test_x, test_bad) = fits
    fitted = robust.fitted_ & ~robust.calibration_
    assert bad[~robust.fitted_ & ~robust.calibration_].mean() > 0.9  # what was trimmed is artifact
    assert bad[fitted].mean() < 0.02 < bad[naive.fitted_].mean()
    gap = lambda s: np.median(s.score(test_x)[test_bad]) / np.median(s.score(test_x)[~test_bad])  # noqa: E731
    assert gap(robust) > gap(naive)  # artifacts stand further out of clean tissue


def test_label_free_cut_on_contaminated_calibration_tiles_holds_on_the_inlier_core(fits):
    naive, robust, (x, groups, bad), (test_x, test_bad) = fits
    assert robust.trimmed > 0 and len(robust.heldout_scores()) + robust.trimmed == robust.calibration_.sum()
    assert bad[robust.calibration_][robust.inlier_].sum() == 0  # the core holds no planted artifact
    cut = Threshold("false_discard", 0.05).fit_label_free(robust.heldout_scores(), robust.trimmed).threshold_
    naive_cut = Threshold("false_discard", 0.05).fit_label_free(naive.heldout_scores()).threshold_
    scores, naive_scores = robust.score(test_x), naive.score(test_x)
    assert np.mean(scores[~test_bad] > cut) <= 0.1  # the clean tiles: about 5 % target
    assert np.mean(scores[test_bad] > cut) > 0.9
    assert np.mean(naive_scores[test_bad] > naive_cut) < np.mean(scores[test_bad] > cut)


def test_calibration_tiles_are_out_of_fitting_and_of_early_stopping():
    config = load_config(overrides={"flow": SMALL_FLOW})
    x, groups, _ = _cohort(2, contamination=0.0)
    scorer = Scorer.fit(x, POOLED, config, groups=groups)
    calibration_slides = set(groups[scorer.calibration_])
    val_slides = set(groups[scorer.fitted_][scorer.flow.val_rows_])
    assert calibration_slides and val_slides and not calibration_slides & val_slides
    assert not (scorer.calibration_ & scorer.fitted_).any()
    assert len(scorer.heldout_scores()) == scorer.calibration_.sum() == 2 * 60  # 0.2 of 8 slides, whole


def test_achieved_bound_is_stored_and_read_back(tmp_path):
    assert achieved_bound(199, 0.02) == pytest.approx(0.02)
    assert achieved_bound(13, 0.02) == pytest.approx(1 / 14)  # too few tiles: the cut is their maximum
    t = Threshold("false_discard", 0.02).fit_label_free(np.arange(13.0), trimmed=3)
    assert t.threshold_ == 12.0
    t.save(tmp_path / "c.json", "fp")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["false_discard_bound"] == pytest.approx(1 / 14) and saved["trimmed"] == 3
    loaded = Threshold.load(tmp_path / "c.json", "fp")
    assert loaded.bound_ == pytest.approx(1 / 14) and loaded.trimmed_ == 3


def test_run_without_a_scorer_fits_the_cohort_once_and_resumes(qc_kit, tmp_path, capsys):
    out = tmp_path / "qc.zarr"
    args = ["run", str(qc_kit.slides[0].parent), "--out", str(out), "--config", str(qc_kit.config)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "cohort scorer" in printed and "4 of 4 slides done" in printed
    folder = cohort_folder(out)
    info = json.loads((folder / KEY_FILE).read_text())
    assert info["slides"] == 4 and info["fitted"] > 0 and 0 < info["false_discard_bound"] < 0.05
    assert Scorer.load(folder / "scorer").inlier_ is not None  # a cohort scorer: its cut is on the inlier core
    root = zarr.open_group(str(out), mode="r")
    assert sorted(root.group_keys()) == sorted(p.stem for p in qc_kit.slides)
    stamp = (folder / KEY_FILE).stat().st_mtime_ns
    assert main(args) == 0  # a rerun reuses the cohort scorer, so every slide is skipped
    assert "4 of 4 slides done" in capsys.readouterr().out
    assert (folder / KEY_FILE).stat().st_mtime_ns == stamp
    assert all(root[s].attrs["status"] == "done" for s in root.group_keys())


def test_run_refuses_a_folder_with_too_few_tiles_for_a_cohort(qc_kit, tmp_path, capsys):
    config = tmp_path / "few.yaml"
    config.write_text(f"base: {qc_kit.config}\nreference: {{tiles_per_slide: 2}}\n")
    rc = main(["run", str(qc_kit.slides[0]), "--out", str(tmp_path / "qc.zarr"), "--config", str(config)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gave 2 tissue tiles; a cohort scorer needs at least 20" in err and "--scorer" in err


def test_run_refuses_a_calibration_without_its_scorer(qc_kit, tmp_path, capsys):
    rc = main(["run", str(qc_kit.slides[0]), "--calibration", str(qc_kit.calibration), "--out",
               str(tmp_path / "qc.zarr"), "--config", str(qc_kit.config)])
    assert rc == 2 and "pass both a scorer and its calibration" in capsys.readouterr().err


def test_fit_reference_cohort_then_calibrate_cuts_on_the_inlier_core(qc_kit, tmp_path, capsys):
    scorer = tmp_path / "scorer"
    assert main(["fit-reference", "--cohort", *map(str, qc_kit.slides), "--out", str(scorer),
                 "--config", str(qc_kit.config)]) == 0
    assert "cohort: fitted on" in capsys.readouterr().out
    loaded = Scorer.load(scorer)
    assert loaded.inlier_ is not None  # a cohort scorer keeps which calibration tiles are its core
    assert len(loaded.heldout_scores()) + loaded.trimmed == len(loaded.heldout_["rl2"])
    assert main(["calibrate", "--scorer", str(scorer), "--false-discard", "0.05", "--out",
                 str(tmp_path / "c.json"), "--config", str(qc_kit.config)]) == 0
    printed = capsys.readouterr().out
    assert f"like the {len(loaded.heldout_scores())} calibration tiles" in printed
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["trimmed"] == loaded.trimmed and 0 < saved["false_discard_bound"] <= 0.05
    # no labels and no rate: a cohort scorer is cut without labels at reference.false_discard (0.02)
    assert main(["calibrate", "--scorer", str(scorer), "--out", str(tmp_path / "d.json"),
                 "--config", str(qc_kit.config)]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["value"] == 0.02


def test_qc_folder_without_a_scorer_in_python(qc_kit, tmp_path):
    import wsi_qc

    rows = wsi_qc.qc_folder([qc_kit.slides[0].parent], out=tmp_path / "qc.zarr", config=str(qc_kit.config))
    assert [r["status"] for r in rows] == ["done"] * 4
    assert (tmp_path / "qc-cohort" / "calibration.json").is_file() and (tmp_path / "qc-report" / "report.csv").is_file()
