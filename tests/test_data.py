"""write_example_slide: a pyramidal tiled JPEG TIFF that OpenSlide reads with every step and its mpp."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from wsi_qc import data as data_mod
from wsi_qc.data import write_example_slide
from wsi_qc.errors import ConfigError


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example_slide(tmp_path_factory.mktemp("data") / "example.tif", size=(2048, 2048), mpp=0.25, seed=0)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    return (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)


def test_openslide_reads_all_steps_and_mpp(example):
    assert openslide.OpenSlide.detect_format(str(example)) == "generic-tiff"
    with openslide.OpenSlide(str(example)) as osr:
        assert osr.level_count == 4
        assert osr.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512), (256, 256))
        assert osr.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.25, rel=1e-6)


def test_tissue_islands_on_near_white_glass(example):
    with openslide.OpenSlide(str(example)) as osr:
        rgb = np.asarray(osr.read_region((0, 0), 2, osr.level_dimensions[2]).convert("RGB"))
        full = np.asarray(osr.read_region((512, 512), 0, (1024, 1024)).convert("RGB"))
    sat = _saturation(rgb)
    tissue = sat > 0.15
    assert 0.05 < tissue.mean() < 0.6, tissue.mean()  # islands, not a full or empty slide
    glass = rgb[sat < 0.03]
    assert 235 <= np.median(glass) <= 245
    assert 0.5 < glass.std() < 8  # slight noise, not a flat colour
    # real stain texture: dark nuclei and a wide range of intensities inside tissue
    t = full[_saturation(full) > 0.15].astype(np.float32)
    if len(t) > 1000:
        assert t.min() < 120 and t.std() > 15


def test_the_lower_steps_are_downsampled_level0(example):
    with openslide.OpenSlide(str(example)) as osr:
        l0 = np.asarray(osr.read_region((0, 0), 0, (2048, 2048)).convert("RGB")).astype(np.float32)
        l1 = np.asarray(osr.read_region((0, 0), 1, (1024, 1024)).convert("RGB")).astype(np.float32)
    box = l0.reshape(1024, 2, 1024, 2, 3).mean(axis=(1, 3))
    assert np.abs(box - l1).mean() < 3.0  # JPEG twice, else identical


def test_deterministic_for_a_seed(tmp_path, example):
    again = write_example_slide(tmp_path / "again.tif", size=(2048, 2048), mpp=0.25, seed=0)
    other = write_example_slide(tmp_path / "other.tif", size=(2048, 2048), mpp=0.25, seed=1)
    assert again.read_bytes() == example.read_bytes()
    assert other.read_bytes() != example.read_bytes()


def test_blank_slide_has_no_tissue(tmp_path):
    path = write_example_slide(tmp_path / "blank.tif", size=(1024, 768), mpp=0.5, blank=True)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == ((1024, 768), (512, 384))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        rgb = np.asarray(osr.read_region((0, 0), 0, (1024, 768)).convert("RGB")).astype(int)
    assert np.abs(rgb - 240).max() <= 10
    assert _saturation(rgb).max() < 0.1


def test_odd_size_and_steps(tmp_path):
    path = write_example_slide(tmp_path / "odd.tif", size=(1000, 700), mpp=0.5, seed=3)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == ((1000, 700), (500, 350))


def test_without_tiatoolbox_only_the_ihc_image_is_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data_mod.importlib.util, "find_spec", lambda name: None)
    data_mod._stain_images.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="wsi_qc.data"):
            names = [name for name, _ in data_mod._stain_images()]
        assert names == ["ihc"]
        assert "tiatoolbox is not installed" in caplog.text
        path = write_example_slide(tmp_path / "ihc.tif", size=(512, 512), mpp=0.5)
        with openslide.OpenSlide(str(path)) as osr:
            assert osr.level_count == 2
    finally:
        data_mod._stain_images.cache_clear()


def test_packaged_stain_images_are_real():
    images = dict(data_mod._stain_images())
    assert images["ihc"].shape == (512, 512, 3)
    if "he" in images:  # tiatoolbox installed: its stain-normalisation target
        assert images["he"].shape == (1000, 1000, 3)
        assert images["he"].std() > 20


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="too small"):
        write_example_slide(tmp_path / "x.tif", size=(100, 100))
    with pytest.raises(ConfigError, match="mpp"):
        write_example_slide(tmp_path / "x.tif", size=(512, 512), mpp=0)


@pytest.mark.slow
def test_large_slide_writes_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so the child would report the peak of
    # the (large) pytest process that started it; VmHWM belongs to the child's own address space
    code = (
        "from pathlib import Path; from wsi_qc.data import write_example_slide; "
        f"write_example_slide(r'{tmp_path / 'big.tif'}', size=(20000, 20000), mpp=0.25); "
        "print([l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    peak_mb = int(out.stdout.split()[-2]) / 1024  # "VmHWM:  123456 kB"
    assert peak_mb < 500, peak_mb  # a 20k x 20k RGB level 0 alone would be 1.2 GB
    with openslide.OpenSlide(str(tmp_path / "big.tif")) as osr:
        assert osr.dimensions == (20000, 20000)
        assert osr.level_count == 7
