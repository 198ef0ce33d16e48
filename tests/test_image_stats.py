"""Image statistics: the torch implementation against a float64 numpy/scikit-image reference of the same
definitions, their response to artifacts, and how the encoder appends them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.color import rgb2hed, rgb2hsv
from skimage.data import immunohistochemistry

from wsi_qc.artifacts import make_artifact
from wsi_qc.encoder import Encoder
from wsi_qc.image_stats import (IMAGE_STATS, LOCAL_STATS, image_statistics, local_statistics, pixel_planes,
                                rgb_tensor)

COL = {name: i for i, name in enumerate(IMAGE_STATS)}
FRACTIONS = [COL["dark_fraction"], COL["off_palette_fraction"]]


def statistics(images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return image_statistics(rgb_tensor(images)).numpy()


def block_steps(steps: np.ndarray) -> tuple[float, float]:
    """Mean step across 8-px block edges (columns j -> j + 1 with j % 8 == 7) and elsewhere."""
    edge = np.arange(steps.shape[1]) % 8 == 7
    return steps[:, edge].mean(), steps[:, ~edge].mean()


def reference(tile: np.ndarray) -> np.ndarray:
    """IMAGE_STATS of one uint8 tile in float64, from scipy's Laplacian and scikit-image's HSV and HED."""
    rgb = tile / 255.0
    grey = rgb @ [0.299, 0.587, 0.114]
    lap = np.abs(ndimage.laplace(grey)[1:-1, 1:-1]).ravel()
    across_x, within_x = block_steps(np.abs(np.diff(grey, axis=1)))
    across_y, within_y = block_steps(np.abs(np.diff(grey, axis=0)).T)
    hsv = rgb2hsv(tile)
    sat, value = hsv[..., 1].ravel(), hsv[..., 2].ravel()
    od = -np.log(np.maximum(rgb, 1 / 255)).reshape(-1, 3)
    od_pixel = od.mean(1)
    hed = rgb2hed(tile).reshape(-1, 3) * -np.log(1e-6)  # skimage divides the optical density by -log(1e-6)
    off = (sat > 0.15) & ((rgb[..., 1] >= rgb[..., 0]) | (rgb[..., 1] >= rgb[..., 2])).ravel()
    eps = 1e-6
    return np.array([
        np.log(lap.var() + eps), np.log(np.quantile(lap, 0.5, method="higher") + eps),
        np.log((across_x + across_y + eps) / (within_x + within_y + eps)),
        sat.mean(), sat.std(), value.mean(), value.std(), *od.mean(0), od_pixel.std(),
        np.quantile(od_pixel, 0.99, method="lower"),
        hed[:, 0].mean(), hed[:, 0].std(), hed[:, 1].mean(), hed[:, 1].std(),
        (value < 0.3).mean(), off.mean(),
    ])


def ihc_tiles(n: int = 6, size: int = 224) -> np.ndarray:
    """Crops of skimage's immunohistochemistry image (a real stained section)."""
    image = immunohistochemistry()
    rng = np.random.default_rng(0)
    return np.stack([image[y:y + size, x:x + size] for y, x in rng.integers(0, 512 - size, (n, 2))])


@pytest.mark.parametrize("source", ["example slide", "ihc"])
def test_statistics_match_a_float64_reference(source, tissue_tiles):
    # uint8 0 is left out: there skimage's HED clamps at 1e-6 and the statistics at 1/255
    tiles = np.maximum(tissue_tiles if source == "example slide" else ihc_tiles(), 1)
    got = statistics(tiles)
    want = np.stack([reference(t) for t in tiles])
    assert got.shape == (len(tiles), len(IMAGE_STATS)) and got.dtype == np.float32
    # float32 against float64: 1e-4 relative; a threshold's fraction may move by the few pixels at its boundary
    rest = [i for i in range(len(IMAGE_STATS)) if i not in FRACTIONS]
    np.testing.assert_allclose(got[:, rest], want[:, rest], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[:, FRACTIONS], want[:, FRACTIONS], atol=1e-3)


def local_reference(tile: np.ndarray, grid: int) -> np.ndarray:
    """LOCAL_STATS (len, grid, grid) of one uint8 tile in float64, from scipy's Laplacian (edges replicated) and
    scikit-image's HSV; the tile's side must be a multiple of grid."""
    rgb = tile / 255.0
    lap = ndimage.laplace(rgb @ [0.299, 0.587, 0.114], mode="nearest")
    hsv = rgb2hsv(tile)
    sat, value = hsv[..., 1], hsv[..., 2]
    od = -np.log(np.maximum(rgb, 1 / 255))
    off = (sat > 0.15) & ((rgb[..., 1] >= rgb[..., 0]) | (rgb[..., 1] >= rgb[..., 2]))
    planes = [lap ** 2, sat, value, *od.transpose(2, 0, 1), value < 0.3, off, (value < 0.4) & (sat < 0.4)]
    c = tile.shape[0] // grid
    cells = np.stack([np.asarray(p, np.float64).reshape(grid, c, grid, c).mean((1, 3)) for p in planes])
    cells[0] = np.log(cells[0] + 1e-6)
    return cells


