"""pipelines.degradation_study on a tiny generated slide, timm's random-weight test_efficientnet, 2 levels per kind."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import degradation_study as ds
from wsi_qc.artifacts import LEVELS
from wsi_qc.config import load_config
from wsi_qc.data import write_example_slide
from wsi_qc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

STUDY = {"min_tiles": 0, "max_tiles": 160, "example_slides": {"max": 0, "size": 2048, "mpp": 0.5},
         "levels": {kind: [0, values[3]] for kind, values in LEVELS.items()}, "n_degraded": 16,
         "stability_sizes": [10, 40, 100], "stability_draws": 4, "stability_cases": [["noise", 30], ["clean", 0]],
         "flow_variants": [{"pca_dim": 8}], "seed": 1}
CONFIG = {"tiles": {"mpp": 1.0, "size": 64, "overlap": 32, "batch_size": 64, "workers": 0},
          "encoder": {"name": "test_efficientnet", "weights": "random", "device": "cpu", "grid": None},
          "flow": {"n_blocks": 2, "hidden": 32, "epochs": 4, "patience": 2, "min_reference": 20, "device": "cpu"}}


def test_spearman_on_constructed_cases():
    levels = [0, 1, 2, 3, 4, 6, 8]
    assert ds.spearman(levels, [0.1, 0.2, 0.25, 0.9, 1.0, 5.0, 7.0]) == pytest.approx(1.0)  # monotone, not linear
    assert ds.spearman(levels, [7, 6, 5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # one adjacent swap among 7 ranks: 1 - 6 * 2 / (7 * 48)
    assert ds.spearman(levels, [1, 2, 4, 3, 5, 6, 7]) == pytest.approx(1 - 12 / 336)
    assert math.isnan(ds.spearman(levels, [3.0] * 7))


def test_unknown_study_key_and_bad_levels_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"study": {"n_degrade": 5}}))
    with pytest.raises(ConfigError, match="n_degrade"):
        ds.split_config(path)
    with pytest.raises(ConfigError, match="increasing"):
        ds.study_levels({"levels": {"blur": [2, 1]}})


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    slide = write_example_slide(root / "slides" / "tiny.tif", size=(2048, 2048), mpp=0.5, seed=3)
    config = {**CONFIG, "study": {**STUDY, "slides": [str(slide), str(root / "slides" / "missing.svs")]}}
    (root / "study.yaml").write_text(yaml.safe_dump(config))
    out = root / "out"
    # in a child process: after the study ran in the pytest process, a later DataLoader with forked reader workers
    # (tests/test_tiles.py) crashed it with SIGSEGV (seen in full runs only; the cause is not found yet)
    argv = [sys.executable, "-m", "pipelines.degradation_study", "--config", str(root / "study.yaml"), "--out", str(out)]
    run = lambda: subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    done = run()
    assert done.returncode == 0, done.stderr[-2000:]
    first = json.loads((out / "study.json").read_text())
    done = run()  # rerun: every feature set comes from the cache
    assert done.returncode == 0, done.stderr[-2000:]
    return out, first, json.loads((out / "study.json").read_text())


def test_study_writes_tables_json_and_plots(study_run):
    out, result, _ = study_run
    text = (out / "study.md").read_text()
    for title in ("## Tiles", "## Monotonicity", "## Sample-size stability", "### A vs B degraded by noise 30",
                  "### A vs clean B"):
        assert title in text
    for name in ("monotonicity.png", "stability.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    # the missing slide is listed as skipped, the tiny slide's tiles are split between A and B
    used, skipped = result["sources"]
    assert skipped["tiles"] == 0 and "skipped" in skipped
    assert used["in_a"] == result["n_a"] and used["in_b"] == result["n_b"] and result["n_a"] + result["n_b"] == 160
        # every kind at both levels, both metrics, rho in [-1, 1]
    assert sorted(result["monotonicity"]) == sorted(LEVELS)
    for kind, r in result["monotonicity"].items():
        assert r["levels"] == [0.0, float(LEVELS[kind][3])]
        assert len(r["rl2"]) == len(r["fd"]) == 2 and all(v >= 0 for v in r["rl2"] + r["fd"])
        assert abs(r["rl2_spearman"]) == pytest.approx(1.0) and abs(r["fd_spearman"]) == pytest.approx(1.0)
        assert f"| {kind} | 0, {LEVELS[kind][3]:g} |" in text
    # n = 100 exceeds the pools and is left out; CVs are positive numbers
    for case in result["stability"]:
        assert list(case["sizes"]) == ["10", "40"]
        for r in case["sizes"].values():
            assert r["rl2_cv"] > 0 and r["fd_cv"] > 0 and r["rl2_mean"] > 0
    # a flow variant: its own latent width, rho per kind and RL2 CVs per case, in its own table
    (variant,) = result["flow_variants"]
    assert variant["latent_dim"] == 8 and sorted(variant["rl2_spearman"]) == sorted(LEVELS)
    assert [list(c) for c in variant["stability"]] == [["10", "40"]] * 2
    assert "## RL2 under other flow settings" in text and '| {"pca_dim": 8} | 8 |' in text
    # the same tiles differ more from A once noise sigma 30 is added
    noisy, clean = result["stability"]
    assert noisy["rl2_full"] > clean["rl2_full"] and noisy["fd_full"] > clean["fd_full"]


def test_rerun_reuses_the_feature_cache(study_run):
    _, first, second = study_run
    n_sets = 2 + len(LEVELS) + 1  # A, B, one degraded level per kind, the noisy stability set
    assert (first["cache"]["misses"], first["cache"]["hits"]) == (n_sets, 0)
    assert (second["cache"]["misses"], second["cache"]["hits"]) == (0, n_sets)
    assert second["monotonicity"] == first["monotonicity"] and second["stability"] == first["stability"]


def test_feature_cache_key_changes_with_the_tiles(tmp_path):
    encoder = ds.encoder_from_config(load_config(overrides={"encoder": CONFIG["encoder"]}))
    images = np.zeros((3, 32, 32, 3), np.uint8)
    a = ds.FeatureCache(tmp_path, encoder, [images], 8)
    images[0, 0, 0, 0] = 1
    b = ds.FeatureCache(tmp_path, encoder, [images], 8)
    assert a.folder != b.folder
    features = b.get("x", lambda: images)
    assert features.shape == (3, encoder.dim) and b.get("x", lambda: 1 / 0).tolist() == features.tolist()
    assert (b.misses, b.hits) == (1, 1)
