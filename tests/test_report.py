"""Tests of wsi_qc.report: overlay PNG, score maps (rl2_map), tile gallery, GeoJSON, ROC plot, CSV/Parquet,
HTML pages."""

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

from benchmarks.report import Chromium, synthetic_rows
from wsi_qc.errors import ConfigError
from wsi_qc.report import (
    REPORT_COLUMNS,
    discarded_geojson,
    overlay_png,
    roc_png,
    score_map_png,
    thumbnail_png,
    write_geojson,
    write_manifest,
    write_report_csv,
    write_report_html,
    write_slide_page,
    write_tile_gallery,
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
         "n_keep": 10, "kept_pct": 25.0, "rl2_median": 1.4, "rl2_p95": 2.2, "seconds": 3.0, "mpp": 0.5,
         "warning": "75 % of its tiles score above the threshold: check <its> overlay"},
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


# ---------------------------------------------------------------- per-position score maps (rl2_map)


def _two_tiles_with_maps():
    """Two tiles side by side on a blank thumbnail; each map is bright on its left half, dark on its right."""
    coords = np.array([[0, 0], [896, 0]], np.int32)  # 2 tiles of 896 level-0 px at 0.25 mpp = 28 thumbnail px
    maps = np.zeros((2, 7, 7), np.float32)
    maps[:, :, :3] = 1.0
    return np.full((56, 112, 3), 255, np.uint8), coords, np.array([0.5, 0.5], np.float32), maps


def test_score_map_png_draws_each_tiles_map_inside_its_square(tmp_path):
    thumb, coords, rl2, maps = _two_tiles_with_maps()
    path, (vmin, vmax) = score_map_png(tmp_path / "map.png", thumb, THUMB_MPP, SLIDE_MPP, coords, 896, rl2, maps)
    assert (vmin, vmax) == (0.0, 1.0)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    scale = pixels.shape[1] // 112  # upsampled so that every map position has its own pixels
    assert scale >= 1 and pixels.shape[0] == 56 * scale
    for tile in range(2):
        x0 = tile * 28 * scale
        left = pixels[5 * scale, x0 + 2 * scale]
        right = pixels[5 * scale, x0 + 26 * scale]
        assert left.sum() > right.sum() + 200, (tile, left, right)  # bright (yellow) then dark (black) in one tile
    assert (pixels[40 * scale:, :] == 255).all()  # below the tiles: the (white) thumbnail
    flat, _ = score_map_png(tmp_path / "flat.png", thumb, THUMB_MPP, SLIDE_MPP, coords, 896, rl2)  # no map
    with Image.open(flat) as im:
        tile = np.asarray(im.convert("RGB"))[:28, :28].reshape(-1, 3)
    assert len(np.unique(tile, axis=0)) == 1  # one colour per tile


