"""Scorer and the CLI around it: fit-reference, score, rl2 and calibrate on folders of real-texture tiles."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from wsi_qc import cli
from wsi_qc.config import load_config
from wsi_qc.data import _stain_images
from wsi_qc.errors import ConfigError
from wsi_qc.scorer import Scorer, encoder_from_config, folder_features

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
    assert meta["encoder"]["name"] == "resnet18" and meta["bound"]["tiles.size"] == 64
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
