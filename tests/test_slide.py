"""Slide: opening through OpenSlide, tifffile and PIL; mpp; reads at any mpp; bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from wsi_qc import slide as slide_mod
from wsi_qc.data import write_example_slide
from wsi_qc.errors import ConfigError, SlideError
from wsi_qc.slide import Slide

NO_MPP = "has no mpp in its metadata; pass --mpp or set slide.mpp_fallback"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example_slide(tmp_path_factory.mktemp("slide") / "example.tif", size=(2048, 2048), mpp=0.25, seed=0)


@pytest.fixture(scope="module")
def pixels():
    """A (600, 800, 3) uint8 image with structure (gradients and squares)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:600, 0:800]
    img = np.stack([xx * 255 // 799, yy * 255 // 599, (xx + yy) % 256], axis=-1).astype(np.uint8)
    img[100:200, 300:400] = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    return img


def _osr_rgb(path, location, level, size):
    with openslide.OpenSlide(str(path)) as osr:
        return np.asarray(osr.read_region(location, level, size).convert("RGB"))


# --- OpenSlide backend on a generated pyramid ----------------------------------------------------------------


def test_example_opens_with_openslide(example):
    with Slide(example) as s:
        assert s.backend == "openslide"
        assert s.id == "example"
        assert s.mpp == pytest.approx(0.25)
        assert s.dimensions == (2048, 2048)
        assert s.level_count == 4
        assert s.level_dimensions == [(2048, 2048), (1024, 1024), (512, 512), (256, 256)]
        assert s.level_downsamples == pytest.approx([1, 2, 4, 8])


def test_read_at_a_pyramid_step_is_that_step(example):
    with Slide(example) as s:
        r0 = s.read_region((600, 700), (256, 128), 0.25)
        r2 = s.read_region((600, 700), (100, 60), 1.0)
        near = s.read_region((600, 700), (256, 128), 0.2490)  # within 1 %: level 0, no resampling
    assert r0.shape == (128, 256, 3) and r0.dtype == np.uint8
    assert np.array_equal(r0, _osr_rgb(example, (600, 700), 0, (256, 128)))
    assert np.array_equal(r2, _osr_rgb(example, (600, 700), 2, (100, 60)))
    assert np.array_equal(near, r0)


def test_read_between_steps_resamples_the_finer_step(example):
    with Slide(example) as s:
        r = s.read_region((512, 512), (200, 200), 0.5 * 1.5)  # level 1 (0.5 mpp) shrunk by 1.5
    assert r.shape == (200, 200, 3)
    l1 = Image.fromarray(_osr_rgb(example, (512, 512), 1, (300, 300)))
    expected = np.asarray(l1.resize((200, 200), Image.Resampling.BOX)).astype(int)
    assert np.abs(r.astype(int) - expected).mean() < 1.0


def test_thumbnail_and_white_outside(example):
    with Slide(example) as s:
        th = s.thumbnail(8.0)
        edge = s.read_region((-400, -400), (300, 300), 1.0)
        inside = s.read_region((0, 0), (200, 200), 1.0)
    assert th.shape == (64, 64, 3)
    assert (edge[:100] == 255).all() and (edge[:, :100] == 255).all()  # left of and above the slide
    assert np.array_equal(edge[100:, 100:], inside)
    assert (inside == 255).all(-1).mean() < 0.01  # glass, not padding


def test_banded_reads_match_one_read(example, monkeypatch):
    with Slide(example) as s:
        one = s.thumbnail(3.0)
        monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", 5000)
        banded = s.thumbnail(3.0)
    assert one.shape == banded.shape == (171, 171, 3)
    assert np.abs(one.astype(int) - banded.astype(int)).max() <= 2


def test_mpp_override_and_fallback(example):
    with Slide(example, mpp=0.5) as s:
        assert s.mpp == 0.5
    with Slide(example, mpp_fallback=2.0) as s:
        assert s.mpp == pytest.approx(0.25)  # metadata wins over the fallback


def test_upsampling_is_refused(example):
    with Slide(example) as s, pytest.raises(ConfigError) as err:
        s.read_region((0, 0), (64, 64), 0.2)
    msg = str(err.value)
    assert "example" in msg and "0.2" in msg and "0.25" in msg and "mpp >=" in msg


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "abc"])
def test_non_positive_mpp_is_refused(example, bad):
    with pytest.raises(ConfigError, match="mpp="):
        Slide(example, mpp=bad)
    with pytest.raises(ConfigError, match="mpp_fallback="):
        Slide(example, mpp_fallback=bad)
    with Slide(example) as s, pytest.raises(ConfigError, match="mpp="):
        s.read_region((0, 0), (8, 8), bad)


