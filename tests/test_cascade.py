"""The cascade (wsi_qc.cascade): score mapping, settling rule, each pass on and off, save/load, slides without a
coarse level, and agreement with the single pass on a generated slide with pasted artifacts (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_qc.api import fit_reference
from wsi_qc.artifacts import make_artifact
from wsi_qc.cascade import PASSES, coarse_config, in_range, settled, to_scale, upsample
from wsi_qc.config import load_config
from wsi_qc.errors import ConfigError
from wsi_qc.scorer import Scorer, slide_scores
from wsi_qc.slide import Slide
from wsi_qc.threshold import conformal_threshold
from wsi_qc.tiles import tile_slide

TINY = {"tiles": {"size": 64, "mpp": 0.5, "workers": 0, "batch_size": 32},
        "encoder": {"name": "test_efficientnet", "weights": "random", "device": "cpu"},
        "flow": {"epochs": 3, "n_blocks": 2, "hidden": 32, "min_reference": 20, "patience": 2, "device": "cpu"},
        "cascade": {"enabled": True}}


def test_to_scale_maps_reference_quantiles_onto_the_other_pass():
    rng = np.random.default_rng(0)
    source, target = rng.gamma(2.0, 1.0, 500), 10 + 3 * rng.gamma(3.0, 1.0, 400)
    values = np.quantile(source, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(to_scale(values, source, target), np.quantile(target, [0.1, 0.5, 0.9]), rtol=0.02)
    grid = np.linspace(0, 2 * source.max(), 50)
    assert np.all(np.diff(to_scale(grid, source, target)) >= 0)  # monotone, so the ranking is kept
    top = to_scale(np.array([source.max(), 2 * source.max()]), source, target)
    np.testing.assert_allclose(top[1], 2 * top[0], rtol=1e-5)  # beyond the reference: in proportion


def test_settled_needs_a_low_coarse_score_and_focus_in_range():
    rng = np.random.default_rng(1)
    state = {"coarse": rng.uniform(0, 1, 1000), "focus": rng.normal(0, 1, (1000, 3))}
    cascade = {"settle": 0.9, "focus": True, "focus_alpha": 0.01}
    coarse = np.array([0.5, 0.95, 0.5, 0.5])
    focus = np.array([[0, 0, 0], [0, 0, 0], [0, -5, 0], [4, 0, 0]], float)
    assert settled(coarse, focus, state, cascade).tolist() == [True, False, False, False]
    assert settled(coarse, focus, state, {**cascade, "focus": False}).tolist() == [True, False, True, True]
    assert in_range(focus, state["focus"], 0.01).tolist() == [True, True, False, False]


def test_upsample_copies_each_coarse_cell():
    maps = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    up = upsample(maps, 6)
    assert up.shape == (2, 6, 6) and np.array_equal(up[:, ::2, ::2], maps) and np.array_equal(up[:, 1::2, 1::2], maps)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny scorer fitted with the cascade on generated tiles, saved; and tiles to score (clean + inked)."""
    from tests.conftest import write_tile_folder

    root = tmp_path_factory.mktemp("cascade")
    config = load_config(overrides=TINY)
    scorer = fit_reference([write_tile_folder(root / "ref", n=80)], config)
    scorer.save(root / "scorer")
    rng = np.random.default_rng(3)
    clean = np.clip(np.array([200, 120, 170]) + rng.normal(0, 25, (24, 64, 64, 3)), 0, 255).astype(np.uint8)
    inked = np.stack([make_artifact(t, "pen", 3, np.random.default_rng(i)) for i, t in enumerate(clean[:8])])
    return {"root": root, "config": config, "scorer": scorer, "images": np.concatenate([clean, inked])}


def test_fitted_scorer_carries_its_coarse_pass_and_loads_it(tiny):
    scorer, root = tiny["scorer"], tiny["root"]
    assert scorer.coarse is not None and scorer.coarse.encoder.grid == 7 and scorer.coarse.encoder.data_config[
        "input_size"] == [3, 32, 32]  # 64 px at 0.5 mpp seen at 1 mpp
    as_fitted = load_config(overrides={k: v for k, v in TINY.items() if k != "cascade"})  # cascade.enabled: null
    assert Scorer.load(root / "scorer", as_fitted).cascade_on  # runs as it was fitted
    assert not Scorer.load(root / "scorer", load_config(overrides={**TINY, "cascade": {"enabled": False}})).cascade_on
    loaded = Scorer.load(root / "scorer", tiny["config"])
    a, b = scorer.score_images(tiny["images"]), loaded.score_images(tiny["images"])
    np.testing.assert_allclose(a["rl2"], b["rl2"], rtol=1e-5)
    assert np.array_equal(a["pass"], b["pass"])
    assert set(np.unique(a["pass"])) <= {0, 1} and (a["pass"] == 1).any()  # some tiles settled by the coarse pass