def test_overlay_png_with_rl2_map(tmp_path, slide_case):
    coords, rl2 = slide_case["coords"], slide_case["rl2"]
    maps = np.zeros((len(coords), 14, 14), np.float32)
    maps[:, :7] = rl2[:, None, None] * 2  # top half of every tile worse than its bottom half
    args = (slide_case["thumb"], THUMB_MPP, SLIDE_MPP, coords, TILE, slide_case["keep"], rl2, slide_case["threshold"])
    flat = overlay_png(tmp_path / "flat.png", *args, slide_id="s1")
    mapped = overlay_png(tmp_path / "mapped.png", *args, rl2_map=maps, slide_id="s1")
    with Image.open(flat) as a, Image.open(mapped) as b:
        assert a.size == b.size
        pa, pb = np.asarray(a.convert("RGB")).astype(int), np.asarray(b.convert("RGB")).astype(int)
    half = pa.shape[1] // 2
    left, right = pb[:, :half], pb[:, half:]
    assert ((left[..., 1] - left[..., 0] > 60) & (left[..., 1] - left[..., 2] > 40)).sum() > 500  # kept: green
    # per position: down the heatmap, bright (top half of a tile) and dark (bottom half) bands alternate
    def bands(panel):
        line = panel[60:-60, panel.shape[1] // 2].sum(axis=1)
        return np.count_nonzero(np.diff(line > line.mean()))
    assert bands(right) > 30 > bands(pa[:, half:])
    with pytest.raises(ConfigError, match=r"rl2_map must have shape \(N, h, w\)"):
        overlay_png(tmp_path / "bad.png", *args, rl2_map=maps[:3])


def test_tile_gallery_worst_first_with_map_overlays(tmp_path):
    coords = np.array([[0, 0], [100, 0], [200, 0], [300, 0]], np.int32)
    rl2 = np.array([0.1, 0.9, np.nan, 0.5], np.float32)
    maps = np.random.default_rng(0).random((4, 7, 7)).astype(np.float32)
    read = lambda x, y: np.full((64, 64, 3), x // 100 * 60, np.uint8)  # noqa: E731 (a tile that tells its x)
    gallery = write_tile_gallery(tmp_path / "g", read, coords, rl2, maps, n=3)
    assert [(t["x"], t["rl2"]) for t in gallery] == [(100, pytest.approx(0.9)), (300, 0.5), (0, pytest.approx(0.1))]
    for t in gallery:
        with Image.open(t["image"]) as crop, Image.open(t["map"]) as heat:
            assert crop.format == heat.format == "JPEG" and crop.size == (64, 64)
            assert abs(np.asarray(crop).mean() - t["x"] // 100 * 60) < 2
            assert np.abs(np.asarray(heat).astype(int) - np.asarray(crop)).mean() > 5
    assert all(t["map"] is None for t in write_tile_gallery(tmp_path / "plain", read, coords, rl2, n=2))


# ---------------------------------------------------------------- HTML


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.table: str | None = None
        self.rows: dict[str, list[str]] = {}
        self.headers: dict[str, list[str]] = {}
        self.img_src: list[str] = []
        self.links: list[str] = []
        self.tags: dict[str, int] = {}
        self.text: list[str] = []
        self._th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "table":
            self.table = attrs.get("id")
        if tag == "tr" and "data-slide" in attrs:
            self.rows.setdefault(self.table, []).append(attrs["data-slide"])
        self._th = tag == "th"
        if tag == "img":  # thumbnails of the summary get their src from the page's script, when in view
            self.img_src.append(attrs.get("src") or attrs["data-src"])
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        self._th = False if tag == "th" else self._th

    def handle_data(self, data):
        self.text.append(data)
        if self._th and self.table:
            self.headers.setdefault(self.table, []).append(data)


def _parse(path: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _report(tmp_path, slide_case, embed: bool, rows=None) -> Path:
    rows = rows or _rows()
    images = {r["slide"]: {"thumbnail": thumbnail_png(tmp_path / "thumbnails" / f"{r['slide']}.png",
                                                      slide_case["thumb"], 160)}
              for r in rows if r["status"] == "done"}
    roc = roc_png(tmp_path / "roc.png", [0, 0.2, 1], [0, 0.8, 1], 0.8, (0.7, 0.9), (0.2, 0.8), dpi=50)
    pages = {r["slide"]: tmp_path / "slides" / f"{r['slide']}.html" for r in rows}
    return write_report_html(tmp_path / "report.html", rows, images, figures={"ROC": roc}, embed=embed,
                             slide_pages=pages)


def test_report_html_summary_table_and_folded_timings(tmp_path, slide_case):
    html_report = _report(tmp_path, slide_case, embed=True)
    text = html_report.read_text(encoding="utf-8")
    parser = _parse(html_report)
    assert parser.rows["slides"] == ["slide-2", "slide-10", "bad<slide>", "slide-1"]
    assert parser.headers["slides"] == ["slide", "status", "tiles", "kept %", "rl2 median", "rl2 p95",
                                        "flagged kinds", "error / warning", "thumbnail"]
    assert parser.rows["timings"] == parser.rows["slides"]
    assert '<td data-value="" class="warning">warning: 75 % of its tiles score above the threshold: check &lt;its&gt; ' \
           "overlay</td>" in text  # a done slide's warning in the error column, escaped
    assert {"seconds", "n_keep", "mpp", "path"} <= set(parser.headers["timings"])
    assert "traceback" not in parser.headers["timings"]
    assert len(parser.img_src) == 3 + 1  # the thumbnail of each done slide, and the ROC
    assert all(src.startswith("data:image/png;base64,") for src in parser.img_src)
    assert parser.tags["script"] == 1 and parser.tags["style"] == 1  # the injected <script> stayed text
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)" in text
    assert parser.tags["details"] == 2  # the failed slide's traceback, and the folded timings
    assert 'id="status-filter"' in text and 'id="kept-max"' in text
    body = " ".join(" ".join(parser.text).split())
    assert "4 slides" in body and "3 done" in body and "1 failed" in body
    assert "200 tiles" in body and "145 kept tiles" in body and "72.5 % kept" in body
    assert "SlideError: no mpp" in body
    assert "slides/slide-2.html" in parser.links


def test_report_html_links_images_by_relative_path(tmp_path, slide_case):
    html_report = _report(tmp_path, slide_case, embed=False)
    parser = _parse(html_report)
    assert parser.img_src and not any(src.startswith("data:") for src in parser.img_src)
    for src in parser.img_src + [link for link in parser.links if not link.startswith("#")]:
        assert not src.startswith(("/", "http")), src
    assert all((tmp_path / src).is_file() for src in parser.img_src)
    assert html_report.stat().st_size < 40_000


def test_flagged_kinds_column_is_empty_without_them(tmp_path, slide_case):
    rows = _rows()
    rows[0]["flagged_kinds"] = ["pen", "fold"]
    rows[1]["flagged_kinds"] = {"blur": 3}
    text = _report(tmp_path, slide_case, embed=False, rows=rows).read_text(encoding="utf-8")
    assert ">pen, fold</td>" in text and ">blur (3)</td>" in text
    plain = _report(tmp_path / "plain", slide_case, embed=False).read_text(encoding="utf-8")
    assert "flagged kinds</th>" in plain and ">pen" not in plain


def test_report_html_of_1000_slides_stays_small(tmp_path):
    rows = synthetic_rows(1000)  # benchmarks/report.py times this page in Chromium
    images = {r["slide"]: {"thumbnail": tmp_path / "thumbnails" / f"{r['slide']}.png"} for r in rows}
    pages = {r["slide"]: tmp_path / "slides" / f"{r['slide']}.html" for r in rows}
    path = write_report_html(tmp_path / "report.html", rows, images, slide_pages=pages)
    size = path.stat().st_size
    assert size < 5_000_000, f"report.html of 1000 slides is {size / 1e6:.1f} MB"
    parser = _parse(path)
    assert len(parser.rows["slides"]) == 1000 and parser.img_src.count("thumbnails/TCGA-0001-01Z-00-DX1.png") == 1


def test_slide_page_links_back_and_shows_gallery(tmp_path, slide_case):
    row = _rows()[0]
    thumb = thumbnail_png(tmp_path / "t.png", slide_case["thumb"])
    score, _ = score_map_png(tmp_path / "slides" / "slide-2" / "score_map.png", slide_case["thumb"], THUMB_MPP,
                             SLIDE_MPP, slide_case["coords"], TILE, slide_case["rl2"])
    read = lambda x, y: slide_case["thumb"][:64, :64]  # noqa: E731
    gallery = write_tile_gallery(tmp_path / "slides" / "slide-2", read, slide_case["coords"], slide_case["rl2"], n=4)
    page = write_slide_page(tmp_path / "slides" / "slide-2.html", row, {"overlay": thumb, "score_map": score},
                            gallery, report=tmp_path / "report.html", score_caption="rl2 per tile")
    parser = _parse(page)
    assert parser.links[0] == "../report.html"
    assert parser.img_src[:2] == ["../t.png", "slide-2/score_map.png"]
    assert len(parser.img_src) == 2 + 4 and all((page.parent / s).is_file() for s in parser.img_src)
    assert "Worst 4 tiles" in " ".join(parser.text)


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--allow-file-access-from-files", f"--user-data-dir={profile}",
           "--virtual-time-budget=2000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


_CLICK_SCRIPT = """<script>
window.addEventListener('load', function () {
  function order() {
    var rows = document.querySelectorAll('#slides tbody tr');
    return Array.prototype.filter.call(rows, function (tr) { return !tr.hidden; })
      .map(function (tr) { return tr.getAttribute('data-slide'); }).join('|');
  }
  var out = ['shown=' + document.getElementById('shown').textContent];
  ['kept_pct', 'kept_pct', 'slide', 'rl2_p95'].forEach(function (col) {
    document.querySelector('#slides th[data-col="' + col + '"]').click();
    out.push(col + '=' + order());
  });
  var status = document.getElementById('status-filter');
  status.value = 'failed'; status.dispatchEvent(new Event('input'));
  var drawn = Array.prototype.filter.call(document.querySelectorAll('#slides tbody tr'),
                                          function (tr) { return tr.getClientRects().length > 0; });
  out.push('failed=' + order() + ' drawn=' + drawn.length);  // a filtered-out row takes no room on the page
  status.value = ''; status.dispatchEvent(new Event('input'));
  var hi = document.getElementById('kept-max');
  hi.value = '80'; hi.dispatchEvent(new Event('input'));
  out.push('kept<=80=' + order() + ' ' + document.getElementById('shown').textContent);
  var pre = document.createElement('pre');
  pre.id = 'result';
  pre.textContent = out.join('\\n');
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.browser
def test_report_html_sorts_and_filters_in_headless_chromium(tmp_path, slide_case):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    html_report = _report(tmp_path, slide_case, embed=False)
    clicked = tmp_path / "clicked.html"
    clicked.write_text(html_report.read_text(encoding="utf-8").replace("</body>", _CLICK_SCRIPT + "</body>"),
                       encoding="utf-8")
    dom = _headless(binary, tmp_path / "profile", "--dump-dom", clicked.as_uri())
    match = re.search(r'<pre id="result">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"no result in the dumped DOM (rc {dom.returncode}): {dom.stderr[-2000:]}"
    orders = match.group(1).replace("&lt;", "<").replace("&gt;", ">").splitlines()
    assert orders[0] == "shown=4 of 4 slides shown"  # written by the page's script
    # numeric sort ascending then descending, the failed slide (no value) last in both directions
    assert orders[1] == "kept_pct=slide-10|slide-1|slide-2|bad<slide>"
    assert orders[2] == "kept_pct=slide-2|slide-1|slide-10|bad<slide>"
    assert orders[3] == "slide=bad<slide>|slide-1|slide-2|slide-10"  # numeric-aware text order
    assert orders[4] == "rl2_p95=slide-2|slide-1|slide-10|bad<slide>"
    assert orders[5] == "failed=bad<slide> drawn=1"
    assert orders[6] == "kept<=80=slide-1|slide-10 2 of 4 slides shown"

    shot = tmp_path / "report.png"  # kept in the test's tmp dir
    _headless(binary, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1400,1000",
              "--hide-scrollbars", html_report.as_uri())
    with Image.open(shot) as im:
        assert im.size == (1400, 1000)
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 20  # rendered content, not a blank page


_SCROLL_JS = """new Promise(function (done) {
  function withSrc() { return document.querySelectorAll('#slides img[src]').length; }
  function until(test, then) {  // up to 20 s: thumbnails get a src once laid out in view (DEFER_JS), then decode
    var begun = performance.now();
    (function poll() { if (test() || performance.now() - begun > 20000) then(); else setTimeout(poll, 50); })();
  }
  var last = document.querySelector('#slides tbody tr:last-child'), img = last.querySelector('img'), first;
  until(function () { return withSrc() > 0; }, function () {
    first = withSrc();
    last.scrollIntoView();
    until(function () { return img.complete && img.naturalWidth > 0; }, function () {
      done([first, withSrc(), document.querySelectorAll('#slides img').length, img.getAttribute('src'),
            img.naturalWidth]);
    });
  });
})"""


@pytest.mark.browser
def test_report_html_of_many_slides_loads_thumbnails_as_they_scroll_into_view(tmp_path, slide_case):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    rows = synthetic_rows(200)
    images = {r["slide"]: {"thumbnail": thumbnail_png(tmp_path / "thumbnails" / f"{r['slide']}.png",
                                                      slide_case["thumb"], 160)}
              for r in rows if r["status"] == "done"}
    page = write_report_html(tmp_path / "report.html", rows, images)
    browser = Chromium(binary, tmp_path / "profile")  # real time: a virtual-time budget can run out before a frame
    try:
        first, after, total, src, width = browser.evaluate(browser.open(page), _SCROLL_JS)
    finally:
        browser.close()
    assert total == len(images) == 196
    assert 0 < first < 40 and first < after < 80  # the rows near the view, then those near the last row
    assert src == f"thumbnails/{rows[-1]['slide']}.png" and width > 0
