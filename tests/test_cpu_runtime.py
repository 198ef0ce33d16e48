"""CPU runtimes: the exported network in ONNX Runtime / OpenVINO gives eager torch's features, the same at any
thread count and batch size; its export is cached by content; bad choices are refused naming the fix."""

from __future__ import annotations

import json
import os
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
    (path,) = (tmp_path / "onnx").glob("*.onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [path.name, f"{path.stem}.sha256"]
    stamp = path.stat().st_mtime_ns
    again = Encoder("test_efficientnet", **kwargs)
    assert again._run.path == path and path.stat().st_mtime_ns == stamp  # read, not exported again
    np.testing.assert_array_equal(again(ihc_tiles(2, 64)), first(ihc_tiles(2, 64)))
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert cpu_runtime.export_key(a, {}) != cpu_runtime.export_key(b, {})  # other weights, other file
    b.load_state_dict(a.state_dict())
    assert cpu_runtime.export_key(a, {}) == cpu_runtime.export_key(b, {})
    assert cpu_runtime.export_key(a, {"grid": 4}) != cpu_runtime.export_key(a, {"grid": 8})


class _Doubled(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _pool_a(x):
    return x.mean(1)


def _pool_b(x):
    return x.amax(1)


def test_export_key_changes_with_the_exported_code_and_the_wsi_qc_version(monkeypatch):
    a, b = torch.nn.Linear(2, 2), _Doubled(2, 2)
    b.load_state_dict(a.state_dict())  # the same parameters, another forward
    assert cpu_runtime.export_key(a, {}) != cpu_runtime.export_key(b, {})
    assert cpu_runtime.export_key(a, {}, (_pool_a,)) != cpu_runtime.export_key(a, {}, (_pool_b,))
    before = cpu_runtime.export_key(a, {})
    monkeypatch.setattr(cpu_runtime, "__version__", "0.0.0-other")
    assert cpu_runtime.export_key(a, {}) != before  # two installed versions never share an export


def test_encoder_export_key_covers_the_feature_code(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("WSI_QC_CACHE", str(tmp_path))
    kwargs = dict(levels=[0, 1], device="cpu", cpu_runtime="onnxruntime")
    Encoder("test_efficientnet", **kwargs)
    from wsi_qc import encoder as encoder_module

    def changed(self, fmap):  # the resampling code of the exported forward changes: a new export
        return encoder_module.F.adaptive_max_pool2d(fmap, self.grid)

    monkeypatch.setattr(encoder_module.Encoder, "_resample", changed)
    Encoder("test_efficientnet", **kwargs)
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "missing_manifest"])
def test_a_damaged_onnx_export_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("WSI_QC_CACHE", str(tmp_path))
    kwargs = dict(levels=[0, 1], device="cpu", cpu_runtime="onnxruntime")
    want = Encoder("test_efficientnet", **kwargs)(ihc_tiles(2, 64))
    (path,) = (tmp_path / "onnx").glob("*.onnx")
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flip":
        path.write_bytes(good[:-64] + bytes(255 - c for c in good[-64:]))
    else:
        path.with_suffix(".sha256").unlink()
    encoder = Encoder("test_efficientnet", **kwargs)
    assert "is incomplete or corrupt" in caplog.text and path.name in caplog.text
    assert path.read_bytes() == good
    np.testing.assert_array_equal(encoder(ihc_tiles(2, 64)), want)


def test_a_damaged_flow_export_is_rebuilt_and_scores_like_torch(tmp_path, monkeypatch, caplog):
    pytest.importorskip("openvino")
    monkeypatch.setenv("WSI_QC_CACHE", str(tmp_path))
    x = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    flow = Flow(n_blocks=2, hidden=8, epochs=2, min_reference=10).fit(x)
    want = flow.transform(x)
    flow.cpu_runtime = "openvino"
    np.testing.assert_allclose(flow.transform(x), want, rtol=1e-4, atol=1e-4)
    (bin_file,) = (tmp_path / "openvino").glob("*.bin")
    raw = bytearray(bin_file.read_bytes())
    raw[:256] = bytes(255 - c for c in raw[:256])  # same size, flipped bytes
    bin_file.write_bytes(bytes(raw))
    flow._compiled = {}  # a new process
    got = flow.transform(x)
    assert "is incomplete or corrupt" in caplog.text
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_cache_keeps_the_most_recently_used_entries(tmp_path):
    folder = tmp_path / "openvino"
    folder.mkdir()
    for i in range(5):
        (folder / f"k{i}.xml").write_text("x")
        (folder / f"k{i}.sha256").write_text(json.dumps({f"k{i}.xml": "0"}))
        os.utime(folder / f"k{i}.sha256", ns=(i * 10**9, i * 10**9))
    (folder / "old.xml").write_text("an export of an older version, in no entry")
    os.utime(folder / "old.xml", (0, 0))
    cpu_runtime._prune(folder, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["k3.sha256", "k3.xml", "k4.sha256", "k4.xml"]


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