def test_each_pass_can_be_turned_off(tiny):
    images, root = tiny["images"], tiny["root"]

    def run(**cascade):
        config = load_config(overrides={**TINY, "cascade": {"enabled": True, **cascade}})
        return Scorer.load(root / "scorer", config).score_images(images, timings := {}), timings

    full, t_full = run()
    assert {"coarse_s", "focus_s"} <= set(t_full) and "encode_s" not in t_full
    single, t_single = run(enabled=False)
    assert set(single["pass"]) == {0} and "coarse_s" not in t_single and not single["discard"].any()
    # the fine pass scores exactly the tiles in doubt: those keep the single pass's score
    fine = full["pass"] == 0
    np.testing.assert_allclose(full["rl2"][fine], single["rl2"][fine], rtol=1e-5)
    coarse_only, t_coarse = run(fine=False)
    assert "fine_s" not in t_coarse and set(np.unique(coarse_only["pass"])) <= {1, 2}
    unfocused, _ = run(focus=False)
    assert (unfocused["pass"] == 1).sum() >= (full["pass"] == 1).sum()  # fewer checks, at least as many settled
    loose, _ = run(settle=1.0, focus=False)  # clear up to the worst held-out reference tile
    assert (loose["pass"] == 1).sum() >= (unfocused["pass"] == 1).sum() and (loose["pass"][-8:] == 0).all()  # inked
    strict, _ = run(settle=0.0)  # clear only below the best held-out reference tile
    assert (strict["pass"] == 1).sum() <= (full["pass"] == 1).sum()


def test_cascade_without_a_fitted_coarse_pass_or_with_another_resolution_is_refused(tiny, tmp_path):
    config = load_config(overrides={**TINY, "cascade": {"enabled": False}})
    from tests.conftest import write_tile_folder

    plain = fit_reference([write_tile_folder(tmp_path / "ref", n=40)], config)
    plain.save(tmp_path / "plain")
    with pytest.raises(ConfigError, match="fitted without the cascade.*cascade.enabled: false"):
        Scorer.load(tmp_path / "plain", load_config(overrides=TINY))
    with pytest.raises(ConfigError, match="cascade.coarse_mpp=1.0 but the config asks for 4.0"):
        Scorer.load(tiny["root"] / "scorer", load_config(overrides={**TINY, "cascade": {"coarse_mpp": 4.0}}))


def test_coarse_config_keeps_the_encoder_and_sets_the_coarse_view():
    config = load_config()
    coarse = coarse_config(config)
    assert coarse["encoder"]["name"] == config["encoder"]["name"] and coarse["encoder"]["input_size"] == 112
    assert coarse["encoder"]["grid"] == 7 and coarse["cascade"]["enabled"] is False
    assert config["encoder"]["input_size"] is None  # the config itself is untouched


def test_a_slide_without_a_coarse_level_is_scored_by_the_cascade(tiny):
    """An in-memory slide has one level only: the coarse view comes from the tiles read at tiles.mpp."""
    rng = np.random.default_rng(5)
    pixels = np.clip(np.array([200, 120, 170]) + rng.normal(0, 25, (512, 512, 3)), 0, 255).astype(np.uint8)
    with Slide.from_array(pixels, mpp=0.5, name="flat") as slide:
        assert slide.level_count == 1
        found = slide_scores(slide, tiny["scorer"], tiny["scorer"].config)
    n = len(found.tiles.coords)
    assert n > 0 and found.scores["rl2"].shape == (n,) and found.scores["pass"].shape == (n,)
    assert found.scores["rl2_map"].shape == (n, 14, 14) and "coarse_s" in found.timings
    assert set(np.unique(found.scores["pass"])) <= {PASSES.index("fine"), PASSES.index("coarse")}