@pytest.mark.parametrize("source", ["example slide", "ihc"])
def test_local_statistics_match_a_float64_reference(source, tissue_tiles):
    tiles = tissue_tiles if source == "example slide" else ihc_tiles(4, 96)
    with torch.inference_mode():
        got = local_statistics(rgb_tensor(tiles), 4).numpy()
    want = np.stack([local_reference(t, 4) for t in tiles])
    assert got.shape == (len(tiles), len(LOCAL_STATS), 4, 4) and got.dtype == np.float32
    fractions = [LOCAL_STATS.index(n) for n in ("dark_fraction", "off_palette_fraction", "dark_neutral_fraction")]
    rest = [i for i in range(len(LOCAL_STATS)) if i not in fractions]
    np.testing.assert_allclose(got[:, rest], want[:, rest], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[:, fractions], want[:, fractions], atol=4e-3)  # a pixel or two of 576 may flip


def test_statistics_respond_to_their_artifacts(tissue_tiles):
    stats = statistics(tissue_tiles)
    rng = np.random.default_rng(0)
    blurred = np.stack([ndimage.gaussian_filter(t, sigma=(3, 3, 0)) for t in tissue_tiles])
    jpeg = np.stack([make_artifact(t, "jpeg", 3, rng) for t in tissue_tiles])
    pen = np.stack([make_artifact(t, "pen", 3, rng) for t in tissue_tiles])
    assert (statistics(blurred)[:, COL["log_laplacian_var"]] < stats[:, COL["log_laplacian_var"]] - 1).all()
    assert (statistics(jpeg)[:, COL["jpeg_blockiness"]] > stats[:, COL["jpeg_blockiness"]]).all()
    assert (statistics(pen)[:, COL["off_palette_fraction"]] > stats[:, COL["off_palette_fraction"]]).all()


def test_statistics_leave_their_input_alone():
    rgb = rgb_tensor(ihc_tiles(1, 64))  # one tile: the per-channel copy must still be a copy
    before = rgb.clone()
    image_statistics(rgb)
    local_statistics(rgb, 4)
    assert torch.equal(rgb, before)


def test_statistics_from_shared_pixel_planes_equal_their_own(tissue_tiles):
    rgb = rgb_tensor(tissue_tiles)
    with torch.inference_mode():
        pixels = pixel_planes(rgb)
        tile, local = image_statistics(rgb, pixels), local_statistics(rgb, 4, pixels)
        assert torch.equal(tile, image_statistics(rgb)) and torch.equal(local, local_statistics(rgb, 4))
        assert torch.equal(local_statistics(rgb, 4, pixels), local)  # the shared planes are left as they were


def test_local_encoder_appends_position_and_tile_statistics(tissue_tiles):
    encoder = Encoder("test_efficientnet", levels=[0, 1], grid=4, device="cpu", image_stats=True)
    features = encoder(tissue_tiles)
    assert features.shape == (len(tissue_tiles), 4, 4, encoder.network_dim + len(LOCAL_STATS) + len(IMAGE_STATS))
    local = features[..., encoder.network_dim:encoder.network_dim + len(LOCAL_STATS)]
    with torch.inference_mode():
        want_local = local_statistics(rgb_tensor(tissue_tiles), 4).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(local, want_local)
    tile_stats = statistics(tissue_tiles)[:, None, None]
    want_tile = np.broadcast_to(tile_stats, local.shape[:3] + tile_stats.shape[-1:])
    np.testing.assert_array_equal(features[..., -len(IMAGE_STATS):], want_tile)


def test_dark_neutral_fraction_matches_its_definition_and_sees_debris(tissue_tiles):
    col = LOCAL_STATS.index("dark_neutral_fraction")
    rng = np.random.default_rng(0)
    debris = np.stack([make_artifact(t, "debris", 3, rng) for t in tissue_tiles])  # dark specks and fibres
    with torch.inference_mode():
        clean = local_statistics(rgb_tensor(tissue_tiles), 4)[:, col].numpy()
        got = local_statistics(rgb_tensor(debris), 4)[:, col].numpy()
    hsv = rgb2hsv(debris)
    dark = (hsv[..., 2] < 0.4) & (hsv[..., 1] < 0.4)
    want = dark.reshape(len(debris), 4, 24, 4, 24).mean((2, 4))  # 96 px tiles, 4 x 4 cells of 24 px
    np.testing.assert_allclose(got, want, atol=4e-3)  # a pixel or two of 576 at a threshold may flip (float32)
    assert clean.max() < 0.01  # stained tissue is dark only where it is saturated
    assert (got.max((1, 2)) > 0.05).all() and (got.sum((1, 2)) > 5 * clean.sum((1, 2))).all()
