"""CPU runtimes: the exported network in ONNX Runtime / OpenVINO gives eager torch's features, the same at any
thread count and batch size; its export is cached by content; bad choices are refused naming the fix."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from skimage.data import immunohistochemistry

from wsi_qc import cpu_runtime
from wsi_qc.config import load_config
from wsi_qc.encoder import Encoder
from wsi_qc.errors import ConfigError
from wsi_qc.flow import Flow
from wsi_qc.scorer import encoder_from_config

TOLERANCE = 1e-3  # of each feature column's std, as in benchmarks/runtimes.py


def ihc_tiles(n: int, size: int = 224) -> np.ndarray:
    image = immunohistochemistry()
    rng = np.random.default_rng(1)
    return np.stack([image[y:y + size, x:x + size] for y, x in rng.integers(0, 512 - size, (n, 2))])


def default_encoder(**overrides) -> Encoder:
    return encoder_from_config(load_config(overrides={"encoder": {"device": "cpu", **overrides}}))


@pytest.fixture(scope="module")
def eager():
    images = ihc_tiles(4)
    return images, default_encoder(cpu_runtime="torch", channels_last=False)(images)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_default_encoder_matches_eager_at_any_thread_count(runtime, eager):
    pytest.importorskip(runtime)
    images, want = eager
    encoder = default_encoder(cpu_runtime=runtime)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encoder(images)
        torch.set_num_threads(2)
        two = encoder(images)
    finally:
        torch.set_num_threads(threads)
    net = encoder.network_dim  # the exported network: bitwise the same; the torch image statistics: to rounding
    np.testing.assert_array_equal(one[..., :net], two[..., :net])
    np.testing.assert_allclose(one[..., net:], two[..., net:], rtol=1e-5, atol=1e-6)
    d = want.shape[-1]
    worst = np.abs(one - want).reshape(-1, d).max(0) / np.maximum(want.reshape(-1, d).std(0), 1e-6)
    assert worst.max() < TOLERANCE
    single = encoder(images[1:2])  # another batch size than the export's
    np.testing.assert_array_equal(single[..., :net], one[1:2, ..., :net])
    np.testing.assert_allclose(single[..., net:], one[1:2, ..., net:], rtol=1e-5, atol=1e-6)
    assert encoder.meta() == default_encoder(cpu_runtime="torch").meta()  # not part of the scorer's identity


def test_export_is_cached_by_content(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("WSI_QC_CACHE", str(tmp_path))
    kwargs = dict(levels=[0, 1], device="cpu", cpu_runtime="onnxruntime")
    first = Encoder("test_efficientnet", **kwargs)
    (path,) = (tmp_path / "onnx").iterdir()
    stamp = path.stat().st_mtime_ns
    again = Encoder("test_efficientnet", **kwargs)
    assert again._run.path == path and path.stat().st_mtime_ns == stamp  # read, not exported again
    np.testing.assert_array_equal(again(ihc_tiles(2, 64)), first(ihc_tiles(2, 64)))
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert cpu_runtime._content_key(a, {}) != cpu_runtime._content_key(b, {})  # other weights, other file
    b.load_state_dict(a.state_dict())
    assert cpu_runtime._content_key(a, {}) == cpu_runtime._content_key(b, {})
    assert cpu_runtime._content_key(a, {"grid": 4}) != cpu_runtime._content_key(a, {"grid": 8})


def test_bad_runtime_choices_are_refused_naming_the_fix(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="cpu_runtime 'tensorrt' is not one of torch, onnxruntime, openvino"):
        Encoder("test_efficientnet", device="cpu", cpu_runtime="tensorrt")
    with pytest.raises(ConfigError, match="encoder.cpu_runtime"):
        load_config(overrides={"encoder": {"cpu_runtime": "onnx"}})
    with pytest.raises(ConfigError, match="flow.cpu_runtime"):
        load_config(overrides={"flow": {"cpu_runtime": "onnxruntime"}})  # the flow runs in torch or OpenVINO
    with pytest.raises(ConfigError, match="precision='bf16'.*set precision: fp32 and compile: false, or cpu_runtime"):
        Encoder("test_efficientnet", device="cpu", precision="bf16", cpu_runtime="onnxruntime")

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(cpu_runtime, "importlib", types.SimpleNamespace(import_module=missing))
    with pytest.raises(ConfigError, match="needs the openvino package .* pip install openvino or set encoder"):
        cpu_runtime.ExportedNetwork("openvino", tmp_path / "network.onnx")
    x = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    flow = Flow(n_blocks=2, hidden=8, epochs=1, min_reference=10, cpu_runtime="openvino").fit(x)  # fits in torch
    with pytest.raises(ConfigError, match="flow.cpu_runtime 'openvino' needs the openvino package .* set flow.cpu"):
        flow.transform(x)
