"""Encoder study: the table end to end on a small generated slide with a random-weight tiny encoder;
the encoder's image-statistics columns; the feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import encoder_study
from wsi_qc.catalogue import load_catalogue, weights_available
from wsi_qc.data import write_example_slide
from wsi_qc.encoder import Encoder
from wsi_qc.image_stats import IMAGE_STATS


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return write_example_slide(tmp_path_factory.mktemp("slides") / "example.tif", size=(2048, 2048), seed=3)


def missing_weights_entry() -> str | None:
    """A catalogue encoder whose weights are not on this machine."""
    for name, entry in load_catalogue().items():
        if not weights_available(entry)[0]:
            return name
    return None


def test_study_table_with_random_tiny_encoder(slide, tmp_path):
    absent = missing_weights_entry()
    if absent is None:
        pytest.skip("every catalogue encoder has weights here; nothing to mark 'no weights'")
    tiny = {"name": "tiny", "timm": "test_efficientnet", "weights": "random", "levels": [0, 1, 2]}
    config = {
        "tiles": {"size": 64, "batch_size": 32, "workers": 0, "overlap": 0},
        "encoder": {"device": "cpu"},
        "flow": {"epochs": 3, "min_reference": 10, "n_blocks": 2, "hidden": 32, "device": "cpu"},
        "study": {
            "encoders": [tiny, absent], "levels": {}, "slides": [str(slide)], "slide_mpp": {},
            "example_slides": 0, "example_size": 2048, "calibration_sets": None,
            "calibration": {"n_clean": 60, "min_tissue": 0.5, "kinds": ["blur", "pen"], "severities": [3]},
            "seeds": [0, 1], "n_bootstrap": 20, "rl2_study": True, "rl2_tiles": 40, "rl2_min_tissue": 0.5,
            "rl2_seed": 0, "n_degraded": 3, "stability_sizes": [5, 10], "stability_draws": 3,
            "stability_case": ["blur", 2], "flow_grid": [{"pca_dim": 4}],
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "study"
    assert encoder_study.main(["--config", str(path), "--out", str(out)]) == 0

    md = (out / "study.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(encoder_study.COLUMNS)
    rows = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "no weights (random)" in rows["tiny"] and rows["tiny"].startswith("| — |")  # run, never ranked
    assert "no weights" in rows[absent] and rows[absent].startswith("| — |")
    result = json.loads((out / "study.json").read_text())
    tiny_result = next(e for e in result["encoders"] if e["name"] == "tiny")
    assert "rank" not in tiny_result and tiny_result["ranked"] is False
    assert set(tiny_result["variants"]) == {"last", "last+stats", "L0", "L1", "L2", "L0-1", "L0-1+stats",
                                            "L0-2", "L0-2+stats", "stats"}
    dims = tiny_result["level_dims"]
    assert tiny_result["variants"]["L0-2+stats"]["dim"] == sum(dims) + len(IMAGE_STATS)
    for v in tiny_result["variants"].values():
        for seed in ("0", "1"):
            auc = v["seeds"][seed]["rl2"]
            assert 0 <= auc["auc"] <= 1 and set(auc["per_artifact"]) == {"blur", "pen"}
    assert set(tiny_result["rl2"]["monotonicity"]) == {"blur", "noise", "salt_pepper", "rectangles", "diffusion"}
    assert tiny_result["tiles_per_s"] > 0 and tiny_result["params_m"] > 0
    assert [r["change"] for r in result["ablation"]["rows"]] == ["config", {"pca_dim": 4}]
    assert (out / "auc_variants.png").stat().st_size > 0 and (out / "rl2_monotonicity.png").stat().st_size > 0
    cached = {p.name for p in (out / "features").iterdir()}
    assert {"stats.npz", "tiny-multi.npz", "tiny-last.npz"} <= cached


def test_encoder_appends_image_statistics(tissue_tiles):
    plain = Encoder("test_efficientnet", levels=[0, 1], device="cpu")
    with_stats = Encoder("test_efficientnet", levels=[0, 1], device="cpu", image_stats=True)
    assert with_stats.dim == plain.dim + len(IMAGE_STATS)
    assert with_stats.stats_slice == slice(plain.dim, with_stats.dim) and plain.stats_slice is None
    features = with_stats(tissue_tiles)
    np.testing.assert_allclose(features[:, : plain.dim], plain(tissue_tiles), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(features[:, with_stats.stats_slice], encoder_study.stats_of(tissue_tiles))
    assert with_stats.meta()["image_stats"] == list(IMAGE_STATS) and plain.meta()["image_stats"] is None


def test_feature_cache_encodes_each_tile_once(tissue_tiles, tmp_path):
    path = tmp_path / "cache.npz"
    cache = encoder_study.FeatureCache(encoder_study.stats_of, len(IMAGE_STATS), path, "stats-v1")
    first = cache(tissue_tiles)
    again = cache(tissue_tiles[::-1])
    assert cache.encoded == len(tissue_tiles)
    np.testing.assert_array_equal(again, first[::-1])
    cache.save()
    reloaded = encoder_study.FeatureCache(encoder_study.stats_of, len(IMAGE_STATS), path, "stats-v1")
    np.testing.assert_array_equal(reloaded(tissue_tiles), first)
    assert reloaded.encoded == 0
    other = encoder_study.FeatureCache(encoder_study.stats_of, len(IMAGE_STATS), path, "stats-v2")  # other identity
    other(tissue_tiles[:1])
    assert other.encoded == 1
