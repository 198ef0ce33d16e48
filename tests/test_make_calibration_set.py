"""`wsi-qc make-calibration-set` (wsi_qc.calibration_set) on a generated example slide with 64 px tiles."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import make_calibration_set as wrapper
from wsi_qc import calibration_set, cli
from wsi_qc.artifacts import ARTIFACT_KINDS
from wsi_qc.data import write_example_slide
from wsi_qc.slide import Slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return write_example_slide(tmp_path_factory.mktemp("slides") / "example.tif", size=(2048, 2048), seed=1)


COLUMNS = calibration_set.COLUMNS


def main(argv: list[str]) -> int:
    return cli.main(["make-calibration-set", *argv])


def write_config(path: Path, **own) -> Path:
    section = {"n_clean": 60, "min_tissue": 0.5, "reference_fraction": 0.4, "artifact_fraction": 0.5, "seed": 3,
               **own}
    path.write_text(yaml.safe_dump({"tiles": {"size": 64}, "calibration_set": section}))
    return path


def read_labels(out: Path) -> list[dict]:
    with open(out / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_calibration_set_from_a_slide(slide, tmp_path):
    out = tmp_path / "set"
    assert main(["--config", str(write_config(tmp_path / "c.yaml")), "--slides", str(slide), "--out", str(out)]) == 0
    with open(out / "labels.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    rows = read_labels(out)
    ref = [r for r in rows if r["split"] == "reference"]
    good = [r for r in rows if r["split"] == "calibration" and r["label"] == "0"]
    bad = [r for r in rows if r["label"] == "1"]
    # 60 source tiles: 24 reference, of the other 36 half get artifacts at severities 1..3
    assert (len(ref), len(good), len(bad)) == (24, 18, 54)
    assert {r["label"] for r in ref} == {"0"}
    assert {r["split"] for r in bad} == {"calibration"}
    assert {int(r["severity"]) for r in bad} == {1, 2, 3} and {r["severity"] for r in ref + good} == {"0"}
    # kinds are dealt in turn: 18 artifact source tiles over 13 kinds -> every kind at least once
    assert {r["artifact"] for r in bad} == set(ARTIFACT_KINDS)
    # reference, good and artifact tiles come from disjoint source tiles (and positions)
    def sources(part):
        return {(r["source"], r["x"], r["y"]) for r in part}
    assert not sources(ref) & sources(good) and not sources(ref) & sources(bad) and not sources(good) & sources(bad)
    assert len({(r["x"], r["y"]) for r in rows}) == 60
    # every file exists as a 64 px RGB tile; clean tiles are the slide's pixels, artifact tiles are not
    with Slide(slide) as s:
        for r in rows:
            image = np.asarray(Image.open(out / r["path"]))
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            assert Path(r["slide"]) == slide.resolve()
            region = s.read_region((int(r["x"]), int(r["y"])), (64, 64), 0.5)
            if r["label"] == "0":
                assert np.array_equal(image, region), r["path"]
            else:
                assert not np.array_equal(image, region), r["path"]
    assert len(list(out.glob("*/*.png"))) == len(rows)
    assert all(r["path"].startswith(r["split"] + "/") for r in rows)
    assert (out / "summary.json").is_file()


def test_same_seed_same_set_and_overwrite_rules(slide, tmp_path):
    config = str(write_config(tmp_path / "c.yaml", n_clean=12))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--config", config, "--slides", str(slide), "--out", str(a)]) == 0
    assert wrapper.main(["--config", config, "--slides", str(slide), "--out", str(b)]) == 0  # the old command
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()
    for r in read_labels(a):
        assert (a / r["path"]).read_bytes() == (b / r["path"]).read_bytes()
    # an existing set is never mixed with a new one: refused, or replaced with --overwrite
    assert main(["--config", config, "--slides", str(slide), "--out", str(a), "--seed", "4"]) == 2
    assert main(["--config", config, "--slides", str(slide), "--out", str(a), "--seed", "4", "--overwrite"]) == 0
    assert (a / "labels.csv").read_text() != (b / "labels.csv").read_text()
    assert len(list(a.glob("*/*.png"))) == len(read_labels(a))


def test_paired_set_and_n_clean_override(slide, tmp_path):
    config = str(write_config(tmp_path / "c.yaml", paired=True, kinds=["pen", "fold"], severities=[2]))
    out = tmp_path / "set"
    assert main(["--config", config, "--slides", str(slide), "--out", str(out), "--n-clean", "10"]) == 0
    rows = read_labels(out)
    assert len({r["source"] for r in rows}) == 10
    bad = [r for r in rows if r["label"] == "1"]
    assert {r["artifact"] for r in bad} == {"pen", "fold"} and {r["severity"] for r in bad} == {"2"}
    clean_sources = {r["source"] for r in rows if r["label"] == "0" and r["split"] == "calibration"}
    assert {r["source"] for r in bad} <= clean_sources  # paired: each artifact tile's source is also there clean


def test_broken_slide_is_reported_and_the_rest_is_written(slide, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(np.random.default_rng(0).bytes(1000))
    out = tmp_path / "set"
    config = str(write_config(tmp_path / "c.yaml", n_clean=8))
    assert main(["--config", config, "--slides", str(slide), str(broken), "--out", str(out)]) == 1
    assert len({r["source"] for r in read_labels(out)}) == 8
    assert "broken.svs" in (out / "summary.json").read_text()


def test_bad_config_exits_2(slide, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"calibration_set": {"n_tiles": 5}}))
    assert main(["--config", str(bad), "--slides", str(slide), "--out", str(tmp_path / "o")]) == 2
    config = str(write_config(tmp_path / "c.yaml", kinds=["smudge"]))
    assert main(["--config", config, "--slides", str(slide), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2" / "labels.csv").exists()


def test_without_slides_or_shared_data_example_slides_are_generated(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration_set, "SHARED_SLIDES", tmp_path / "absent")
    config = str(write_config(tmp_path / "c.yaml", n_clean=6, example_slides=1, example_size=2048))
    out = tmp_path / "set"
    assert main(["--config", config, "--out", str(out)]) == 0
    rows = read_labels(out)
    assert (out / "slides" / "example-0.tif").is_file()
    assert {r["slide"] for r in rows} == {"slides/example-0.tif"}  # inside out/: written relative to it
    assert len({r["source"] for r in rows}) == 6
