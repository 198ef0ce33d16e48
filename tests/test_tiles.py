"""Tile grids (geometry, area-weighted tissue fractions, errors) and streaming reads of the tiles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wsi_qc.data import write_example_slide
from wsi_qc.errors import ConfigError, SlideError
from wsi_qc.slide import Slide
from wsi_qc.tiles import TileDataset, grid_image, iter_tile_batches, make_tiles
from wsi_qc.tissue import find_tissue


def _white_slide(width: int, height: int, mpp: float = 0.5) -> Slide:
    return Slide.from_array(np.full((height, width, 3), 255, np.uint8), mpp=mpp, name="white")


def _full_mask(slide: Slide, tissue_mpp: float) -> np.ndarray:
    w, h = slide.dimensions
    return np.ones((round(h * slide.mpp / tissue_mpp), round(w * slide.mpp / tissue_mpp)), bool)


@pytest.fixture(scope="module")
def example_slide(tmp_path_factory):
    return write_example_slide(tmp_path_factory.mktemp("slides") / "example.tif", size=(2048, 1536), mpp=0.5, seed=3)


def test_grid_geometry_at_slide_mpp_and_coarser():
    slide = _white_slide(1200, 1000)
    tiles = make_tiles(slide, _full_mask(slide, 5.0), 5.0, mpp=0.5, size=100, min_tissue=0.5)
    assert tiles.grid_shape == (10, 12) and len(tiles) == 120
    assert tiles.coords.dtype == np.int32 and tiles.grid_index.dtype == np.int32
    np.testing.assert_array_equal(tiles.coords, tiles.grid_index[:, ::-1] * 100)
    np.testing.assert_allclose(tiles.tissue_fraction, 1.0, atol=1e-6)

    coarse = make_tiles(slide, _full_mask(slide, 5.0), 5.0, mpp=1.0, size=100)
    assert coarse.grid_shape == (5, 6)  # a 100 px tile at 1 mpp spans 200 level-0 px
    np.testing.assert_array_equal(coarse.coords, coarse.grid_index[:, ::-1] * 200)
    assert (coarse.size, coarse.mpp, coarse.stride) == (100, 1.0, 100)


def test_overlap_sets_the_stride():
    slide = _white_slide(1200, 1000)
    tiles = make_tiles(slide, _full_mask(slide, 5.0), 5.0, mpp=0.5, size=100, overlap=50)
    assert tiles.stride == 50
    assert tiles.grid_shape == (19, 23)  # floor((1000 - 100) / 50) + 1, floor((1200 - 100) / 50) + 1
    assert tiles.coords[:, 0].max() + 100 <= 1200 and tiles.coords[:, 1].max() + 100 <= 1000


def test_hand_made_mask_gives_known_fractions():
    slide = _white_slide(1000, 1000)  # 500 µm; mask at 5 mpp is 100 x 100, a 100 px tile is 10 x 10 mask px
    mask = np.zeros((100, 100), bool)
    mask[0:10, 0:5] = True  # tile (0, 0): left half
    mask[3, 14] = True  # tile (0, 1): one pixel of 100
    mask[10:20, 10:20] = True  # tile (1, 1): full
    mask[40:50, 40:47] = True  # tile (4, 4): 0.7
    tiles = make_tiles(slide, mask, 5.0, mpp=0.5, size=100, min_tissue=0.5)
    found = {tuple(ix): round(float(f), 6) for ix, f in zip(tiles.grid_index, tiles.tissue_fraction)}
    assert found == {(0, 0): 0.5, (1, 1): 1.0, (4, 4): 0.7}

    anything = make_tiles(slide, mask, 5.0, mpp=0.5, size=100, min_tissue=0.0)
    found = {tuple(ix): round(float(f), 6) for ix, f in zip(anything.grid_index, anything.tissue_fraction)}
    assert found == {(0, 0): 0.5, (0, 1): 0.01, (1, 1): 1.0, (4, 4): 0.7}


def test_fraction_is_area_weighted_not_any_pixel():
    slide = _white_slide(2000, 2000)  # 1000 µm; mask at 8 mpp is 125 px; a 100 px tile at 0.5 mpp = 6.25 mask px
    mask = np.zeros((125, 125), bool)
    mask[:, 0:3] = True  # 24 µm of every 50 µm wide first column of tiles
    tiles = make_tiles(slide, mask, 8.0, mpp=0.5, size=100, min_tissue=0.0)
    assert set(tiles.grid_index[:, 1].tolist()) == {0}
    np.testing.assert_allclose(tiles.tissue_fraction, 24 / 50, atol=1e-6)
    assert len(make_tiles(slide, mask, 8.0, mpp=0.5, size=100, min_tissue=0.5)) == 0  # 0.48 < 0.5 everywhere


def test_fractions_match_brute_force_on_a_random_mask():
    slide = _white_slide(1600, 1280)  # mask at 8 mpp: 1 mask px = 16 level-0 px, exactly 80 x 100
    rng = np.random.default_rng(0)
    mask = rng.random((80, 100)) < 0.3
    tiles = make_tiles(slide, mask, 8.0, mpp=0.75, size=60, overlap=12, min_tissue=0.0)
    level0 = np.repeat(np.repeat(mask, 16, axis=0), 16, axis=1)
    side = 90  # 60 px at 0.75 mpp on a 0.5 mpp slide
    expected = np.array([level0[y:y + side, x:x + side].mean() for x, y in tiles.coords])
    np.testing.assert_allclose(tiles.tissue_fraction, expected, atol=1e-5)
    rows, cols = tiles.grid_shape
    assert len(tiles) == rows * cols  # a 30 % random mask touches every tile


def test_grid_image_places_values_and_checks_length():
    slide = _white_slide(1000, 1000)
    mask = np.zeros((100, 100), bool)
    mask[0:10, 0:10] = mask[30:40, 50:60] = True
    tiles = make_tiles(slide, mask, 5.0, mpp=0.5, size=100)
    grid = grid_image(tiles, np.array([1, 2], np.uint8))
    assert grid.dtype == np.uint8 and grid.shape == (10, 10)
    assert grid[0, 0] == 1 and grid[3, 5] == 2 and grid.sum() == 3
    with pytest.raises(ConfigError, match="one value per tile"):
        grid_image(tiles, np.ones(3, np.uint8))


def test_slide_smaller_than_a_tile_names_sizes_in_um():
    slide = _white_slide(100, 300)  # 50 x 150 µm
    with pytest.raises(SlideError) as info:
        make_tiles(slide, _full_mask(slide, 5.0), 5.0, mpp=0.5, size=224)
    message = str(info.value)
    assert "white" in message and "50 x 150 µm" in message and "112 µm" in message


def test_no_tissue_gives_no_tiles_and_a_warning_with_the_fix(caplog):
    slide = _white_slide(1000, 1000)
    tiles = make_tiles(slide, np.zeros((100, 100), bool), 5.0, mpp=0.5, size=100)
    assert len(tiles) == 0 and tiles.coords.shape == (0, 2) and not grid_image(tiles, np.zeros(0, np.uint8)).any()
    assert "white" in caplog.text and "min_tissue" in caplog.text and "tissue.method" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"overlap": 100}, "overlap"),
        ({"overlap": -1}, "overlap"),
        ({"min_tissue": 1.5}, "min_tissue"),
        ({"min_tissue": -0.1}, "min_tissue"),
        ({"size": 0}, "size"),
        ({"mpp": 0.0}, "mpp"),
    ],
)
def test_bad_tile_settings_are_config_errors(kwargs, word):
    slide = _white_slide(1000, 1000)
    args = {"mpp": 0.5, "size": 100, **kwargs}
    with pytest.raises(ConfigError, match=word):
        make_tiles(slide, _full_mask(slide, 5.0), 5.0, **args)


def test_mask_that_does_not_fit_the_slide_is_refused():
    slide = _white_slide(1000, 1000)
    with pytest.raises(ConfigError, match="tissue_mpp"):
        make_tiles(slide, np.ones((50, 50), bool), 5.0, mpp=0.5, size=100)


def test_blank_generated_slide_has_no_tiles(tmp_path):
    path = write_example_slide(tmp_path / "blank.tif", size=(1024, 1024), mpp=0.5, blank=True)
    with Slide(path) as slide:
        tissue = find_tissue(slide.thumbnail(8.0), 8.0)
        assert not tissue.any()
        assert len(make_tiles(slide, tissue, 8.0, mpp=0.5, size=128)) == 0


def _first_tiles(example_slide, n: int = 40):
    with Slide(example_slide) as slide:
        tiles = make_tiles(slide, find_tissue(slide.thumbnail(8.0), 8.0), 8.0, mpp=1.0, size=64, overlap=16)
    assert len(tiles) >= n
    return dataclasses.replace(
        tiles, coords=tiles.coords[:n], grid_index=tiles.grid_index[:n], tissue_fraction=tiles.tissue_fraction[:n]
    )


def test_dataset_reads_the_tiles_of_the_slide(example_slide):
    tiles = _first_tiles(example_slide)
    dataset = TileDataset(example_slide, tiles)
    assert len(dataset) == len(tiles)
    with Slide(example_slide) as slide:
        for i in (0, len(tiles) - 1):
            x, y = tiles.coords[i]
            expected = slide.read_region((int(x), int(y)), (64, 64), 1.0)
            image = dataset[i]
            assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
            np.testing.assert_array_equal(image, expected)
    assert dataset[0].std() > 5  # tissue, not glass
    dataset.close()


def test_batches_from_two_workers_equal_single_process_reads(example_slide):
    tiles = _first_tiles(example_slide)
    single = list(iter_tile_batches(example_slide, tiles, batch_size=16, workers=0))
    parallel = list(iter_tile_batches(example_slide, tiles, batch_size=16, workers=2))
    assert [len(i) for i, _ in single] == [16, 16, 8]
    for (index_a, images_a), (index_b, images_b) in zip(single, parallel, strict=True):
        np.testing.assert_array_equal(index_a, index_b)
        assert images_b.dtype == np.uint8 and images_b.shape[1:] == (64, 64, 3)
        np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in parallel]), np.arange(len(tiles)))


def test_first_batch_is_read_in_process_and_the_rest_by_workers(example_slide, monkeypatch):
    from wsi_qc import tiles as tiles_mod

    tiles = _first_tiles(example_slide)  # 40 tiles
    made = []
    plain = tiles_mod.DataLoader

    def counting(dataset, **kwargs):
        made.append(len(dataset))
        return plain(dataset, **kwargs)

    monkeypatch.setattr(tiles_mod, "DataLoader", counting)
    batches = list(iter_tile_batches(example_slide, tiles, batch_size=16, workers=2))
    assert made == [len(tiles) - 16]  # the workers read all but the first batch
    np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), np.arange(len(tiles)))
    made.clear()
    one = list(iter_tile_batches(example_slide, tiles, batch_size=64, workers=2))
    assert made == [] and [len(i) for i, _ in one] == [len(tiles)]  # one batch: no worker processes started
    np.testing.assert_array_equal(one[0][1], np.concatenate([b for _, b in batches]))


def test_batches_from_an_open_slide_and_an_array_slide(example_slide):
    tiles = _first_tiles(example_slide, n=20)
    reference = np.concatenate([b for _, b in iter_tile_batches(example_slide, tiles, batch_size=8, workers=0)])
    with Slide(example_slide) as slide:
        from_slide = np.concatenate([b for _, b in iter_tile_batches(slide, tiles, batch_size=8, workers=2)])
        whole = slide.read_region((0, 0), slide.dimensions, slide.mpp)
    np.testing.assert_array_equal(from_slide, reference)
    # an in-memory slide has no path for workers to open: it is read in this process
    array_slide = Slide.from_array(whole, mpp=0.5)
    from_array = np.concatenate([b for _, b in iter_tile_batches(array_slide, tiles, batch_size=8, workers=2)])
    in_process = np.concatenate([b for _, b in iter_tile_batches(array_slide, tiles, batch_size=8, workers=0)])
    np.testing.assert_array_equal(from_array, in_process)
    assert np.abs(from_array.astype(int) - reference.astype(int)).mean() < 8  # level 0 resampled vs level 1


@pytest.mark.realdata
def test_cmu_tiles_at_half_mpp(slides_dir):
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        tissue = find_tissue(slide.thumbnail(8.0), 8.0)
        tiles = make_tiles(slide, tissue, 8.0, mpp=0.5, size=224)
        width, height = slide.dimensions
    print(f"CMU-1-Small-Region: tissue {100 * tissue.mean():.1f} %, {len(tiles)} tiles on a {tiles.grid_shape} grid")
    assert 0.25 < tissue.mean() < 0.55
    assert len(tiles) >= 20
    assert (tiles.coords >= 0).all() and (tiles.coords[:, 0] + 224 <= width).all()
    assert (tiles.coords[:, 1] + 224 <= height).all() and (tiles.tissue_fraction >= 0.5).all()


@pytest.mark.realdata
def test_tcga_tiles_with_mpp_override(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with Slide(path, mpp=1.0) as slide:
        tiles = make_tiles(slide, find_tissue(slide.thumbnail(8.0), 8.0), 8.0, mpp=1.0, size=224)
    print(f"tcga-cr-7395 at mpp 1.0: {len(tiles)} tiles on a {tiles.grid_shape} grid")
    assert tiles.grid_shape == (15, 19)
    assert 100 <= len(tiles) <= 285
    index, images = next(iter_tile_batches(path, tiles, batch_size=4, workers=0, slide_mpp=1.0))
    assert images.shape == (4, 224, 224, 3) and images.std() > 10