def test_closed_slide_refuses_reads(example):
    with Slide(example) as s:
        pass
    with pytest.raises(SlideError, match="closed"):
        s.read_region((0, 0), (8, 8), 1.0)
    s.close()  # twice is fine


def test_sha256_head(example):
    with Slide(example) as s:
        head = s.sha256_head()
    data = example.read_bytes()
    assert head == f"sha256:{hashlib.sha256(data[: 1 << 20]).hexdigest()}:{len(data)}"


# --- tifffile backend ---------------------------------------------------------------------------------------


def test_plain_uncompressed_tiff_is_memory_mapped(tmp_path, pixels):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    assert openslide.OpenSlide.detect_format(str(path)) is None
    with Slide(path) as s:
        assert s.backend == "tifffile"
        assert s.mpp == pytest.approx(0.5)
        assert s.dimensions == (800, 600)
        assert isinstance(s._reader._arrays[0], np.memmap)  # nothing read into memory up front
        assert np.array_equal(s.read_region((250, 80), (200, 150), 0.5), pixels[80:230, 250:450])
        right = s.read_region((700, 500), (200, 200), 0.5)
    assert np.array_equal(right[:100, :100], pixels[500:, 700:])
    assert (right[100:] == 255).all() and (right[:, 100:] == 255).all()


def test_compressed_strip_tiff_reads_through_zarr(tmp_path, pixels):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", compression="zlib", rowsperstrip=64,
                     resolution=(50800, 50800), resolutionunit="INCH")
    with Slide(path) as s:
        assert s.backend == "tifffile"
        assert s.mpp == pytest.approx(0.5)
        assert not isinstance(s._reader._arrays[0], np.ndarray)  # read strip by strip
        assert np.array_equal(s.read_region((10, 90), (300, 200), 0.5), pixels[90:290, 10:310])
        half = s.read_region((0, 0), (400, 300), 1.0)
    expected = pixels.reshape(300, 2, 400, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - expected).max() <= 1


def test_ome_tiff_with_subifd_pyramid(tmp_path, pixels):
    path = tmp_path / "pyramid.ome.tif"
    big = np.tile(pixels, (2, 2, 1))  # (1200, 1600, 3)
    steps = [big, big[::2, ::2], big[::4, ::4]]
    with tifffile.TiffWriter(path, ome=True) as tw:
        opts = {"photometric": "rgb", "tile": (256, 256), "compression": "zlib"}
        tw.write(steps[0], subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, **opts)
        for step in steps[1:]:
            tw.write(step, subfiletype=1, **opts)
    with Slide(path) as s:
        assert s.backend == "tifffile"  # OpenSlide would see one step only
        assert s.mpp == pytest.approx(0.5)
        assert s.level_dimensions == [(1600, 1200), (800, 600), (400, 300)]
        assert np.array_equal(s.read_region((400, 200), (128, 64), 1.0), steps[1][100:164, 200:328])
        assert np.array_equal(s.read_region((400, 200), (64, 32), 2.0), steps[2][50:82, 100:164])