def test_slide_scores_give_freed_memory_back_every_few_batches(tiny, monkeypatch):
    """glibc's malloc_trim after every TRIM_EVERY batches and once after the tile loop (a stand-in libc counts)."""
    from types import SimpleNamespace

    from wsi_qc import scorer as scorer_module

    trims = []
    monkeypatch.setattr(scorer_module, "_LIBC", SimpleNamespace(malloc_trim=trims.append))
    config = tiny["scorer"].config
    config = {**config, "tiles": {**config["tiles"], "batch_size": 4}}
    rng = np.random.default_rng(6)
    pixels = np.clip(np.array([200, 120, 170]) + rng.normal(0, 25, (512, 512, 3)), 0, 255).astype(np.uint8)
    with Slide.from_array(pixels, mpp=0.5, name="flat") as slide:
        found = slide_scores(slide, tiny["scorer"], config)
    batches = -(-len(found.tiles.coords) // 4)
    assert batches > scorer_module.TRIM_EVERY and trims == [0] * (batches // scorer_module.TRIM_EVERY + 1)


@pytest.mark.slow
def test_cascade_flags_the_tiles_the_single_pass_flags(tmp_path):
    """Default encoder, generated slides: reference on one; another with large artifacts (pen, fold, blur, bubble,
    severity 3) pasted on 40 of its tiles. At the label-free 2 % cut the cascade discards the same tiles as the
    single pass on at least 95 % of the tiles, finds at least as many pasted ones less 5 points, and settles at
    least a quarter of the clean tiles without the full-resolution encoder. (Debris and other small artifacts are missed more often
    by the coarse pass: the QC benchmark's cascade row.)"""
    from wsi_qc.data import write_example_slide

    config = load_config(overrides={"tiles": {"workers": 0}, "flow": {"epochs": 15}, "cascade": {"enabled": True}})
    ref = write_example_slide(tmp_path / "ref.tif", size=(8192, 8192), mpp=0.25, seed=0)
    scorer = fit_reference([ref], config)
    with Slide(write_example_slide(tmp_path / "test.tif", size=(8192, 8192), mpp=0.25, seed=1)) as slide:
        pixels = slide.read_region((0, 0), (4096, 4096), 0.5)
    single_scorer = Scorer(scorer.encoder, scorer.flow, {**scorer.config, "cascade": {**config["cascade"],
                                                                                      "enabled": False}})
    with Slide.from_array(pixels, mpp=0.5, name="test") as slide:
        coords = tile_slide(slide, config)[3].coords  # level 0 is 0.5 mpp: pixel coords
    images = np.stack([pixels[y:y + 224, x:x + 224] for x, y in coords])
    rng = np.random.default_rng(0)
    pasted = rng.choice(len(images), size=min(40, len(images) // 3), replace=False)
    for i, k in enumerate(pasted):
        kind = ("pen", "fold", "blur", "bubble")[i % 4]
        images[k] = make_artifact(images[k], kind, 3, np.random.default_rng(i))
    single, cascade = single_scorer.score_images(images), scorer.score_images(images)
    cut = conformal_threshold(scorer.heldout_scores(), 0.02)
    flagged_single, flagged_cascade = single["rl2"] > cut, cascade["rl2"] > cut
    assert flagged_single[pasted].mean() >= 0.9  # the pasted artifacts are there to be found
    assert (flagged_single == flagged_cascade).mean() >= 0.95
    assert flagged_cascade[pasted].mean() >= flagged_single[pasted].mean() - 0.05
    clean = np.ones(len(images), bool)
    clean[pasted] = False
    assert (cascade["pass"][clean] == 1).mean() >= 0.25  # the coarse pass settles clean tiles (about half here)


def test_an_explicit_coarse_mpp_is_refused_even_when_it_is_the_default(tiny, tmp_path):
    import json
    import shutil

    from wsi_qc.flow import _fingerprint

    shutil.copytree(tiny["root"] / "scorer", tmp_path / "scorer")
    meta = json.loads((tmp_path / "scorer" / "meta.json").read_text())
    meta["scorer"]["cascade"]["config"]["coarse_mpp"] = 2.0  # as if fitted with a coarser view
    meta["fingerprint"] = _fingerprint(tmp_path / "scorer" / "flow.safetensors", meta)
    (tmp_path / "scorer" / "meta.json").write_text(json.dumps(meta))
    assert load_config()["cascade"]["coarse_mpp"] == 1.0
    with pytest.raises(ConfigError, match=r"cascade.coarse_mpp=2.0 but the config asks for 1.0"):
        Scorer.load(tmp_path / "scorer", load_config(overrides={**TINY, "cascade": {"coarse_mpp": 1.0}}))
