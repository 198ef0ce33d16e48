"""Tissue masks: synthetic thumbnails with known tissue, blank slides, errors, and the real CMU slide."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from wsi_qc.errors import ConfigError
from wsi_qc.tissue import METHODS, find_tissue

OURS = ("otsu_saturation", "otsu_od")
PINK = (220, 140, 200)  # H&E-like eosin/haematoxylin mix
PALE = (238, 215, 232)  # faint stain, like the thin tissue of CMU-1-Small-Region


def _disk_thumbnail(color=PINK, size=200, radius=50, center=(100, 100), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """White background with a stained disk and a little scanner noise; returns (image, true mask)."""
    yy, xx = np.mgrid[:size, :size]
    truth = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2
    image = np.full((size, size, 3), 246, dtype=np.float32)
    image[truth] = color
    image += np.random.default_rng(seed).normal(0, 2.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("method", OURS)
def test_finds_stained_disk(method):
    image, truth = _disk_thumbnail(PINK)
    mask = find_tissue(image, mpp=8.0, method=method)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert _iou(mask, truth) > 0.95


def test_pale_tissue_is_found_by_saturation():
    image, truth = _disk_thumbnail(PALE)
    assert _iou(find_tissue(image, 8.0, method="otsu_saturation"), truth) > 0.95


@pytest.mark.parametrize("method", OURS)
@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_blank_thumbnail_gives_empty_mask(method, noise):
    rng = np.random.default_rng(1)
    image = np.clip(250 + rng.normal(0, noise, (120, 160, 3)), 0, 255).astype(np.uint8)
    assert not find_tissue(image, 8.0, method=method).any()


def test_min_area_drops_small_pieces_and_keeps_large():
    image, truth = _disk_thumbnail(radius=40)
    image[5:9, 5:9] = PINK  # 16 px = 1024 µm² at 8 mpp
    mask = find_tissue(image, 8.0, min_area_um2=1e4, closing_um=0)
    assert not mask[5:9, 5:9].any()
    assert _iou(mask, truth) > 0.95
    kept = find_tissue(image, 8.0, min_area_um2=500, closing_um=0)
    assert kept[5:9, 5:9].all()


def test_fill_holes_fills_a_lumen():
    image, truth = _disk_thumbnail(radius=60)
    yy, xx = np.mgrid[:200, :200]
    lumen = (yy - 100) ** 2 + (xx - 100) ** 2 <= 15**2
    image[lumen] = 246
    filled = find_tissue(image, 8.0, fill_holes=True, closing_um=0)
    open_ = find_tissue(image, 8.0, fill_holes=False, closing_um=0)
    assert filled[lumen].all()
    assert not open_[lumen].any()
    assert _iou(open_, truth & ~lumen) > 0.95


def test_closing_joins_pieces_across_a_thin_gap():
    image = np.full((100, 100, 3), 246, dtype=np.uint8)
    image[20:80, 10:49] = PINK
    image[20:80, 51:90] = PINK  # 2 px gap = 16 µm at 8 mpp
    joined = find_tissue(image, 8.0, closing_um=16, fill_holes=False, min_area_um2=0)
    apart = find_tissue(image, 8.0, closing_um=0, fill_holes=False, min_area_um2=0)
    assert joined[20:80, 49:51].all()
    assert not apart[20:80, 49:51].any()
    # the closing does not grow the tissue outwards, also where it touches the border
    assert not joined[:15].any() and not joined[:, :5].any()


def test_closing_keeps_tissue_that_touches_the_border():
    image = np.full((60, 60, 3), 246, dtype=np.uint8)
    image[30:, :] = PINK
    mask = find_tissue(image, 8.0, closing_um=40, min_area_um2=0)
    assert mask[30:].all() and not mask[:28].any()


def test_unknown_method_lists_the_choices():
    image, _ = _disk_thumbnail()
    with pytest.raises(ConfigError) as info:
        find_tissue(image, 8.0, method="otsu_gray")
    assert "otsu_gray" in str(info.value)
    assert all(name in str(info.value) for name in METHODS)


@pytest.mark.parametrize(
    "thumbnail",
    [np.zeros((50, 50), np.uint8), np.zeros((50, 50, 3), np.float32), np.zeros((1, 50, 3), np.uint8)],
)
def test_bad_thumbnail_is_refused(thumbnail):
    with pytest.raises(ConfigError, match="thumbnail"):
        find_tissue(thumbnail, 8.0)


def test_bad_mpp_is_refused():
    image, _ = _disk_thumbnail()
    with pytest.raises(ConfigError, match="mpp"):
        find_tissue(image, 0.0)


def test_rgba_thumbnail_is_accepted():
    image, truth = _disk_thumbnail()
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    assert _iou(find_tissue(rgba, 8.0), truth) > 0.95


@pytest.mark.slow  # importing tiatoolbox takes 10-20 s
@pytest.mark.parametrize("method", ["tiatoolbox_otsu", "tiatoolbox_morphological"])
def test_tiatoolbox_maskers_find_the_disk(method):
    pytest.importorskip("tiatoolbox.tools.tissuemask")
    image, truth = _disk_thumbnail()
    mask = find_tissue(image, 8.0, method=method)
    # the morphological masker dilates by 32 µm (4 px here), so allow a wider rim
    assert _iou(mask, truth) > (0.95 if method == "tiatoolbox_otsu" else 0.75)
    assert mask[truth].mean() > 0.98


@pytest.mark.parametrize("method", ["tiatoolbox_otsu", "tiatoolbox_morphological"])
def test_tiatoolbox_missing_says_how_to_install(method, monkeypatch):
    for name in ("tiatoolbox", "tiatoolbox.tools", "tiatoolbox.tools.tissuemask"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail as if tiatoolbox were absent
    image, _ = _disk_thumbnail()
    with pytest.raises(ConfigError, match=r"pip install --no-deps tiatoolbox==2\.1\.3"):
        find_tissue(image, 8.0, method=method)


@pytest.mark.realdata
def test_cmu_pale_thin_tissue_is_found(slides_dir):
    from wsi_qc.slide import Slide

    with Slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        thumbnail = slide.thumbnail(8.0)
    fractions = {method: float(find_tissue(thumbnail, 8.0, method=method).mean()) for method in OURS}
    print("CMU-1-Small-Region tissue fraction at 8 mpp:", {k: round(v, 3) for k, v in fractions.items()})
    # the tissue band covers about 38 % of this slide (checked on an overlay); HistoQC / CLAM defaults keep 0 %
    assert 0.25 < fractions["otsu_saturation"] < 0.55
    assert 0.25 < fractions["otsu_od"] < 0.55