def test_grey_16bit_tiff_becomes_rgb(tmp_path):
    grey = (np.arange(256 * 300, dtype=np.uint32).reshape(256, 300) % 65536).astype(np.uint16)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey)
    with Slide(path, mpp=1.0) as s:
        r = s.read_region((0, 0), (300, 256), 1.0)
    assert r.shape == (256, 300, 3)
    assert np.array_equal(r[..., 0], (grey >> 8).astype(np.uint8)) and np.array_equal(r[..., 0], r[..., 2])


# --- PIL and arrays -----------------------------------------------------------------------------------------


def test_png_opens_through_pil(tmp_path, pixels):
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path, dpi=(50800, 50800))  # 0.5 µm per pixel
    with Slide(path) as s:
        assert s.backend == "pil"
        assert s.mpp == pytest.approx(0.5, rel=1e-3)
        assert np.array_equal(s.read_region((5, 6), (70, 80), 0.5), pixels[6:86, 5:75])


def test_from_array(pixels):
    s = Slide.from_array(pixels, mpp=0.5, name="tile-set")
    assert (s.id, s.backend, s.path, s.dimensions, s.level_count) == ("tile-set", "array", None, (800, 600), 1)
    assert np.array_equal(s.read_region((0, 0), (800, 600), 0.5), pixels)
    half = s.read_region((100, 100), (50, 50), 1.0).astype(float)
    assert np.abs(half - pixels[100:200, 100:200].reshape(50, 2, 50, 2, 3).mean(axis=(1, 3))).max() <= 1
    head = s.sha256_head()
    assert head == f"sha256:{hashlib.sha256(pixels.tobytes()[: 1 << 20]).hexdigest()}:{pixels.nbytes}"
    assert Slide.from_array(255 - pixels, mpp=0.5).sha256_head() != head
    with pytest.raises(ConfigError, match="uint8"):
        Slide.from_array(pixels.astype(np.float32), mpp=0.5)
    with pytest.raises(ConfigError, match="mpp"):
        Slide.from_array(pixels, mpp=0)


# --- bad input ----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(SlideError, match="nowhere.svs does not exist"):
        Slide(tmp_path / "nowhere.svs")


def test_directory(tmp_path):
    with pytest.raises(SlideError, match="is a directory; pass a slide file"):
        Slide(tmp_path)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.svs").touch()
    with pytest.raises(SlideError, match=r"empty.svs is empty \(0 bytes\)"):
        Slide(tmp_path / "empty.svs")


def test_random_bytes(tmp_path):
    path = tmp_path / "broken.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    with pytest.raises(SlideError, match="broken.svs cannot be read as a slide .* damaged"):
        Slide(path)


def test_unsupported_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a slide\n")
    with pytest.raises(SlideError, match=r"notes.txt is not a slide format .*'\.txt'.* SVS, NDPI"):
        Slide(path)


def huge_header_tiff(path):
    """A ~500-byte tiled TIFF whose tags claim 1,000,000 x 1,000,000 px (a corrupt header)."""
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(256, 256), compression="zlib",
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(1_000_000)
        tif.pages[0].tags["ImageLength"].overwrite(1_000_000)
    return path


def test_header_claiming_more_pixels_than_the_file_can_hold_is_refused(tmp_path):
    path = huge_header_tiff(tmp_path / "huge.tif")
    assert path.stat().st_size < 2000
    with pytest.raises(SlideError, match=r"huge.tif claims 1000000 x 1000000 pixels in \d+ bytes.*header is corrupt"):
        Slide(path)


def test_one_huge_compressed_strip_is_refused_before_it_is_decoded(tmp_path):
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), compression="zlib", rowsperstrip=64,
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(40_000)  # 4.8 GB if decoded
        tif.pages[0].tags["ImageLength"].overwrite(40_000)
    with pytest.raises(SlideError, match=r"strip.tif (holds .* in one compressed chunk|claims 40000 x 40000)"):
        Slide(path)


