"""Degradations (RL2 study) and synthetic artifacts (calibration set) on a real stained image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import laplace
from skimage import data

from wsi_qc.artifacts import (LOCAL_COVER, ARTIFACT_KINDS, DEGRADATION_KINDS, DIFFUSION_T, LEVELS, SEVERITIES, degrade,
                              make_artifact)
from wsi_qc.errors import ConfigError


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    """A 96 px crop of scikit-image's bundled real stained tissue image."""
    return np.ascontiguousarray(data.immunohistochemistry()[100:196, 200:296])


@pytest.fixture(scope="module")
def batch(tile) -> np.ndarray:
    ihc = data.immunohistochemistry()
    return np.stack([tile, ihc[300:396, 50:146], ihc[20:116, 400:496]])


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- degradations -----------------------------------------------------------------------------

def test_levels_increase_from_identity():
    assert set(LEVELS) == {"blur", "noise", "salt_pepper", "rectangles", "diffusion"}
    for kind, levels in LEVELS.items():
        assert len(levels) >= 6, kind
        assert levels[0] == 0, kind
        assert all(b > a for a, b in zip(levels, levels[1:])), kind


@pytest.mark.parametrize("kind", DEGRADATION_KINDS)
def test_degrade_level0_is_identity_copy(batch, kind):
    out = degrade(batch, kind, 0, np.random.default_rng(0))
    assert np.array_equal(out, batch)
    assert out is not batch


@pytest.mark.parametrize("kind", DEGRADATION_KINDS)
def test_degrade_changes_image_keeps_dtype_shape_and_is_seeded(batch, kind):
    for level in LEVELS[kind][1:]:
        out = degrade(batch, kind, level, np.random.default_rng(7))
        assert out.dtype == np.uint8 and out.shape == batch.shape
        for img, src in zip(out, batch):  # every image of the batch is degraded, not just the first
            assert mad(img, src) > 0, (kind, level)
        assert np.array_equal(out, degrade(batch, kind, level, np.random.default_rng(7)))
    assert np.array_equal(batch, degrade(batch, kind, 0, np.random.default_rng(0)))  # input untouched


@pytest.mark.parametrize("kind", ["noise", "salt_pepper", "rectangles", "diffusion"])
def test_degrade_random_kinds_depend_on_seed(batch, kind):
    level = LEVELS[kind][3]
    a = degrade(batch, kind, level, np.random.default_rng(1))
    b = degrade(batch, kind, level, np.random.default_rng(2))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["blur", "noise", "salt_pepper", "diffusion"])
def test_degrade_distance_grows_with_level(batch, kind):
    dist = [mad(degrade(batch, kind, level, np.random.default_rng(0)), batch) for level in LEVELS[kind]]
    assert dist[0] == 0
    assert all(b > a for a, b in zip(dist, dist[1:])), dist


def test_rectangles_cover_more_with_more_rectangles(batch):
    many = np.repeat(batch, 4, axis=0)
    changed = [(degrade(many, "rectangles", n, np.random.default_rng(0)) != many).any(-1).mean()
               for n in (1, 3, 12)]
    assert changed[0] < changed[1] < changed[2], changed
    assert changed[2] < 0.95


def test_noise_and_salt_pepper_have_the_asked_strength():
    grey = np.full((4, 64, 64, 3), 128, np.uint8)
    noisy = degrade(grey, "noise", 20, np.random.default_rng(0)).astype(float)
    assert abs(noisy.std() - 20) < 0.5
    sp = degrade(grey, "salt_pepper", 0.1, np.random.default_rng(0))
    hit = (sp != 128).any(-1)
    assert abs(hit.mean() - 0.1) < 0.01
    assert set(np.unique(sp[hit])) == {0, 255}
    assert (sp[hit].min(-1) == sp[hit].max(-1)).all()  # a hit pixel is black or white in all channels


def test_diffusion_follows_the_ddpm_linear_schedule():
    grey = np.full((4, 64, 64, 3), 128, np.uint8)
    betas = np.linspace(1e-4, 0.02, 1000)
    for t in (10, 100):
        abar = np.prod(1 - betas[:t])
        out = degrade(grey, "diffusion", t, np.random.default_rng(0)).astype(float) / 127.5 - 1
        x0 = 128 / 127.5 - 1
        assert abs(out.mean() - np.sqrt(abar) * x0) < 0.01
        assert abs(out.std() - np.sqrt(1 - abar)) < 0.02 * np.sqrt(1 - abar) + 0.005


def test_diffusion_at_t_max_forgets_the_image(batch):
    out = degrade(batch, "diffusion", DIFFUSION_T, np.random.default_rng(0)).astype(float)
    r = np.corrcoef(out.ravel(), batch.astype(float).ravel())[0, 1]
    assert abs(r) < 0.05


