"""Nuclei model: readers, a tiny training run, save/load and its refusals, `wsi-qc nuclei` train/predict/eval."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_qc.cli import main
from wsi_qc.errors import ConfigError
from wsi_qc.nuclei.data import read_folder
from wsi_qc.nuclei.model import NucleiModel

NUCLEI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei"
TINY = ["--encoder", "test_efficientnet", "--weights", "random", "--levels", "0", "1", "2"]


def synthetic_nuclei(folder: Path, n: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Pink images with dark purple discs (some touching) beside <stem>_instances.png (16-bit ids)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.indices((size, size))
    for k in range(n):
        inst = np.zeros((size, size), np.uint16)
        for i in range(1, 16):
            cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(5, 9)
            inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)] = i
        image = np.where(inst[..., None] > 0, [90, 50, 130], [230, 180, 200]) + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"img{k}.png")
        Image.fromarray(inst).save(folder / f"img{k}_instances.png")
    return folder


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic_nuclei(tmp_path_factory.mktemp("nuclei") / "data")


@pytest.fixture(scope="module")
def tiny_model(synth, tmp_path_factory) -> Path:
    """A decoder on timm's tiny random test_efficientnet, trained 40 steps through the CLI."""
    out = tmp_path_factory.mktemp("model") / "model"
    assert main(["nuclei", "train", "--data", str(synth), "--out", str(out), "--data-mpp", "0.25", "--steps", "40",
                 "--crop", "64", *TINY]) == 0
    return out


def test_plain_folder_reader(synth, tmp_path):
    samples = read_folder(synth, mpp=0.25)
    assert [s.name for s in samples] == ["img0", "img1", "img2", "img3"]
    s = samples[0]
    assert s.image.shape == (128, 128, 3) and s.instances.dtype == np.uint16 and s.instances.max() >= 10
    assert s.mpp == 0.25 and s.types is None
    with pytest.raises(ConfigError, match="pass --mpp"):
        read_folder(synth)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lonely / "a.png")
    with pytest.raises(ConfigError, match=r"a\.png.*a_instances\.png"):
        read_folder(lonely, mpp=0.25)
    with pytest.raises(ConfigError, match="does not exist"):
        read_folder(tmp_path / "nowhere")


def test_tiny_training_lowers_its_loss_and_is_seeded(synth):
    from wsi_qc.nuclei.train import prepare, train

    samples = read_folder(synth, mpp=0.25)
    model = NucleiModel.create("test_efficientnet", "random", [0, 1, 2], runtime="torch")
    items = prepare(samples, model.encoder, 0.25, progress=False)
    history = train(model, items, steps=40, batch_size=4, crop=64, lr=5e-3, progress=False)["loss"]
    assert np.mean(history[-10:]) < 0.7 * np.mean(history[:10])
    again = NucleiModel.create("test_efficientnet", "random", [0, 1, 2], runtime="torch")
    assert train(again, items, steps=40, batch_size=4, crop=64, lr=5e-3, progress=False)["loss"] == history
    with pytest.raises(ConfigError, match="multiple of 32"):
        train(again, items, steps=1, crop=60, progress=False)


def test_save_load_round_trip_and_refusals(tiny_model, synth, tmp_path):
    import json
    import shutil

    images = np.stack([s.image for s in read_folder(synth, mpp=0.25)[:2]])
    model = NucleiModel.load(tiny_model, runtime="torch")
    meta = json.loads((tiny_model / "nuclei.json").read_text())
    assert meta["encoder"]["name"] == "test_efficientnet" and meta["levels"] == [0, 1, 2] and meta["mpp"] == 0.25
    assert len(meta["encoder"]["weights_sha256"]) > 0 and len(meta["decoder_sha256"]) == 64
    assert meta["postprocess"]["marker_threshold"] in (0.2, 0.3, 0.4, 0.5, 0.6)  # picked on training images
    assert model.postprocess == meta["postprocess"] and meta["training"]["steps"] == 40
    again = NucleiModel.load(tiny_model, encoder="test_efficientnet", mpp=0.25, runtime="torch")
    for a, b in zip(model.predict_maps(images)[:2], again.predict_maps(images)[:2]):
        np.testing.assert_array_equal(a, b)
    fresh = NucleiModel.create("test_efficientnet", "random", [0, 1, 2], runtime="torch")
    assert not np.allclose(fresh.predict_maps(images)[0], model.predict_maps(images)[0])  # the weights were loaded
    with pytest.raises(ConfigError, match="'test_efficientnet'.*'tf_efficientnet_lite0'"):
        NucleiModel.load(tiny_model, encoder="tf_efficientnet_lite0")
    with pytest.raises(ConfigError, match=r"0\.5 mpp.*0\.25 mpp"):
        NucleiModel.load(tiny_model, mpp=0.5)
    altered = tmp_path / "altered"
    shutil.copytree(tiny_model, altered)
    with open(altered / "decoder.safetensors", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ConfigError, match="altered"):
        NucleiModel.load(altered)