def test_reads_larger_than_the_bound_are_refused(example, monkeypatch):
    monkeypatch.setattr(slide_mod, "MAX_OUTPUT_PIXELS", 100 * 100)
    with Slide(example) as s:
        assert s.thumbnail(8.0).shape == (64, 64, 3)
        with pytest.raises(SlideError, match=r"a read of 128 x 128 px at 4 mpp would take .* GiB"):
            s.thumbnail(4.0)


def test_links_that_lead_nowhere_say_so(tmp_path):
    (tmp_path / "dangling.svs").symlink_to(tmp_path / "gone.svs")
    (tmp_path / "loop.svs").symlink_to(tmp_path / "loop.svs")
    with pytest.raises(SlideError, match="dangling.svs is a link to .*gone.svs, which is missing"):
        Slide(tmp_path / "dangling.svs")
    with pytest.raises(SlideError, match="loop.svs is a loop of symbolic links"):
        Slide(tmp_path / "loop.svs")


def test_unreadable_file_says_permission_denied(example, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(slide_mod, "open", denied, raising=False)  # root reads any file: fake the refusal
    with pytest.raises(SlideError, match="example.tif: permission denied"):
        Slide(example)


def test_no_mpp_is_refused_unless_given(tmp_path, pixels):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, pixels, photometric="rgb")
    with pytest.raises(SlideError, match=f"nompp.tif {NO_MPP}"):
        Slide(path)
    with Slide(path, mpp_fallback=0.7) as s:
        assert s.mpp == 0.7


def test_screen_default_resolution_is_not_an_mpp(tmp_path, pixels):
    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(SlideError, match="352.8 µm/px"):
        Slide(path)
    with Slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5


# --- real slides --------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_cmu_svs(slides_dir):
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        assert s.backend == "openslide"
        assert s.mpp == pytest.approx(0.499)
        assert s.dimensions == (2220, 2967)
        tile = s.read_region((1000, 1000), (224, 224), 0.5)  # within 1 % of 0.499: read as is
        assert tile.shape == (224, 224, 3) and tile.std() > 10
        assert s.sha256_head().endswith(":1938955")


@pytest.mark.realdata
def test_real_tcga_without_mpp(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(SlideError, match=f"tcga-cr-7395-01a-01-ts1.svs {NO_MPP}"):
        Slide(path)
    with Slide(path, mpp=1.0) as s:
        assert s.mpp == 1.0 and s.level_count == 2
        assert s.thumbnail(8.0).shape == (446, 555, 3)


@pytest.mark.realdata
def test_real_plain_tiff_through_tifffile(slides_dir):
    path = slides_dir / "kidney-48-5.tif"
    with pytest.raises(SlideError, match=f"kidney-48-5.tif {NO_MPP}"):
        Slide(path)
    with Slide(path, mpp_fallback=0.5) as s:
        assert s.backend == "tifffile"
        assert s.dimensions == (1493, 901)
        tissue = s.read_region((280, 490), (130, 80), 0.5)
        half = s.read_region((280, 490), (65, 40), 1.0)
    assert np.array_equal(tissue, tifffile.imread(path)[490:570, 280:410])
    assert tissue.std() > 10  # the tissue piece, not glass
    assert half.shape == (40, 65, 3)
    assert np.abs(half - tissue.reshape(40, 2, 65, 2, 3).mean(axis=(1, 3))).max() <= 1


@pytest.mark.realdata
def test_real_small_he_levels(slides_dir):
    with Slide(slides_dir / "small_HE_levels.tiff", mpp=0.5) as s:
        assert s.level_count == 4
        assert s.level_dimensions == [(300, 250), (150, 125), (75, 62), (37, 31)]
        assert s.read_region((0, 0), (37, 31), 0.5 * s.level_downsamples[3]).shape == (31, 37, 3)


@pytest.mark.realdata
def test_real_broken_svs(slides_dir):
    with pytest.raises(SlideError, match="broken.svs"):
        Slide(slides_dir / "broken.svs")
