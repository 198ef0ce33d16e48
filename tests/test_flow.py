"""Tests of wsi_qc.flow: a real FrEIA flow fitted on small synthetic feature sets."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from wsi_qc import __version__
from wsi_qc.errors import ConfigError, NotFittedError
from wsi_qc.flow import FORMAT_VERSION, Flow, held_out
from wsi_qc.rl2 import tile_rl2

SMALL = dict(n_blocks=2, hidden=64, epochs=5, min_reference=10)


def lowrank_features(n: int, rng: np.random.Generator, d: int = 1280, rank: int = 32) -> np.ndarray:
    """Features like pooled CNN outputs: a few strong correlated factors plus noise, offset and scaled."""
    basis = np.random.default_rng(123).standard_normal((d, rank)) / np.sqrt(rank)
    return (rng.standard_normal((n, rank)) @ basis.T + 0.3 * rng.standard_normal((n, d)) + 2.0).astype(np.float32)


def auc(good: np.ndarray, bad: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small flows train ~10x faster on one thread than on two shared cores (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    ref, good = lowrank_features(300, rng), lowrank_features(300, rng)
    shifted = lowrank_features(300, rng) + 0.5 * ref.std(0)  # half a reference std in every feature
    return ref, good, shifted


@pytest.fixture(scope="module")
def fitted(sets):
    return Flow(n_blocks=3, hidden=64, epochs=15, patience=5).fit(sets[0])


def test_few_hundred_tiles_give_useful_scores(sets, fitted):
    ref, good, shifted = sets
    s_ref = tile_rl2(fitted.transform(ref), fitted.mu_)
    s_good = tile_rl2(fitted.transform(good), fitted.mu_)
    s_shift = tile_rl2(fitted.transform(shifted), fitted.mu_)
    print(f"rl2 mean: reference {s_ref.mean():.3f}, held-out good {s_good.mean():.3f}, shifted {s_shift.mean():.3f}; "
          f"AUC rl2 {auc(s_good, s_shift):.3f}, nll {auc(fitted.nll(good), fitted.nll(shifted)):.3f}")
    assert s_good.mean() <= 1.5 * s_ref.mean()
    assert auc(s_good, s_shift) > 0.9
    assert auc(fitted.nll(good), fitted.nll(shifted)) > 0.9


def test_fitted_attributes(sets, fitted):
    ref = sets[0]
    n_train = 300 - 60  # val_fraction 0.2
    assert fitted.latent_dim_ == n_train // 2  # automatic PCA rule: min(D, N_train // 2)
    assert fitted.pca_.shape == (n_train // 2, 1280) and fitted.pca_std_.shape == (n_train // 2,)
    np.testing.assert_allclose(fitted.pca_ @ fitted.pca_.T, np.eye(n_train // 2), atol=1e-4)
    assert fitted.mean_.shape == fitted.scale_.shape == (1280,) and (fitted.scale_ > 0).all()
    z = fitted.transform(ref)
    assert z.dtype == np.float32 and z.shape == (300, 120)
    assert fitted.mu_.shape == (120,) and np.abs(fitted.mu_).max() < 0.5  # latent of the reference ~ N(0, I)
    hist = fitted.history_
    assert 1 <= len(hist["val"]) == len(hist["train"]) <= 15
    assert hist["val"][hist["best_epoch"]] == min(hist["val"])
    nll = fitted.nll(ref[:5])
    assert nll.shape == (5,) and nll.dtype == np.float32


def test_pca_rule():
    rng = np.random.default_rng(1)
    x = lowrank_features(100, rng, d=16, rank=4)
    assert Flow(**SMALL).fit(x).pca_ is None  # 80 training tiles >= 2 x 16 dims: no PCA
    assert Flow(**SMALL, pca_dim=16).fit(x).latent_dim_ == 16
    flow = Flow(**SMALL, pca_dim=5).fit(x)
    assert flow.latent_dim_ == 5 and flow.transform(x).shape == (100, 5)
    assert Flow(**SMALL).fit(lowrank_features(60, rng, d=64, rank=4)).latent_dim_ == 24  # 48 // 2


def test_gaussian_reference_nll_is_standard_normal_entropy():
    """On standard-normal features the fitted flow stays ~identity: NLL/dim ~ 0.5 + 0.5 log(2 pi)."""
    x = np.random.default_rng(2).standard_normal((2000, 8)).astype(np.float32)
    flow = Flow(n_blocks=2, hidden=32, epochs=10, patience=3).fit(x)
    expected = 0.5 + 0.5 * math.log(2 * math.pi)
    assert flow.nll(x).mean() == pytest.approx(expected, abs=0.03)
    assert tile_rl2(flow.transform(x), flow.mu_).mean() == pytest.approx(1.0, abs=0.05)


def test_flow_learns_a_curved_density():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(3000)
    x = np.stack([a, a ** 2 + 0.1 * rng.standard_normal(3000)], 1).astype(np.float32)
    flow = Flow(n_blocks=4, hidden=64, epochs=60, patience=10, lr=3e-3).fit(x)
    # the identity start scores ~1.42 (standard-normal entropy per dim); the thin parabola is far more likely
    assert min(flow.history_["val"]) < 0.6
    off_curve = x.copy()
    off_curve[:, 1] = x[:, 1] + 1.5
    assert auc(flow.nll(x[:500]), flow.nll(off_curve[:500])) > 0.95


def test_log_det_matches_the_jacobian():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 6)).astype(np.float32) * [1, 2, 3, 1, 1, 1] + 1
    flow = Flow(n_blocks=3, hidden=32, epochs=8, patience=3, min_reference=10).fit(x)
    u = flow._prepare(x[:3], torch.device("cpu")).double()
    inn = flow.inn_.double()
    z, log_jac = inn(u)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: inn(v[None])[0][0], u[i])
        assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(log_jac[i].item(), abs=1e-6)
    back, _ = inn(z, rev=True)
    torch.testing.assert_close(back, u, atol=1e-5, rtol=1e-5)  # the float32 rotations are orthogonal to ~1e-7
    inn.float()
    d = z.shape[1]
    manual = 0.5 * (z ** 2).sum(1) / d + 0.5 * math.log(2 * math.pi) - log_jac / d
    np.testing.assert_allclose(flow.nll(x[:3]), manual.detach().numpy(), rtol=1e-4)


def test_flow_blocks_compute_what_freias_block_computes_bitwise():
    import FrEIA.modules as Fm

    x = np.random.default_rng(5).standard_normal((3000, 40)).astype(np.float32) * 2 + 1
    flow = Flow(n_blocks=3, hidden=32, epochs=4, patience=3, min_reference=10).fit(x)
    u = flow._prepare(x, torch.device("cpu"))
    with torch.inference_mode():
        ours = flow.inn_(u)
        back = flow.inn_(ours[0], rev=True)
        for block in flow.inn_.module_list:  # the same weights in FrEIA's own block
            block.__class__ = Fm.AllInOneBlock
        theirs = flow.inn_(u)
        their_back = flow.inn_(theirs[0], rev=True)
    for a, b in zip(ours + back, theirs + their_back):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_openvino_scoring_matches_the_fitted_flow(tmp_path, monkeypatch, threads):
    monkeypatch.setenv("WSI_QC_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((3000, 40)) @ rng.standard_normal((40, 40))).astype(np.float32) + 1
    flow = Flow(n_blocks=3, hidden=32, epochs=6, patience=3, min_reference=10).fit(x)
    block = flow.inn_.module_list[0]
    assert block.global_offset.abs().max() > 1e-3  # fitted scales and offsets, folded into the rotations
    z, log_jac = flow.latent_and_log_jac(x)
    flow.save(tmp_path / "flow", {})
    loaded, _ = Flow.load(tmp_path / "flow", cpu_runtime="openvino")
    torch.set_num_threads(threads)
    try:
        got_z, got_jac = loaded.latent_and_log_jac(x)
        np.testing.assert_allclose(got_z, z, atol=2e-5)
        np.testing.assert_allclose(got_jac, log_jac, atol=2e-5 * np.abs(log_jac).max())
        np.testing.assert_allclose(tile_rl2(got_z, loaded.mu_), tile_rl2(z, flow.mu_), rtol=1e-5)
        cached = sorted(p.name for p in (tmp_path / "cache" / "openvino").iterdir())
        assert [p.rsplit(".", 1)[1] for p in cached] == ["bin", "sha256", "xml"]  # converted once, kept by content
        again, _ = Flow.load(tmp_path / "flow", cpu_runtime="openvino")
        np.testing.assert_array_equal(again.transform(x), got_z)  # read back from the cache
        np.testing.assert_array_equal(again.transform(x[5:12]), got_z[5:12])  # rows do not depend on the batch
        assert sorted(p.name for p in (tmp_path / "cache" / "openvino").iterdir()) == cached
        other = x[:, ::-1] * 2  # a refit scores with its own weights, not the last compiled ones
        loaded.fit(other)
        flow.fit(other)
        np.testing.assert_allclose(loaded.transform(other), flow.transform(other), atol=2e-5)
    finally:
        torch.set_num_threads(1)


def test_unknown_cpu_runtime_is_refused():
    with pytest.raises(ConfigError, match="onnx.*torch, openvino"):
        Flow(cpu_runtime="onnx")


def test_held_out_rows_are_whole_groups_and_one_group_is_always_kept():
    groups = np.repeat(np.array(["s0", "s1", "s2", "s3", "s4"]), 10)
    held = held_out(groups, 0.4, np.random.default_rng(0))
    assert held.sum() == 20 and all(len(set(held[groups == g])) == 1 for g in np.unique(groups))
    assert np.array_equal(held, held_out(groups, 0.4, np.random.default_rng(0)))  # seeded
    assert not held_out(np.zeros(10), 0.9, np.random.default_rng(0)).any()  # a single group is never held out


def test_same_seed_same_scores_other_seed_other_scores():
    x = lowrank_features(120, np.random.default_rng(5), d=32, rank=4)
    a = Flow(**SMALL, seed=7).fit(x).transform(x)
    b = Flow(**SMALL, seed=7).fit(x).transform(x)
    c = Flow(**SMALL, seed=8).fit(x).transform(x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_fit_leaves_global_random_state_alone():
    np.random.seed(11)
    torch.manual_seed(11)
    expect_np, expect_torch = np.random.rand(), torch.rand(1).item()
    np.random.seed(11)
    torch.manual_seed(11)
    Flow(**SMALL).fit(lowrank_features(60, np.random.default_rng(6), d=8, rank=2))
    assert np.random.rand() == expect_np and torch.rand(1).item() == expect_torch


def test_reference_validation():
    with pytest.raises(ConfigError, match="the reference holds no tiles"):
        Flow().fit(np.zeros((0, 16), np.float32))
    with pytest.raises(ConfigError, match="got 12 reference tiles; the flow needs at least 50, add reference "
                                          "tiles or lower flow.min_reference"):
        Flow().fit(np.ones((12, 16), np.float32))
    x = lowrank_features(80, np.random.default_rng(7), d=16, rank=4)
    x[[3, 9], 2] = np.nan
    x[20, 5] = np.inf
    with pytest.raises(ConfigError, match="3 of 80 reference rows hold NaN or inf"):
        Flow(**SMALL).fit(x)
    with pytest.raises(ConfigError, match="2-d array"):
        Flow().fit(np.zeros(100, np.float32))
    with pytest.raises(ConfigError, match="pca_dim=1"):
        Flow(pca_dim=1).fit(lowrank_features(80, np.random.default_rng(7), d=16))
    with pytest.raises(ConfigError, match="val_fraction=1"):
        Flow(val_fraction=1.0).fit(lowrank_features(80, np.random.default_rng(7), d=16))


def test_transform_validation(fitted):
    with pytest.raises(NotFittedError, match=r"call \.fit\(reference_features\) or Flow\.load"):
        Flow().transform(np.zeros((3, 4), np.float32))
    with pytest.raises(ConfigError, match=r"shape \(3, 512\).*fitted on 1280-d features"):
        fitted.transform(np.zeros((3, 512), np.float32))
    x = np.zeros((4, 1280), np.float32)
    x[1, 0] = np.nan
    with pytest.raises(ConfigError, match="1 of 4 feature rows hold NaN or inf"):
        fitted.nll(x)
    assert fitted.transform(np.zeros((0, 1280), np.float32)).shape == (0, 120)


def test_save_load_roundtrip(tmp_path, sets, fitted):
    ref = sets[0]
    meta = {"encoder": {"name": "tf_efficientnet_lite0", "pooling": "avg"}, "tiles": {"mpp": 0.5, "size": 224}}
    fitted.save(tmp_path / "scorer", meta)
    weights, meta_file = tmp_path / "scorer" / "flow.safetensors", tmp_path / "scorer" / "meta.json"
    written = json.loads(meta_file.read_text())
    body = json.dumps({k: v for k, v in written.items() if k != "fingerprint"}, sort_keys=True).encode()
    assert written["fingerprint"] == hashlib.sha256(weights.read_bytes() + body).hexdigest()  # weights + meta
    assert written["encoder"] == meta["encoder"] and written["wsi_qc_version"] == __version__
    assert written["format_version"] == FORMAT_VERSION
    assert (written["feature_dim"], written["latent_dim"]) == (1280, 120)
    assert written["flow"]["n_blocks"] == 3 and written["flow"]["pca_dim"] is None

    flow, loaded_meta = Flow.load(tmp_path / "scorer")
    assert loaded_meta == written
    np.testing.assert_array_equal(flow.transform(ref), fitted.transform(ref))
    np.testing.assert_array_equal(flow.nll(ref), fitted.nll(ref))
    np.testing.assert_array_equal(flow.mu_, fitted.mu_)
    assert flow.history_ == fitted.history_ and flow.params() == fitted.params()

    fitted.save(tmp_path / "again", meta)  # same flow, same bytes, same fingerprint
    assert json.loads((tmp_path / "again" / "meta.json").read_text())["fingerprint"] == written["fingerprint"]


def test_load_refusals(tmp_path, fitted):
    path = tmp_path / "scorer"
    fitted.save(path, {"encoder": {"name": "tf_efficientnet_lite0"}})
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere'} does not exist"):
        Flow.load(tmp_path / "nowhere")

    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta | {"format_version": 99, "wsi_qc_version": "9.0.0"}))
    with pytest.raises(ConfigError, match=f"flow format 99 \\(written by wsi-qc 9.0.0\\) but wsi-qc {__version__} "
                                          f"reads format {FORMAT_VERSION}; refit with wsi-qc fit-reference"):
        Flow.load(path)
    (path / "meta.json").write_text(json.dumps(meta))

    data = bytearray((path / "flow.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "flow.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="flow.safetensors or meta.json was changed or mixed"):
        Flow.load(path)
    (path / "flow.safetensors").unlink()
    with pytest.raises(ConfigError, match="flow.safetensors is missing"):
        Flow.load(path)
    with pytest.raises(NotFittedError, match="before .save"):
        Flow().save(tmp_path / "unfitted", {})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_matches_cpu_quality(tmp_path, sets):
    ref, good, shifted = sets
    flow = Flow(n_blocks=3, hidden=64, epochs=15, patience=5, device="cuda").fit(ref)
    assert next(flow.inn_.parameters()).is_cuda
    s_good, s_shift = (tile_rl2(flow.transform(x), flow.mu_) for x in (good, shifted))
    assert auc(s_good, s_shift) > 0.9
    flow.save(tmp_path / "gpu", {})
    cpu_flow, _ = Flow.load(tmp_path / "gpu")
    np.testing.assert_allclose(cpu_flow.transform(good), flow.transform(good), atol=1e-3)