def test_degrade_refuses_bad_input(batch):
    with pytest.raises(ConfigError, match="blur, noise, salt_pepper, rectangles, diffusion"):
        degrade(batch, "jitter", 1, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="uint8"):
        degrade(batch.astype(np.float32), "blur", 1, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"\(B, H, W, 3\)"):
        degrade(batch[0], "blur", 1, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=">= 0"):
        degrade(batch, "noise", -1, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="fraction"):
        degrade(batch, "salt_pepper", 2, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="timestep"):
        degrade(batch, "diffusion", 1001, np.random.default_rng(0))


# --- synthetic artifacts ----------------------------------------------------------------------

def test_artifact_kinds():
    assert set(ARTIFACT_KINDS) == {"blur", "defocus", "pen", "fold", "bubble", "overstain", "understain",
                                   "jpeg", "noise", "debris", "small_bubble", "small_debris", "small_pen"}
    assert SEVERITIES == (1, 2, 3)


@pytest.mark.parametrize("kind", ["small_bubble", "small_debris", "small_pen"])
def test_local_artifacts_cover_5_to_20_percent_of_the_tile(tile, kind):
    for severity, cover in zip(SEVERITIES, LOCAL_COVER):
        out = make_artifact(tile, kind, severity, np.random.default_rng(severity))
        changed = (np.abs(out.astype(int) - tile.astype(int)).max(-1) > 12).mean()
        assert 0.5 * cover < changed < 2.0 * cover, (kind, severity, changed)


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_artifact_changes_tile_keeps_dtype_shape_and_is_seeded(tile, kind):
    before = tile.copy()
    for severity in SEVERITIES:
        out = make_artifact(tile, kind, severity, np.random.default_rng(3))
        assert out.dtype == np.uint8 and out.shape == tile.shape
        assert mad(out, tile) > 0.1, (kind, severity)
        assert np.array_equal(out, make_artifact(tile, kind, severity, np.random.default_rng(3)))
    assert np.array_equal(tile, before)  # the input is never modified in place


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_artifact_severity_increases_the_change(tile, kind):
    """Averaged over seeds (positions are random), each severity changes the tile more than the last."""
    dist = [np.mean([mad(make_artifact(tile, kind, s, np.random.default_rng(seed)), tile) for seed in range(4)])
            for s in SEVERITIES]
    assert dist[0] < dist[1] < dist[2], dist


def test_artifacts_change_the_tile_the_way_they_should(tile):
    rng = np.random.default_rng(0)
    mean = tile.astype(float).mean()
    assert make_artifact(tile, "overstain", 2, rng).mean() < mean - 5  # more dye: darker
    assert make_artifact(tile, "understain", 2, rng).mean() > mean + 5  # less dye: paler
    assert make_artifact(tile, "fold", 2, rng).mean() < mean - 5  # double layer: darker
    assert make_artifact(tile, "bubble", 3, rng).mean() > mean + 5  # air: paler
    assert make_artifact(tile, "debris", 3, rng).mean() < mean  # dark dust
    # blur and defocus keep the mean colour but remove fine detail (Laplacian energy)
    detail = np.abs(laplace(tile.astype(float).mean(-1))).mean()
    for kind in ("blur", "defocus"):
        out = make_artifact(tile, kind, 2, rng)
        assert abs(out.mean() - mean) < 1
        assert np.abs(laplace(out.astype(float).mean(-1))).mean() < 0.5 * detail
    # pen ink tints the strokes: inked pixels are darker, and their colour differs from the tissue's
    out = make_artifact(tile, "pen", 3, rng)
    inked = np.abs(out.astype(int) - tile).sum(-1) > 30
    assert 0.02 < inked.mean() < 0.9
    assert out[inked].mean() < tile[inked].mean()


def test_jpeg_artifact_matches_a_heavy_compression(tile):
    out = make_artifact(tile, "jpeg", 3, np.random.default_rng(0))
    # 8x8 block grid: differences between neighbouring pixels jump at block borders
    grey = out.astype(float).mean(-1)
    jumps = np.abs(np.diff(grey, axis=1)).mean(0)
    at_borders = jumps[7::8].mean()
    inside = np.delete(jumps, np.s_[7::8]).mean()
    assert at_borders > 1.3 * inside


def test_make_artifact_refuses_bad_input(tile):
    with pytest.raises(ConfigError) as err:
        make_artifact(tile, "smudge", 1, np.random.default_rng(0))
    assert "smudge" in str(err.value) and all(k in str(err.value) for k in ARTIFACT_KINDS)
    with pytest.raises(ConfigError, match="severity"):
        make_artifact(tile, "blur", 4, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="severity"):
        make_artifact(tile, "blur", 0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="uint8"):
        make_artifact(tile[None], "blur", 1, np.random.default_rng(0))