def test_openvino_matches_torch(tiny_model, synth):
    pytest.importorskip("openvino")
    images = np.stack([s.image for s in read_folder(synth, mpp=0.25)[:2]])[:, :100, :90]  # padded inside
    ov = NucleiModel.load(tiny_model).predict_maps(images)
    pt = NucleiModel.load(tiny_model, runtime="torch").predict_maps(images)
    assert ov[0].shape == (2, 100, 90)
    for a, b in zip(ov[:2], pt[:2]):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_cli_predict_writes_instance_maps_and_table(tiny_model, synth, tmp_path, capsys):
    out = tmp_path / "pred"
    images = sorted(p for p in synth.iterdir() if not p.stem.endswith("_instances"))
    assert main(["nuclei", "predict", *map(str, images[:3]), "--model", str(tiny_model), "--mpp", "0.25",
                 "--out", str(out)]) == 0
    assert "nuclei in 3 images" in capsys.readouterr().out
    with (out / "nuclei.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "id", "x", "y", "area", "type", "probability"] if rows else True
    for image in images[:3]:
        inst = np.asarray(Image.open(out / f"{image.stem}.png"))
        assert inst.dtype == np.uint16 and inst.shape == (128, 128)
        mine = [r for r in rows if r["image"] == image.name]
        assert len(mine) == inst.max()  # one row per instance id 1..N
        for r in mine:
            assert int(r["area"]) == int((inst == int(r["id"])).sum())
    assert len(rows) > 0
    assert main(["nuclei", "predict", str(images[0]), "--model", str(tiny_model), "--mpp", "0.5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "0.5 mpp" in err and "0.25 mpp" in err
    assert main(["nuclei", "predict", str(synth / "missing.png"), "--model", str(tiny_model), "--mpp", "0.25",
                 "--out", str(out)]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_cli_eval_prints_metrics(tiny_model, synth, capsys):
    assert main(["nuclei", "eval", "--model", str(tiny_model), "--data", str(synth), "--data-mpp", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "4 images: Dice" in out and "AJI" in out and "PQ" in out


@pytest.mark.skipif(not (NUCLEI_DIR / "monuseg_train").is_dir(),
                    reason=f"nuclei data not found at {NUCLEI_DIR} (only present beside a wsi-qc checkout in ../shared)")
def test_readers_on_the_shared_nuclei_data():
    monuseg = read_folder(NUCLEI_DIR / "monuseg_train")
    assert len(monuseg) == 30 and all(s.image.shape == (1000, 1000, 3) and s.mpp == 0.25 for s in monuseg)
    assert {s.meta["organ"] for s in monuseg} >= {"bladder", "colon", "stomach"}
    cpm = read_folder(NUCLEI_DIR / "cpm15")
    assert len(cpm) == 15 and sorted({s.mpp for s in cpm}) == [0.25, 0.5]
    test = read_folder(NUCLEI_DIR / "consep", split="test")
    assert len(test) == 224 and len({s.group for s in test}) == 14
    s = test[0]
    assert s.types and set(s.types.values()) <= {1, 2, 3, 4}
    assert set(np.unique(s.instances)[1:]) <= set(s.types)
