"""Shared fixtures: real slides from ../shared/data/slides (skipped when absent) and generated slides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

SLIDES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    if not (SLIDES_DIR / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"real slides not found at {SLIDES_DIR} (only present beside a wsi-qc checkout in ../shared)")
    return SLIDES_DIR


def write_tile_folder(folder: Path, n: int = 60, size: int = 64) -> Path:
    """`n` small pink-purple noise tiles as PNGs: enough for fit-reference with a tiny flow."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour = np.array([200, 120, 170]) + rng.normal(0, 10, 3)
        tile = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(tile).save(folder / f"tile-{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def tissue_tiles(tmp_path_factory):
    """Four 96 px tiles (0.5 mpp) of a generated example slide, each almost all tissue."""
    import numpy as np

    from wsi_qc.config import load_config
    from wsi_qc.data import write_example_slide
    from wsi_qc.slide import Slide
    from wsi_qc.tiles import tile_slide

    path = write_example_slide(tmp_path_factory.mktemp("tissue") / "example.tif", size=(2048, 2048), seed=3)
    config = load_config(overrides={"tiles": {"size": 96, "min_tissue": 0.95}})
    with Slide(path) as slide:
        tiles = tile_slide(slide, config)[-1]
        return np.stack([slide.read_region(tuple(xy), (96, 96), 0.5) for xy in tiles.coords[:4]])


# ---------------------------------------------------------------- a tiny fitted scorer for batch runs

QC_CONFIG = """\
tiles: {size: 64, mpp: 0.5, workers: 0, batch_size: 32}
encoder: {name: test_efficientnet, weights: random, device: cpu}
flow: {epochs: 4, n_blocks: 2, hidden: 32, min_reference: 20, patience: 2, device: cpu}
threshold: {n_bootstrap: 20}
"""


@dataclass(frozen=True)
class QCKit:
    """Generated slides with a fitted scorer and calibration, for `wsi-qc run` tests."""

    root: Path
    slides: list[Path]   # good example slides (2048 x 2048 px at 0.25 mpp)
    config: Path         # override YAML: 64 px tiles at 0.5 mpp, timm's tiny random test_efficientnet
    scorer: Path
    calibration: Path


@pytest.fixture(scope="session")
def qc_kit(tmp_path_factory) -> QCKit:
    """Built once per session (~10 s): 4 slides, a scorer fitted on one, a calibration from synthetic labels."""
    import numpy as np

    from wsi_qc.config import load_config
    from wsi_qc.data import write_example_slide
    from wsi_qc.scorer import Scorer, encoder_from_config, slide_features
    from wsi_qc.slide import Slide
    from wsi_qc.threshold import Threshold

    root = tmp_path_factory.mktemp("qc_kit")
    slides = [write_example_slide(root / "slides" / f"good-{i}.tif", size=(2048, 2048), mpp=0.25, seed=i)
              for i in range(4)]
    config_path = root / "qc.yaml"
    config_path.write_text(QC_CONFIG)
    config = load_config(config_path)
    encoder = encoder_from_config(config)
    with Slide(slides[0]) as slide:
        features = slide_features(slide, encoder, config).features
    scorer = Scorer.fit(features, encoder, config)
    scorer.save(root / "scorer")
    scores = scorer.score(features)
    labels = (scores > np.median(scores)).astype(int)  # synthetic: the worse half is "bad"
    Threshold(n_bootstrap=20).fit(scores, labels).save(root / "calibration.json", scorer.fingerprint, config["score"])
    return QCKit(root, slides, config_path, root / "scorer", root / "calibration.json")
