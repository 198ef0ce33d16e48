"""Smoke run of the honest QC benchmark on a tiny config: generated slides only, a random tiny encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipelines import qc_benchmark

TINY = {
    "encoder": {"name": "resnet18", "weights": "random"},
    "tiles": {"size": 64, "batch_size": 32, "workers": 0},
    "flow": {"pca_dim": 16, "n_blocks": 2, "hidden": 32, "epochs": 3, "batch_size": 256, "patience": 2,
             "min_reference": 10},
    "cascade": {"enabled": True},
    "benchmark": {
        "seed": 0, "example_size": 1536, "max_tiles": 30, "artifact_fraction": 0.5,
        "kinds": ["blur", "small_debris", "defocus"], "severities": [1, 3],
        "splits": {"reference": ["gen-0", "gen-1"], "selection": ["gen-2"], "test": ["gen-3"]},
        "calibration_fraction": 0.2, "false_discard": 0.05, "n_bootstrap": 20, "knn_coreset": 500,
        "aggregates": ["max", "top25", "mean"], "aggregate_margin": 0.0,
        "features": {"pooled": {"levels": [1, 2], "grid": None, "image_stats": True},
                     "local": {"levels": [1, 2], "grid": 4, "image_stats": True}},
        "pooled_flow": {"pca_dim": None, "n_blocks": 2, "hidden": 32, "epochs": 3, "batch_size": 64, "patience": 2},
        "default": "local flow",
    },
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc_benchmark")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert qc_benchmark.main(["--config", str(config), "--out", str(root / "out")]) == 0
    return root / "out"


def test_benchmark_prints_every_head_on_the_test_split(result, capsys):
    results = json.loads((result / "results.json").read_text())
    heads = results["heads"]
    assert set(heads) == {f"{f} {h}" for f in ("pooled", "local") for h in ("flow", "gaussian", "knn")} | {"cascade"}
    assert heads["cascade"]["aggregate"] == heads["local flow"]["aggregate"]
    assert all(0 <= v <= 1 for v in results["cascade_fine"].values())
    for name, r in heads.items():
        t = r["test"]
        assert 0 <= t["overall"] <= 1 and t["overall_ci"][0] <= t["overall_ci"][1]
        assert {"blur", "small_debris", "defocus", "defocus_1"} <= set(t)
        assert np.isfinite(r["threshold"]) and 0 <= r["test_discards"]["false_discard"] <= 1
        if name.startswith("local") and name != "cascade":
            assert r["aggregate"] in ("max", "top25", "mean") and set(r["selection_auroc"]) == {"max", "top25", "mean"}
    assert set(results["versus"]) == set(heads) - {"local flow"}
    for d, lo, hi in results["versus"].values():
        assert lo <= d <= hi or np.isclose(d, lo) or np.isclose(d, hi)
    table = (result / "results.md").read_text()
    assert "local flow" in table and "pooled gaussian" in table and "false discard" in table
    assert "cascade: tiles that needed the full-resolution pass" in table


def test_splits_are_disjoint_by_slide(tmp_path):
    config, own = qc_benchmark.read_config(None)
    slides = [s for split in qc_benchmark.SPLITS for s in own["splits"][split]]
    assert len(slides) == len(set(slides))


def test_bootstrap_resamples_source_tiles_together():
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.3])
    labels = np.array([0, 0, 1, 1, 0])
    sources = np.array(["a", "b", "c", "c", "d"])  # two severities of source c
    lo, hi = qc_benchmark.bootstrap_ci(scores, labels, sources, n=50, seed=0)
    assert lo == hi == 1.0  # perfectly separated whatever is drawn


def test_the_default_aggregate_stays_unless_another_beats_it_beyond_the_margin():
    aurocs = {"max": 0.9908, "top5": 0.9906, "mean": 0.98}
    assert qc_benchmark.choose_aggregate(aurocs, "top5", 0.002) == "top5"  # a tie within noise
    assert qc_benchmark.choose_aggregate(aurocs, "top5", 0.0001) == "max"
    assert qc_benchmark.choose_aggregate(aurocs, "top1", 0.002) == "max"  # not a candidate
    assert qc_benchmark.choose_aggregate({"max": 0.9, "mean": 0.95}, "max", 0.002) == "mean"
