"""Scorer and the CLI around it: fit-reference, score, rl2 and calibrate on folders of real-texture tiles."""

from __future__ import annotations

import csv
import inspect
import json
import re
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from wsi_qc import cli
from wsi_qc.config import load_config
from wsi_qc.data import _stain_images
from wsi_qc.encoder import Encoder
from wsi_qc.errors import ConfigError
from wsi_qc.flow import PARAMS, Flow, _fingerprint
from wsi_qc.scorer import Scorer, aggregate, encoder_from_config, folder_features, holdout_groups

SMALL = {"encoder": {"name": "resnet18", "weights": "random"}, "tiles": {"size": 64, "batch_size": 32, "workers": 0},
         "flow": {"n_blocks": 2, "hidden": 64, "epochs": 15, "patience": 5, "min_reference": 20},
         "threshold": {"n_bootstrap": 50}}


def _crops(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Random crops of the real H&E image shipped in tiatoolbox (or the IHC image)."""
    image = _stain_images()[0][1]
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, image.shape[0] - size, n), rng.integers(0, image.shape[1] - size, n)
    return np.stack([image[y:y + size, x:x + size] for y, x in zip(ys, xs)])


def _write(folder, images, prefix="t"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{prefix}{i:03d}.png")
    return folder


def _blur(images, sigma=3.0):
    return np.stack([ndimage.gaussian_filter(im, (sigma, sigma, 0)) for im in images])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer")
    cfg = root / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    _write(root / "reference", _crops(60, 0))
    _write(root / "good", _crops(30, 1))
    _write(root / "bad", _blur(_crops(30, 2)))
    assert cli.main(["fit-reference", str(root / "reference"), "--out", str(root / "scorer"),
                     "--config", str(cfg)]) == 0
    return root, cfg


def test_fit_reference_writes_a_scorer_with_meta(setup):
    root, _ = setup
    meta = json.loads((root / "scorer" / "meta.json").read_text())
    assert (root / "scorer" / "flow.safetensors").is_file()
    assert meta["encoder"]["name"] == "resnet18" and meta["scorer"]["config"]["tiles"]["size"] == 64
    assert meta["scorer"]["kind"] == "local" and meta["scorer"]["format"] == 2  # the default: local
    assert re.fullmatch(r"[0-9a-f]{64}", meta["fingerprint"])


def test_loaded_scorer_scores_like_the_fitted_one_and_is_deterministic(setup):
    root, cfg = setup
    config = load_config(cfg)
    encoder = encoder_from_config(config)
    _, features = folder_features(root / "reference", encoder, config)
    fitted = Scorer.fit(features, encoder, config)
    again = Scorer.fit(features, encoder_from_config(config), config)
    loaded = Scorer.load(root / "scorer", config)
    np.testing.assert_array_equal(fitted.score(features), again.score(features))
    np.testing.assert_allclose(loaded.score(features), fitted.score(features), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override, key", [({"tiles": {"size": 96}}, "tiles.size"),
                                           ({"tiles": {"mpp": 1.0}}, "tiles.mpp"),
                                           ({"encoder": {"pooling": "grid2"}}, "encoder.pooling")])
def test_scorer_refuses_a_disagreeing_config_naming_both_values(setup, override, key):
    root, cfg = setup
    config = load_config(cfg, overrides=override)
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        Scorer.load(root / "scorer", config)
    assert "refit" in str(err.value)


def test_score_writes_a_csv_where_blurred_tiles_score_worse(setup, tmp_path):
    root, cfg = setup
    for name in ("good", "bad"):
        assert cli.main(["score", str(root / name), "--scorer", str(root / "scorer"), "--config", str(cfg),
                         "--out", str(tmp_path / f"{name}.csv")]) == 0
    good = [float(r["rl2"]) for r in csv.DictReader(open(tmp_path / "good.csv"))]
    bad = [float(r["rl2"]) for r in csv.DictReader(open(tmp_path / "bad.csv"))]
    assert len(good) == len(bad) == 30
    assert np.median(bad) > np.median(good)


def test_rl2_of_blurred_set_exceeds_rl2_of_clean_set(setup, capsys):
    root, cfg = setup
    values = {}
    for name in ("good", "bad"):
        assert cli.main(["rl2", str(root / "reference"), str(root / name), "--config", str(cfg),
                         "--bootstrap", "50"]) == 0
        values[name] = float(re.search(r"RL2 = ([\d.]+)", capsys.readouterr().out).group(1))
    assert values["bad"] > values["good"] >= 0


def test_calibrate_from_good_and_bad_folders(setup, tmp_path, capsys):
    root, cfg = setup
    out = tmp_path / "calibration.json"
    assert cli.main(["calibrate", "--scorer", str(root / "scorer"), "--good", str(root / "good"), "--bad",
                     str(root / "bad"), "--out", str(out), "--config", str(cfg)]) == 0
    saved = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert 0.5 < saved["auc"] <= 1.0 and "operating point" in printed
    assert (tmp_path / "calibration_roc.png").is_file()


def test_calibrate_refuses_labels_of_one_class(setup, tmp_path, capsys):
    root, cfg = setup
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},0\n" for p in sorted((root / "good").iterdir())))
    code = cli.main(["calibrate", "--scorer", str(root / "scorer"), "--labels", str(labels), "--config", str(cfg),
                     "--out", str(tmp_path / "c.json")])
    assert code == 2 and "class" in capsys.readouterr().err


def test_calibrate_without_labels_or_rate_names_both_ways(setup, tmp_path, capsys):
    root, cfg = setup
    code = cli.main(["calibrate", "--scorer", str(root / "scorer"), "--config", str(cfg),
                     "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--labels CSV" in err and "--false-discard 0.02" in err
    assert not (tmp_path / "c.json").exists()


def test_calibrate_label_free_from_the_config_rule_alone(setup, tmp_path):
    root, cfg = setup
    rule = tmp_path / "rule.yaml"
    rule.write_text(yaml.safe_dump({**SMALL, "threshold": {"rule": "false_discard", "value": 0.05}}))
    out = tmp_path / "c.json"
    assert cli.main(["calibrate", "--scorer", str(root / "scorer"), "--config", str(rule), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rule"] == "false_discard" and saved["value"] == 0.05


def test_calibrate_refuses_labels_naming_missing_tiles(setup, tmp_path, capsys):
    root, cfg = setup
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\nnope.png,1\n{root / 'good' / 't000.png'},0\n")
    code = cli.main(["calibrate", "--scorer", str(root / "scorer"), "--labels", str(labels), "--config", str(cfg),
                     "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.png" in err and "do not exist" in err


def test_fit_reference_refuses_an_empty_folder(setup, tmp_path, capsys):
    _, cfg = setup
    (tmp_path / "empty").mkdir()
    code = cli.main(["fit-reference", str(tmp_path / "empty"), "--out", str(tmp_path / "s"), "--config", str(cfg)])
    assert code == 2 and "no tile images" in capsys.readouterr().err


def test_fit_reference_refuses_too_few_tiles_saying_how_many(setup, tmp_path, capsys):
    _, cfg = setup
    _write(tmp_path / "few", _crops(5, 3))
    code = cli.main(["fit-reference", str(tmp_path / "few"), "--out", str(tmp_path / "s"), "--config", str(cfg)])
    assert code == 2 and "at least 20" in capsys.readouterr().err


def test_score_needs_no_config_the_scorer_carries_its_own(setup, tmp_path):
    root, cfg = setup
    out = tmp_path / "noconfig.csv"
    assert cli.main(["score", str(root / "good"), "--scorer", str(root / "scorer"), "--out", str(out)]) == 0
    withcfg = tmp_path / "withconfig.csv"
    assert cli.main(["score", str(root / "good"), "--scorer", str(root / "scorer"), "--config", str(cfg),
                     "--out", str(withcfg)]) == 0
    assert out.read_text() == withcfg.read_text()
    loaded = Scorer.load(root / "scorer")
    assert loaded.config["tiles"]["size"] == 64 and loaded.encoder.name == "resnet18"


def test_scorer_runs_under_either_cpu_runtime_with_its_fingerprint_and_scores(setup):
    pytest.importorskip("onnxruntime")
    root, cfg = setup
    images = _crops(6, 7)
    scored = {}
    for runtime in ("torch", "onnxruntime"):
        scorer = Scorer.load(root / "scorer", load_config(cfg, overrides={"encoder": {"cpu_runtime": runtime}}))
        assert scorer.encoder.cpu_runtime == runtime
        scored[runtime] = (scorer.fingerprint, scorer.score(scorer.encoder(images)))
    assert scored["torch"][0] == scored["onnxruntime"][0]
    np.testing.assert_allclose(scored["onnxruntime"][1], scored["torch"][1], rtol=1e-3)


def test_scorer_of_another_format_is_refused_naming_the_fix(setup, tmp_path):
    root, _ = setup
    import shutil

    shutil.copytree(root / "scorer", tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    meta["scorer"]["format"] = 1
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="scorer format 1.*refit"):
        Scorer.load(tmp_path / "old")


def test_scorer_of_other_image_statistics_is_refused_naming_the_fix(setup, tmp_path):
    root, _ = setup
    import shutil

    shutil.copytree(root / "scorer", tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    meta["encoder"]["image_stats"].remove("dark_neutral_fraction")  # as wsi-qc 0.1.0 wrote a local scorer
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="image statistics.*dark_neutral_fraction.*refit"):
        Scorer.load(tmp_path / "old")


def test_holdout_groups_are_slides_from_three_on_else_tiles():
    slides = np.array(["b", "a", "b", "c", "a"])
    assert np.array_equal(holdout_groups(slides, 5), [1, 0, 1, 2, 0])  # whole slides
    assert np.array_equal(holdout_groups(slides[:3], 3), [0, 1, 2])  # two slides: single tiles
    assert np.array_equal(holdout_groups(None, 4), np.arange(4))


def test_aggregate_rules():
    maps = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    np.testing.assert_array_equal(aggregate(maps, "max"), [19, 39])
    np.testing.assert_array_equal(aggregate(maps, "mean"), [9.5, 29.5])
    np.testing.assert_array_equal(aggregate(maps, "top10"), [18.5, 38.5])  # the 2 largest of 20
    with pytest.raises(ConfigError, match="top5"):
        aggregate(maps, "median")


LOCAL = {"encoder": {"levels": [1, 2, 3], "grid": 7}, "tiles": {"size": 112, "batch_size": 32, "workers": 0},
         "flow": {"pca_dim": 24, "n_blocks": 2, "hidden": 64, "epochs": 6, "patience": 3, "batch_size": 512,
                  "min_reference": 20},
         "score": {"aggregate": "max"}}


@pytest.fixture(scope="module")
def local_scorer(tmp_path_factory):
    config = load_config(overrides=LOCAL)
    encoder = encoder_from_config(config)
    reference = _crops(60, 10, size=112)
    features = encoder(reference)
    scorer = Scorer.fit(features, encoder, config)
    path = scorer.save(tmp_path_factory.mktemp("local") / "scorer")
    return scorer, path, features


def test_local_scorer_keeps_a_map_and_round_trips(local_scorer):
    scorer, path, features = local_scorer
    assert scorer.kind == "local" and features.shape == (60, 7, 7, scorer.encoder.dim)
    scores, maps = scorer.score_tiles(features)
    assert maps.shape == (60, 7, 7) and np.array_equal(scores, maps.reshape(60, -1).max(1))
    loaded = Scorer.load(path)
    assert loaded.kind == "local" and loaded.meta["scorer"]["kind"] == "local"
    np.testing.assert_allclose(loaded.score(features), scores, rtol=1e-5)
    assert len(loaded.heldout_scores()) == 12  # val_fraction 0.2 of 60 tiles, held out whole


def test_local_scores_are_highest_where_a_patch_was_pasted(local_scorer):
    scorer, _, _ = local_scorer
    tiles = _crops(8, 11, size=112)
    pasted = tiles.copy()
    pasted[:, 8:40, 8:40] = (40, 30, 28)  # a dark speck of debris in the top-left corner
    _, clean_maps = scorer.score_tiles(scorer.encoder(tiles))
    _, maps = scorer.score_tiles(scorer.encoder(pasted))
    inside = maps[:, :3, :3].mean((1, 2))  # grid cells of 16 px: rows/cols 0-2 cover the patch
    outside = maps[:, 4:, 4:].mean((1, 2))
    assert (inside > outside).all()
    assert (inside > clean_maps[:, :3, :3].mean((1, 2))).all()


@pytest.mark.parametrize("edit", [
    lambda m: m.update(latent_dim=7),                       # a wrong latent dimension
    lambda m: m.update(surprise=1),                         # an unknown key
    lambda m: m.pop("feature_dim"),                         # a missing key
    lambda m: m["scorer"].update(config=["not", "a", "dict"]),  # a list for an object
])
def test_malformed_meta_is_refused_naming_the_fix(setup, tmp_path, edit, capsys):
    import shutil

    root, _ = setup
    shutil.copytree(root / "scorer", tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    edit(meta)
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="refit"):
        Scorer.load(tmp_path / "s")
    code = cli.main(["score", str(root / "good"), "--scorer", str(tmp_path / "s"), "--out", str(tmp_path / "x.csv")])
    assert code == 2 and str(tmp_path / "s") in capsys.readouterr().err


def test_foreign_weights_or_a_list_meta_are_refused(setup, tmp_path):
    import shutil

    root, _ = setup
    shutil.copytree(root / "scorer", tmp_path / "s")
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(3)}, str(tmp_path / "s" / "flow.safetensors"))
    with pytest.raises(ConfigError, match="changed or mixed"):
        Scorer.load(tmp_path / "s")
    (tmp_path / "s" / "meta.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a list"):
        Scorer.load(tmp_path / "s")


def test_slide_features_of_an_in_memory_slide():
    from wsi_qc.scorer import slide_features
    from wsi_qc.slide import Slide

    config = load_config(overrides={"encoder": {"name": "resnet18", "weights": "random", "device": "cpu",
                                                "grid": None}, "tiles": {"size": 128, "workers": 2}})
    image = _stain_images()[0][1]
    with Slide.from_array(image, mpp=0.5) as slide:
        found = slide_features(slide, encoder_from_config(config), config)
    assert found.features.shape[0] == len(found.tiles.coords) > 10 and found.timings["tiles_per_s"] > 0


def test_reference_slides_are_all_opened_before_any_is_encoded(tmp_path, monkeypatch):
    from wsi_qc import scorer as scorer_module
    from wsi_qc.data import write_example_slide
    from wsi_qc.errors import SlideError

    write_example_slide(tmp_path / "ref" / "a-good.tif", size=(2048, 2048), mpp=0.25, seed=0)
    (tmp_path / "ref" / "z-broken.svs").write_bytes(np.random.default_rng(0).bytes(1000))
    encoded = []
    monkeypatch.setattr(scorer_module, "slide_features", lambda slide, *a, **k: encoded.append(slide))
    config = load_config(overrides=SMALL)
    with pytest.raises(SlideError, match="z-broken.svs"):
        scorer_module.reference_features([tmp_path / "ref"], encoder_from_config(config), config)
    assert encoded == []  # the good slide, listed first, was not encoded before the broken one was found


def _edited_scorer(setup, tmp_path, edit):
    """A copy of the setup's scorer with its saved config edited (and its fingerprint made to match)."""
    root, _ = setup
    shutil.copytree(root / "scorer", tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "meta.json").read_text())
    edit(meta["scorer"]["config"])
    meta["fingerprint"] = _fingerprint(tmp_path / "edited" / "flow.safetensors", meta)
    (tmp_path / "edited" / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "edited"


def test_device_auto_loads_a_cuda_fitted_scorer_on_the_cpu(setup, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    _, cfg = setup

    def on_cuda(config):
        config["encoder"]["device"] = config["flow"]["device"] = "cuda"

    path = _edited_scorer(setup, tmp_path, on_cuda)
    with pytest.raises(ConfigError, match="CUDA is not available"):  # not set: the scorer's own device
        Scorer.load(path, load_config(cfg))
    scorer = Scorer.load(path, load_config(cfg, overrides={"encoder": {"device": "auto"}, "flow": {"device": "auto"}}))
    assert scorer.encoder.device.type == "cpu" and scorer.config["encoder"]["device"] == "auto"


def test_an_explicit_tile_mpp_is_refused_even_when_it_is_the_default(setup, tmp_path):
    _, cfg = setup
    path = _edited_scorer(setup, tmp_path, lambda config: config["tiles"].update(mpp=1.0))
    assert load_config()["tiles"]["mpp"] == 0.5
    with pytest.raises(ConfigError, match=r"tiles\.mpp=1\.0 but the config asks for 0\.5"):
        Scorer.load(path, load_config(cfg, overrides={"tiles": {"mpp": 0.5}}))
    assert Scorer.load(path, load_config(cfg)).config["tiles"]["mpp"] == 1.0  # not set: the scorer's own
    plain = {**load_config(cfg)}  # a plain dict does not know what was set: the default counts as unset
    assert Scorer.load(path, plain).config["tiles"]["mpp"] == 1.0


def test_class_defaults_are_the_default_config():
    defaults = load_config()
    assert Flow().params() == {k: defaults["flow"][k] for k in PARAMS}
    signature = inspect.signature(Encoder.__init__).parameters
    # the encoder class is the plain network (random weights, pooled, no statistics, torch); the config's product
    # default adds the rest
    differ = {"name", "weights", "levels", "grid", "image_stats", "cpu_runtime"}  # name: always given
    same = {k: signature[k].default for k in signature if k in defaults["encoder"] and k not in differ}
    same["model_kwargs"] = same["model_kwargs"] or {}  # None stands for no extra arguments
    assert same and same == {k: defaults["encoder"][k] for k in same}


def test_a_folder_of_slides_with_a_stray_png_is_refused_naming_both(tmp_path):
    from wsi_qc.data import write_example_slide
    from wsi_qc.scorer import _slides_in, image_paths

    folder = tmp_path / "slides"
    slide = write_example_slide(folder / "a.tif", size=(1024, 1024), mpp=0.5, seed=0)
    assert _slides_in(folder, "*.tif") == [slide]  # a pyramidal TIFF is a slide, not a tile
    Image.fromarray(_crops(1, 0)[0]).save(folder / "stray.png")
    for call in (lambda: _slides_in(folder, "*.tif"), lambda: image_paths(folder, "*.tif")):
        with pytest.raises(ConfigError, match=r"holds both slide files \(1, e\.g\. .*a\.tif\) and tile images "
                                              r"\(1, e\.g\. .*stray\.png\)"):
            call()
    tiles = _write(tmp_path / "tiles", _crops(2, 1))
    Image.fromarray(_crops(1, 2)[0]).save(tiles / "one-page.tif")  # a one-page TIFF is a tile image
    assert _slides_in(tiles, "*.tif") == [] and [p.name for p in image_paths(tiles, "*.tif")] == [
        "one-page.tif", "t000.png", "t001.png"]


def test_a_decompression_bomb_tile_is_a_config_error(tmp_path, monkeypatch):
    from wsi_qc.scorer import read_tile_images

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is above twice the limit
    with pytest.raises(ConfigError, match="huge.png is too large for a tile image.*looks like a slide"):
        read_tile_images([path], 64)
