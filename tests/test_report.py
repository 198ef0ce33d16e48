"""Tests of wsi_qc.report: overlay PNG, GeoJSON of discarded tiles, ROC plot, CSV/Parquet, HTML report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image
from shapely.geometry import Point, shape
from skimage.data import immunohistochemistry

from wsi_qc.errors import ConfigError
from wsi_qc.report import (
    REPORT_COLUMNS,
    RL2_LABEL,
    discarded_geojson,
    overlay_png,
    roc_png,
    thumbnail_png,
    write_geojson,
    write_manifest,
    write_report_csv,
    write_report_html,
)

SLIDE_MPP = 0.25
THUMB_MPP = 8.0
TILE = 448.0  # 224 px at 0.5 mpp, in level-0 pixels at 0.25 mpp


@pytest.fixture(scope="module")
def slide_case():
    """A real stained image as thumbnail, a tile grid over it, rl2 rising towards one corner."""
    thumb = immunohistochemistry()[:384]  # (384, 512, 3) at 8 mpp -> level 0 is 16384 x 12288 px
    rows, cols = int(384 * THUMB_MPP / SLIDE_MPP // TILE), int(512 * THUMB_MPP / SLIDE_MPP // TILE)
    r, c = np.mgrid[0:rows, 0:cols]
    coords = np.stack([c.ravel() * TILE, r.ravel() * TILE], 1).astype(np.int32)
    rng = np.random.default_rng(0)
    rl2 = (np.hypot(r.ravel() / rows, c.ravel() / cols) + 0.1 * rng.random(rows * cols)).astype(np.float32)
    threshold = 0.9
    return {"thumb": thumb, "coords": coords, "rl2": rl2, "keep": rl2 <= threshold, "threshold": threshold}


# ---------------------------------------------------------------- overlay


def test_overlay_png_has_two_panels_with_keep_and_discard_colours(tmp_path, slide_case):
    out = overlay_png(tmp_path / "s1.png", slide_case["thumb"], THUMB_MPP, SLIDE_MPP, slide_case["coords"], TILE,
                      slide_case["keep"], slide_case["rl2"], slide_case["threshold"], slide_id="s1")
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.width > 1.8 * im.height  # two panels side by side
        pixels = np.asarray(im.convert("RGB")).astype(int)
    left, right = pixels[:, : pixels.shape[1] // 2], pixels[:, pixels.shape[1] // 2:]
    r, g, b = left[..., 0], left[..., 1], left[..., 2]
    assert ((g - r > 60) & (g - b > 40)).sum() > 500, "no green (kept) tiles in the left panel"
    assert ((r - g > 80) & (r - b > 60)).sum() > 500, "no red (discarded) tiles in the left panel"
    # inferno's bright end (yellow) appears only in the heatmap panel
    yellow = lambda p: ((p[..., 0] > 220) & (p[..., 1] > 180) & (p[..., 2] < 120)).sum()  # noqa: E731
    assert yellow(right) > 200 and yellow(right) > 10 * yellow(left)


def test_overlay_png_without_tiles_and_with_nan_rl2(tmp_path, slide_case):
    empty = overlay_png(tmp_path / "empty.png", slide_case["thumb"], THUMB_MPP, SLIDE_MPP,
                        np.zeros((0, 2), np.int32), TILE, np.zeros(0, bool), np.zeros(0), None)
    rl2 = slide_case["rl2"].astype(float).copy()
    rl2[::3] = np.nan
    nan = overlay_png(tmp_path / "nan.png", slide_case["thumb"], THUMB_MPP, SLIDE_MPP, slide_case["coords"], TILE,
                      slide_case["keep"], rl2, None)
    for out in (empty, nan):
        with Image.open(out) as im:
            assert im.width > im.height


def test_overlay_png_refuses_mismatched_lengths(tmp_path, slide_case):
    with pytest.raises(ConfigError, match="keep has 3 values"):
        overlay_png(tmp_path / "x.png", slide_case["thumb"], THUMB_MPP, SLIDE_MPP, slide_case["coords"], TILE,
                    np.ones(3, bool), slide_case["rl2"], None)
    assert not (tmp_path / "x.png").exists()


def test_thumbnail_png_is_bounded(tmp_path, slide_case):
    with Image.open(thumbnail_png(tmp_path / "t.png", slide_case["thumb"], max_side=100)) as im:
        assert im.size == (100, 75)


# ---------------------------------------------------------------- GeoJSON


def _check_geojson(gj, coords, size, keep):
    assert gj["type"] == "FeatureCollection"
    json.loads(json.dumps(gj))  # serialisable as is
    geoms = []
    for f in gj["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "QC discard", "color": [255, 0, 0]}
        assert props["name"]
        geom = shape(f["geometry"])
        assert geom.is_valid
        geoms.append(geom)
    union = shapely.union_all(geoms) if geoms else shapely.Polygon()
    centres = coords + size / 2
    for (x, y), k in zip(centres, keep):
        assert union.contains(Point(x, y)) is (not k), (x, y, k)
    return union


def test_geojson_union_is_exactly_the_discarded_tiles(slide_case):
    coords, keep = slide_case["coords"], slide_case["keep"]
    assert 0 < (~keep).sum() < len(keep)
    gj = discarded_geojson(coords, TILE, keep, "s1")
    union = _check_geojson(gj, coords, TILE, keep)
    assert union.area == (~keep).sum() * TILE**2
    assert sum(shape(f["geometry"]).area for f in gj["features"]) == union.area  # features do not overlap


def test_geojson_separate_regions_and_holes():
    # 5x5 grid, discard a ring (hole in the middle, kept) and one isolated tile far away
    r, c = np.mgrid[0:5, 0:5]
    coords = np.stack([c.ravel() * 100, r.ravel() * 100], 1).astype(np.int32)
    ring = (np.maximum(np.abs(r - 2), np.abs(c - 2)) == 1).ravel()
    coords = np.vstack([coords, [[2000, 2000]]]).astype(np.int32)
    keep = np.append(~ring, False)
    gj = discarded_geojson(coords, 100, keep, "ring")
    assert len(gj["features"]) == 2
    union = _check_geojson(gj, coords, 100.0, keep)
    assert union.area == 9 * 100**2
    holes = [len(shape(f["geometry"]).interiors) for f in gj["features"]]
    assert sorted(holes) == [0, 1]
    assert {f["properties"]["name"].split("(")[1] for f in gj["features"]} == {"8 tiles)", "1 tiles)"}


def test_geojson_merges_neighbours_across_subpixel_gaps():
    size = 447.6  # tile side not a whole number of level-0 pixels; coords floored to int
    coords = np.stack([np.floor(np.arange(6) * size), np.zeros(6)], 1).astype(np.int32)
    gj = discarded_geojson(coords, size, np.zeros(6, bool), "float")
    assert len(gj["features"]) == 1
    assert shape(gj["features"][0]["geometry"]).is_valid


def test_geojson_nothing_discarded_and_written_file(tmp_path, slide_case):
    assert discarded_geojson(slide_case["coords"], TILE, np.ones(len(slide_case["coords"]), bool), "s")["features"] == []
    out = write_geojson(tmp_path / "g" / "s1.geojson", slide_case["coords"], TILE, slide_case["keep"], "s1")
    assert json.loads(out.read_text()) == discarded_geojson(slide_case["coords"], TILE, slide_case["keep"], "s1")


# ---------------------------------------------------------------- ROC


def test_roc_png(tmp_path):
    fpr = np.array([0, 0.1, 0.3, 1.0])
    tpr = np.array([0, 0.6, 0.9, 1.0])
    plain = roc_png(tmp_path / "plain.png", fpr, tpr, 0.85, None)
    full = roc_png(tmp_path / "roc.png", fpr, tpr, 0.85, (0.8, 0.9), (0.1, 0.6),
                   {"blur": (fpr, np.array([0, 0.8, 0.95, 1.0]), 0.93), "pen": (fpr, tpr, 0.85)})
    with Image.open(plain) as a, Image.open(full) as b:
        assert a.size == b.size and a.width > 300
        assert not np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- CSV / manifest


def _rows():
    return [
        {"slide": "slide-2", "path": "/d/slide-2.svs", "status": "done", "error": None, "n_tiles": 100, "n_keep": 90,
         "kept_pct": 90.0, "rl2_median": 0.51, "rl2_p95": 1.2, "seconds": 12.5, "mpp": 0.25},
        {"slide": "slide-10", "path": "/d/slide-10.svs", "status": "done", "error": None, "n_tiles": 40,
         "n_keep": 10, "kept_pct": 25.0, "rl2_median": 1.4, "rl2_p95": 2.2, "seconds": 3.0, "mpp": 0.5},
        {"slide": "bad<slide>", "path": "/d/bad.svs", "status": "failed",
         "error": "bad.svs has no mpp in its metadata; pass --mpp <script>alert(1)</script>",
         "traceback": "Traceback (most recent call last):\n  File \"x.py\", line 1\nSlideError: no mpp"},
        {"slide": "slide-1", "path": "/d/slide-1.svs", "status": "done", "error": None, "n_tiles": 60, "n_keep": 45,
         "kept_pct": 75.0, "rl2_median": 0.7, "rl2_p95": 1.5, "seconds": 8.0, "mpp": 0.25},
    ]


def test_report_csv_round_trip(tmp_path):
    out = write_report_csv(tmp_path / "report.csv", _rows())
    df = pd.read_csv(out)
    assert list(df.columns[: len(REPORT_COLUMNS)]) == list(REPORT_COLUMNS)
    assert set(df.columns[len(REPORT_COLUMNS):]) == {"mpp", "traceback"}
    assert list(df["slide"]) == ["slide-2", "slide-10", "bad<slide>", "slide-1"]
    assert df.loc[2, "status"] == "failed" and "Traceback" in df.loc[2, "traceback"]
    assert pd.isna(df.loc[2, "n_tiles"]) and df.loc[0, "n_tiles"] == 100


def test_manifest_csv_and_parquet(tmp_path, slide_case):
    records = [
        {"slide": "s1", "path": "/d/s1.svs", "coords": slide_case["coords"], "keep": slide_case["keep"],
         "rl2": slide_case["rl2"], "mpp": 0.5, "size": 224},
        {"slide": "s2", "path": "/d/s2.svs", "coords": np.zeros((0, 2), np.int32), "keep": np.zeros(0, bool),
         "rl2": np.zeros(0, np.float32), "mpp": 0.5, "size": 224},
    ]
    csv_path, pq_path = write_manifest(tmp_path / "m" / "manifest.v1", records)
    assert csv_path.name == "manifest.v1.csv" and pq_path.name == "manifest.v1.parquet"
    pq = pd.read_parquet(pq_path)
    csv = pd.read_csv(csv_path)
    assert list(pq.columns) == ["slide", "x", "y", "mpp", "size", "rl2", "path"]
    assert len(pq) == len(csv) == int(slide_case["keep"].sum())
    kept = slide_case["coords"][slide_case["keep"]]
    np.testing.assert_array_equal(pq[["x", "y"]].to_numpy(), kept)
    np.testing.assert_allclose(pq["rl2"], slide_case["rl2"][slide_case["keep"]])
    assert (pq["rl2"] <= slide_case["threshold"]).all()
    np.testing.assert_allclose(csv["rl2"], pq["rl2"], rtol=1e-6)
    assert set(pq["slide"]) == {"s1"} and (pq["size"] == 224).all() and (pq["mpp"] == 0.5).all()


def test_manifest_empty_has_columns(tmp_path):
    _, pq_path = write_manifest(tmp_path / "empty", [])
    pq = pd.read_parquet(pq_path)
    assert list(pq.columns) == ["slide", "x", "y", "mpp", "size", "rl2"] and len(pq) == 0


# ---------------------------------------------------------------- HTML


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.in_tbody = False
        self.row_slides: list[str] = []
        self.img_src: list[str] = []
        self.external: list[str] = []
        self.tags: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "tbody":
            self.in_tbody = True
        if tag == "tr" and self.in_tbody:
            self.row_slides.append(attrs["data-slide"])
        if tag == "img":
            self.img_src.append(attrs["src"])
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_tbody = False

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture()
def html_report(tmp_path, slide_case):
    images = {}
    for row in _rows():
        if row["status"] != "done":
            continue
        slide = row["slide"]
        images[slide] = {
            "thumbnail": thumbnail_png(tmp_path / f"{slide}_thumb.png", slide_case["thumb"], 160),
            "overlay": overlay_png(tmp_path / f"{slide}_overlay.png", slide_case["thumb"], THUMB_MPP, SLIDE_MPP,
                                   slide_case["coords"], TILE, slide_case["keep"], slide_case["rl2"],
                                   slide_case["threshold"], slide_id=slide, dpi=60),
        }
    roc = roc_png(tmp_path / "roc.png", [0, 0.2, 1], [0, 0.8, 1], 0.8, (0.7, 0.9), (0.2, 0.8), dpi=50)
    return write_report_html(tmp_path / "report.html", _rows(), images, figures={"ROC": roc})


def test_report_html_structure(html_report):
    text = html_report.read_text(encoding="utf-8")
    parser = _ReportParser()
    parser.feed(text)
    assert parser.row_slides == ["slide-2", "slide-10", "bad<slide>", "slide-1"]
    assert len(parser.img_src) == 3 * 2 + 1  # thumbnail + overlay of each done slide, and the ROC
    assert all(src.startswith("data:image/png;base64,") for src in parser.img_src)
    assert parser.external == []
    assert parser.tags["script"] == 1 and parser.tags["style"] == 1  # the injected <script> stayed text
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)" in text
    assert parser.tags["details"] == 2  # the failed slide's traceback, in the failures list and the table
    body = " ".join(" ".join(parser.text).split())
    assert "4 slides" in body and "3 done" in body and "1 failed" in body
    assert "200 tiles" in body and "145 kept tiles" in body and "72.5 % kept" in body
    assert "SlideError: no mpp" in body


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=2000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


_CLICK_SCRIPT = """<script>
window.addEventListener('load', function () {
  function order() {
    return Array.prototype.map.call(document.querySelectorAll('#slides tbody tr'),
                                    function (tr) { return tr.getAttribute('data-slide'); }).join('|');
  }
  var out = [];
  ['kept_pct', 'kept_pct', 'slide', 'seconds'].forEach(function (col) {
    document.querySelector('th[data-col="' + col + '"]').click();
    out.push(col + '=' + order());
  });
  var pre = document.createElement('pre');
  pre.id = 'result';
  pre.textContent = out.join('\\n');
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.browser
def test_report_html_sorts_in_headless_chromium(tmp_path, html_report):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    clicked = tmp_path / "clicked.html"
    clicked.write_text(html_report.read_text(encoding="utf-8").replace("</body>", _CLICK_SCRIPT + "</body>"),
                       encoding="utf-8")
    dom = _headless(binary, tmp_path / "profile", "--dump-dom", clicked.as_uri())
    match = re.search(r'<pre id="result">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"no result in the dumped DOM (rc {dom.returncode}): {dom.stderr[-2000:]}"
    orders = match.group(1).replace("&lt;", "<").replace("&gt;", ">").splitlines()
    # numeric sort ascending then descending, the failed slide (no value) last in both directions
    assert orders[0] == "kept_pct=slide-10|slide-1|slide-2|bad<slide>"
    assert orders[1] == "kept_pct=slide-2|slide-1|slide-10|bad<slide>"
    assert orders[2] == "slide=bad<slide>|slide-1|slide-2|slide-10"  # numeric-aware text order
    assert orders[3] == "seconds=slide-10|slide-1|slide-2|bad<slide>"

    shot = tmp_path / "report.png"
    _headless(binary, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1400,1000",
              "--hide-scrollbars", html_report.as_uri())
    with Image.open(shot) as im:
        assert im.size == (1400, 1000)
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 20  # rendered content, not a blank page
