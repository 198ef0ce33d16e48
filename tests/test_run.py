"""Batch runs (wsi_qc.run): slide collection, fault isolation, resume, concurrent writers, reports, export.

The scorer is the session's `qc_kit` (tests/conftest.py): generated slides, timm's tiny random
test_efficientnet, 64 px tiles at 0.5 mpp, a small flow and a calibration from synthetic labels.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

from benchmarks.report import Chromium
from wsi_qc import run as run_module
from wsi_qc.config import load_config
from wsi_qc.errors import ConfigError
from wsi_qc.run import (check_inputs, collect_slides, discard_warning, export_tiles, result_config, run_fingerprint,
                        run_slides, write_run_report)
from wsi_qc.store import list_slides, open_store, read_slide, slide_key, write_slide
from wsi_qc.tiles import prefetch

PATTERN = "*.svs,*.tif,*.tiff"
_QC_SLIDE = run_module.qc_slide


def _qc_or_die(path, *args):
    """qc_slide, except that the worker process dies (SIGKILL) on a slide named crash-*."""
    if Path(path).stem.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _QC_SLIDE(path, *args)


def _config(kit, **run):
    return load_config(kit.config, overrides={"run": run} if run else None)


def _faulty_folder(kit, folder):
    """Two good slides (one in a subfolder), a broken .svs, an empty file and a TIFF without mpp."""
    (folder / "sub").mkdir(parents=True)
    os.symlink(kit.slides[1], folder / "good-1.tif")
    os.symlink(kit.slides[2], folder / "sub" / "good-2.tif")
    (folder / "broken.svs").write_bytes(b"II*\x00" + os.urandom(1000))
    (folder / "empty.svs").write_bytes(b"")
    tifffile.imwrite(folder / "nompp.tif", np.full((512, 512, 3), 200, np.uint8), tile=(256, 256))
    (folder / "notes.txt").write_text("not a slide")
    return folder


# ---------------------------------------------------------------- collecting slides


def test_collect_slides_folder_recursive_globs_and_manifest(tmp_path):
    for name in ("a.svs", "sub/b.tif", "sub/deeper/c.TIFF", "sub/d.ndpi", "x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = collect_slides([tmp_path], "*.svs,*.tif")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.svs", "sub/b.tif"]
    found = collect_slides([tmp_path], "*.svs, *.tif ,*.ndpi,*.TIFF")
    assert {p.name for p in found} == {"a.svs", "b.tif", "c.TIFF", "d.ndpi"}

    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,label\nsub/b.tif,1\n{tmp_path / 'a.svs'},0\nmissing.svs,0\n")
    assert collect_slides([manifest], PATTERN) == [tmp_path / "sub" / "b.tif", tmp_path / "a.svs",
                                                   tmp_path / "missing.svs"]  # missing ones fail per slide

    bad = tmp_path / "bad.csv"
    bad.write_text("file\na.svs\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        collect_slides([bad], PATTERN)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.tif").write_bytes(b"x")
    with pytest.raises(ConfigError, match="share the id 'a'"):
        collect_slides([tmp_path / "a.svs", tmp_path / "other" / "a.tif"], PATTERN)


# ---------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("read failed at tile 2")

    got = []
    with pytest.raises(OSError, match="tile 2"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]

    produced, closed = [], threading.Event()

    def endless():
        try:
            for i in range(10**9):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer leaves early: the producer stops and closes its source
    assert closed.wait(5) and len(produced) <= 3 + 2 + 2
    assert not any(t.name == "wsi-qc-prefetch" for t in threading.enumerate())


# ---------------------------------------------------------------- fault isolation, reports, resume


@pytest.fixture(scope="module")
def faulty_run(qc_kit, tmp_path_factory):
    """One run over a folder of good and bad slides (in process), with its report written."""
    tmp = tmp_path_factory.mktemp("faulty")
    folder = _faulty_folder(qc_kit, tmp / "slides")
    config = _config(qc_kit)
    paths = collect_slides([folder], PATTERN)
    out, report_dir = tmp / "qc.zarr", tmp / "report"
    rows = run_slides(paths, qc_kit.scorer, qc_kit.calibration, config, out, report_dir)
    files = write_run_report(rows, out, report_dir)
    return {"folder": folder, "config": config, "paths": paths, "out": out, "report_dir": report_dir,
            "rows": rows, "files": files}


def test_bad_slides_fail_alone_with_their_error_in_the_report(faulty_run):
    rows = {r["slide"]: r for r in faulty_run["rows"]}
    assert set(rows) == {"good-1", "good-2", "broken", "empty", "nompp"}
    assert {k for k, r in rows.items() if r["status"] == "done"} == {"good-1", "good-2"}
    assert "SlideError" in rows["empty"]["error"] and "empty (0 bytes)" in rows["empty"]["error"]
    assert "no mpp" in rows["nompp"]["error"] and "mpp_fallback" in rows["nompp"]["error"]
    assert rows["broken"]["error"] and "Traceback" in rows["broken"]["traceback"]

    with open(faulty_run["report_dir"] / "report.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:11] == ["slide", "path", "status", "error", "warning", "n_tiles", "n_keep", "kept_pct",
                           "rl2_median", "rl2_p95", "seconds"]
    report = pd.read_csv(faulty_run["report_dir"] / "report.csv").set_index("slide")
    assert list(report.index) == [p.stem for p in faulty_run["paths"]]  # input order
    for col in ("n_tiles", "kept_pct", "rl2_median", "rl2_p95", "status", "seconds", "encode_s", "tile_s",
                "report_s", "write_s", "peak_rss_mb", "error", "traceback"):
        assert col in report.columns, col
    assert report.loc["nompp", "status"] == "failed" and "no mpp" in report.loc["nompp", "error"]
    assert "empty (0 bytes)" in report.loc["empty", "error"] and "Traceback" in report.loc["empty", "traceback"]

    root = open_store(faulty_run["out"], create=False)
    assert list_slides(root) == {"good-1": "done", "good-2": "done"}  # nothing of the failed slides
    for sid in ("good-1", "good-2"):
        found = read_slide(root, sid)
        n = found["attrs"]["n_tiles"]
        assert n > 20 and found["rl2"].shape == (n,) and found["coords"].shape == (n, 2)
        assert report.loc[sid, "n_tiles"] == n and report.loc[sid, "n_keep"] == found["keep"].sum()
        assert report.loc[sid, "rl2_median"] == pytest.approx(float(np.median(found["rl2"])), rel=1e-6)
        assert report.loc[sid, "rl2_p95"] == pytest.approx(float(np.percentile(found["rl2"], 95)), rel=1e-6)
        assert 0 < report.loc[sid, "kept_pct"] < 100
        assert report.loc[sid, "encode_s"] > 0 and report.loc[sid, "peak_rss_mb"] > 50
        assert np.array_equal(found["keep"], found["rl2"] <= found["attrs"]["threshold"])
        grid = found["grid"]
        assert (grid == 1).sum() == found["keep"].sum() and (grid == 2).sum() == (~found["keep"]).sum()
    # metadata consolidated at the end: the root lists every slide group without walking the store
    meta = json.loads((faulty_run["out"] / "zarr.json").read_text())
    listed = meta["consolidated_metadata"]["metadata"]
    assert {"good-1", "good-2", "good-1/rl2", "good-2/keep"} <= set(listed)
    assert listed["good-1"]["attributes"]["status"] == "done"


def test_manifest_lists_kept_tiles_in_csv_and_parquet(faulty_run):
    root = open_store(faulty_run["out"], create=False)
    files = faulty_run["files"]
    table = pd.read_csv(files["manifest_csv"])
    pd.testing.assert_frame_equal(table, pd.read_parquet(files["manifest_parquet"]), check_dtype=False)
    assert {"slide", "x", "y", "mpp", "size", "rl2"} <= set(table.columns)
    for sid in ("good-1", "good-2"):
        found = read_slide(root, sid)
        part = table[table.slide == sid]
        kept = found["coords"][found["keep"]]
        assert len(part) == len(kept) == found["attrs"]["n_keep"]
        assert np.array_equal(part[["x", "y"]].to_numpy(), kept)
        assert np.allclose(part["rl2"], found["rl2"][found["keep"]], rtol=1e-6)
        assert set(part["mpp"]) == {0.5} and set(part["size"]) == {64}
    assert not set(table.slide) & {"broken", "empty", "nompp"}


def test_rerun_skips_done_slides_and_redoes_the_rest(faulty_run, qc_kit, caplog):
    out, report_dir, config = faulty_run["out"], faulty_run["report_dir"], faulty_run["config"]
    root = open_store(out, create=False)
    before = {sid: read_slide(root, sid) for sid in ("good-1", "good-2")}
    # an interrupted write of good-2: its group exists but is not marked done
    g = zarr.open_group(out, mode="r+", use_consolidated=False)
    g["good-2"].update_attributes({"status": "writing"})

    paths = faulty_run["paths"]
    rows = {r["slide"]: r for r in run_slides(paths, qc_kit.scorer, qc_kit.calibration, config, out, report_dir)}
    assert rows["good-1"]["status"] == "skipped" and rows["good-2"]["status"] == "done"
    assert rows["good-1"]["n_tiles"] == before["good-1"]["attrs"]["n_tiles"]  # a skipped row still reports
    assert rows["good-1"]["rl2_median"] == pytest.approx(float(np.median(before["good-1"]["rl2"])))
    assert {rows[s]["status"] for s in ("broken", "empty", "nompp")} == {"failed"}  # failed ones are retried
    after = read_slide(open_store(out, create=False), "good-2")
    assert after["attrs"]["status"] == "done"
    assert np.array_equal(after["rl2"], before["good-2"]["rl2"]) and np.array_equal(after["keep"],
                                                                                     before["good-2"]["keep"])
    good = [p for p in paths if p.stem == "good-1"]
    # --force redoes everything; a config that changes results (another min_tissue) redoes too
    forced = run_slides(good, qc_kit.scorer, qc_kit.calibration, config, out, report_dir, force=True)
    assert forced[0]["status"] == "done"
    other = load_config(qc_kit.config, overrides={"tiles": {"min_tissue": 0.9}})
    changed = run_slides(good, qc_kit.scorer, qc_kit.calibration, other, out, report_dir)
    assert changed[0]["status"] == "done" and changed[0]["n_tiles"] < forced[0]["n_tiles"]
    # settings that do not change results (workers, batch size, scheduler, threshold section) redo nothing
    same = load_config(qc_kit.config, overrides={"tiles": {"min_tissue": 0.9, "batch_size": 7, "workers": 1},
                                                 "run": {"scheduler": "tcp://127.0.0.1:1", "workers": 3},
                                                 "threshold": {"rule": "fpr", "value": 0.1}})
    assert run_fingerprint(same, *check_inputs(qc_kit.scorer, qc_kit.calibration, same)) == \
        run_fingerprint(other, *check_inputs(qc_kit.scorer, qc_kit.calibration, other))
    same["run"]["scheduler"] = None  # the same fingerprint, run here
    assert run_slides(good, qc_kit.scorer, qc_kit.calibration, same, out, report_dir)[0]["status"] == "skipped"
    assert "threshold section is not used by a run" in caplog.text
    # settings that change what is stored redo the slide: features saved, overlays written
    features = load_config(qc_kit.config, overrides={"tiles": {"min_tissue": 0.9}, "run": {"save_features": True}})
    assert run_slides(good, qc_kit.scorer, qc_kit.calibration, features, out, report_dir)[0]["status"] == "done"
    assert read_slide(open_store(out, create=False), "good-1")["features"].shape[0] == changed[0]["n_tiles"]
    assert run_slides(good, qc_kit.scorer, qc_kit.calibration, features, out, report_dir)[0]["status"] == "skipped"
    no_overlays = load_config(qc_kit.config, overrides={"tiles": {"min_tissue": 0.9}, "run": {"overlays": False}})
    assert run_slides(good, qc_kit.scorer, qc_kit.calibration, no_overlays, out, report_dir)[0]["status"] == "done"


def test_bad_scorer_or_calibration_is_refused_before_any_slide(qc_kit, tmp_path):
    config = _config(qc_kit)
    out = tmp_path / "qc.zarr"
    with pytest.raises(ConfigError, match="does not exist"):
        run_slides(qc_kit.slides[:1], tmp_path / "no-scorer", qc_kit.calibration, config, out, tmp_path / "r")
    with pytest.raises(ConfigError, match="not found"):
        run_slides(qc_kit.slides[:1], qc_kit.scorer, tmp_path / "none.json", config, out, tmp_path / "r")
    other = json.loads(qc_kit.calibration.read_text())
    other["scorer_fingerprint"] = "0123456789abcdef"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="fingerprint 0123456789abcdef"):
        run_slides(qc_kit.slides[:1], qc_kit.scorer, tmp_path / "other.json", config, out, tmp_path / "r")
    bound = load_config(qc_kit.config, overrides={"tiles": {"size": 96}})
    with pytest.raises(ConfigError, match="tiles.size=64 but the config asks for 96"):
        run_slides(qc_kit.slides[:1], qc_kit.scorer, qc_kit.calibration, bound, out, tmp_path / "r")
    assert not out.exists() and not (tmp_path / "r").exists()  # nothing was started


def test_export_tiles_writes_kept_tiles_at_tile_mpp(faulty_run, tmp_path):
    counts = export_tiles(faulty_run["out"], tmp_path / "tiles", ["good-1"])
    root = open_store(faulty_run["out"], create=False)
    found = read_slide(root, "good-1")
    files = sorted((tmp_path / "tiles" / "good-1").glob("*.png"))
    assert counts == {"good-1": int(found["keep"].sum())} and len(files) == counts["good-1"]
    assert not (tmp_path / "tiles" / "good-2").exists()
    x, y = found["coords"][found["keep"]][0]
    with Image.open(tmp_path / "tiles" / "good-1" / f"good-1_x{x}_y{y}.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        image = np.asarray(im)
    from wsi_qc.slide import Slide

    with Slide(faulty_run["folder"] / "good-1.tif") as slide:
        assert np.array_equal(image, slide.read_region((int(x), int(y)), (64, 64), 0.5))
    assert image.std() > 5  # tissue, not background


# ---------------------------------------------------------------- odd files: names, links, permissions, no tissue

LONG = "L" * 250  # "<LONG>.tif" is a legal 254-byte file name


@pytest.fixture(scope="module")
def odd_run(qc_kit, tmp_path_factory):
    """A run over files that once aborted the batch or failed without a row, with one good slide among them."""
    from wsi_qc import slide as slide_mod

    tmp = tmp_path_factory.mktemp("odd")
    folder = tmp / "slides"
    folder.mkdir()
    for name in ("..tif", "zarr.json.tif", f"{LONG}.tif", "denied.tif"):
        os.symlink(qc_kit.slides[1], folder / name)
    os.symlink(folder / "gone.tif", folder / "dangling.tif")
    os.symlink(folder / "loop.tif", folder / "loop.tif")
    tifffile.imwrite(folder / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), tile=(256, 256),
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")  # 0.25 mpp, no tissue
    real_open = open

    def fake_open(path, *args, **kwargs):
        if Path(path).name == "denied.tif":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    out, report_dir = tmp / "qc.zarr", tmp / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slide_mod, "open", fake_open, raising=False)
        paths = collect_slides([folder], PATTERN)
        rows = run_slides(paths, qc_kit.scorer, qc_kit.calibration, _config(qc_kit), out, report_dir)
    write_run_report(rows, out, report_dir)
    return {"rows": {Path(r["path"]).name: r for r in rows}, "out": out, "report_dir": report_dir}


def test_unnamable_files_and_broken_links_fail_alone_naming_the_path(odd_run):
    rows = odd_run["rows"]
    assert set(rows) == {"..tif", "zarr.json.tif", f"{LONG}.tif", "denied.tif", "dangling.tif", "loop.tif",
                         "blank.tif"}
    for name in ("..tif", "zarr.json.tif"):
        assert rows[name]["status"] == "failed" and name in rows[name]["error"] and "rename the file" in \
            rows[name]["error"]
    assert rows["dangling.tif"]["status"] == "failed" and "which is missing" in rows["dangling.tif"]["error"]
    assert rows["loop.tif"]["status"] == "failed" and "loop of symbolic links" in rows["loop.tif"]["error"]
    assert rows["denied.tif"]["status"] == "failed" and "permission denied" in rows["denied.tif"]["error"]
    assert "damaged" not in rows["denied.tif"]["error"]
    report = pd.read_csv(odd_run["report_dir"] / "report.csv")
    assert len(report) == 7 and (report.status == "failed").sum() == 5


def test_a_long_file_name_gives_one_short_id_for_every_output(odd_run):
    row = odd_run["rows"][f"{LONG}.tif"]
    key = slide_key(LONG)
    assert row["status"] == "done" and row["slide"] == key and len(key) <= 200
    for part in (f"overlays/{key}.png", f"thumbnails/{key}.png", f"geojson/{key}.geojson"):
        assert (odd_run["report_dir"] / part).is_file(), part
    assert read_slide(open_store(odd_run["out"], create=False), key)["attrs"]["n_tiles"] == row["n_tiles"] > 0


def test_a_slide_without_tissue_is_done_with_0_tiles(odd_run):
    row = odd_run["rows"]["blank.tif"]
    assert row["status"] == "done" and row["n_tiles"] == 0, row["error"]
    found = read_slide(open_store(odd_run["out"], create=False), "blank")
    assert found["attrs"]["n_tiles"] == 0 and found["rl2"].shape == (0,) and found["coords"].shape == (0, 2)
    assert not found["tissue"].any() and not found["grid"].any()
    report = pd.read_csv(odd_run["report_dir"] / "report.csv").set_index("slide")
    assert report.loc["blank", "status"] == "done" and report.loc["blank", "n_tiles"] == 0


def test_result_config_leaves_out_only_what_does_not_change_results():
    config = load_config()
    part = result_config({**config, "scorer": {"head": "flow"}})  # a section added later is in by default
    assert "threshold" not in part and part["scorer"] == {"head": "flow"}
    assert set(part["run"]) == {"save_features", "overlays", "threads"}
    assert set(config["tiles"]) - set(part["tiles"]) == {"workers", "batch_size"}


# ---------------------------------------------------------------- the HTML report in a browser


_PROBE = """new Promise(function (done) {
  function order() {
    return Array.prototype.map.call(document.querySelectorAll('#slides tbody tr'),
                                    function (tr) { return tr.getAttribute('data-slide'); }).join('|');
  }
  var begun = performance.now();
  (function ready() {  // thumbnails get their src once in view (DEFER_JS), then decode: wait for both, up to 30 s
    var done_ = Array.prototype.every.call(document.querySelectorAll('#slides img'),
                                           function (img) { return img.getAttribute('src') && img.complete; });
    if (!done_ && performance.now() - begun < 30000) { setTimeout(ready, 50); return; }
    var out = {images: [], failedRows: document.querySelectorAll('#slides tbody tr.failed').length,
               failedText: (document.querySelector('ul.failures') || {}).textContent || '',
               shown: document.getElementById('shown').textContent};
    document.querySelectorAll('#slides img').forEach(function (img) {
      out.images.push([img.closest('tr').getAttribute('data-slide'), img.naturalWidth, img.getAttribute('src')]);
    });
    var th = document.querySelector('th[data-col="rl2_median"]');
    th.click(); out.asc = order(); th.click(); out.desc = order();
    document.querySelector('th[data-col="slide"]').click(); out.bySlide = order();
    done(out);
  })();
})"""

_SLIDE_PROBE = """new Promise(function (done) {
  var begun = performance.now();
  (function ready() {  // lazy images may decode after the load event: wait for them, up to 30 s
    var imgs = document.querySelectorAll('img');
    var all = Array.prototype.every.call(imgs, function (img) { return img.complete && img.naturalWidth > 0; });
    if (!all && performance.now() - begun < 30000) { setTimeout(ready, 50); return; }
    done(Array.prototype.map.call(imgs, function (img) { return [img.className, img.naturalWidth,
                                                                 img.getAttribute('src')]; }));
  })();
})"""


def _probe(binary: str, page: Path, script: str, profile: Path):
    """The value of `script` (a promise) in `page` opened in headless Chromium, in real time (a virtual-time
    budget can run out before the first frame on a loaded machine)."""
    browser = Chromium(binary, profile)
    try:
        return browser.evaluate(browser.open(page), script)
    finally:
        browser.close()


@pytest.mark.browser
def test_report_html_in_headless_chromium(faulty_run, tmp_path):
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    html = faulty_run["files"]["html"].read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "data:image" not in html  # linked, no CDN
    probe = _probe(binary, faulty_run["files"]["html"], _PROBE, tmp_path / "profile")

    images = {}
    for slide, width, src in probe["images"]:
        assert src == f"thumbnails/{slide}.png" and width > 0  # linked beside the page and decoded by the browser
        images[slide] = images.get(slide, 0) + 1
    assert images == {"good-1": 1, "good-2": 1}
    assert probe["shown"] == "5 of 5 slides shown"
    assert probe["failedRows"] == 3 and "no mpp" in probe["failedText"] and "empty" in probe["failedText"]
    rows = {r["slide"]: r for r in faulty_run["rows"]}
    done = sorted(("good-1", "good-2"), key=lambda s: rows[s]["rl2_median"])
    assert probe["asc"].split("|")[:2] == done and probe["desc"].split("|")[:2] == done[::-1]
    assert set(probe["asc"].split("|")[2:]) == {"broken", "empty", "nompp"}  # no value: last either way
    assert probe["bySlide"] == "broken|empty|good-1|good-2|nompp"

    slide = _probe(binary, faulty_run["report_dir"] / "slides" / "good-1.html", _SLIDE_PROBE, tmp_path / "profile2")
    kinds = [css for css, width, _ in slide if width > 0]
    assert kinds.count("figure") == 2 and kinds.count("tile") == 12  # overlay, score map, 12 worst-tile crops
    assert all(width > 0 for _, width, _ in slide)


def test_slide_pages_show_the_stores_rl2_map_when_it_has_one(faulty_run, tmp_path):
    """The default (local) scorer stores an rl2_map: the slide pages show per-position scores. A store written
    before rl2_map existed (here: a copy with the arrays removed) still gives its report, with per-tile maps."""
    assert read_slide(open_store(faulty_run["out"]), "good-2")["rl2_map"].shape[1:] == (14, 14)
    files = write_run_report(faulty_run["rows"], faulty_run["out"], tmp_path / "report")
    page = (tmp_path / "report" / "slides" / "good-2.html").read_text(encoding="utf-8")
    assert "rl2 per position" in page and "_map.jpg" in page and "hover a tile" in page
    assert len(list((tmp_path / "report" / "slides" / "good-2").glob("*_map.jpg"))) == 12
    assert files["html"] == tmp_path / "report" / "report.html"
    old = tmp_path / "old.zarr"
    shutil.copytree(faulty_run["out"], old)
    for sid in list_slides(open_store(old)):
        shutil.rmtree(old / sid / "rl2_map")
    zarr.consolidate_metadata(str(old), zarr_format=3)
    write_run_report(faulty_run["rows"], old, tmp_path / "old-report")
    plain = (tmp_path / "old-report" / "slides" / "good-2.html").read_text(encoding="utf-8")
    assert "rl2 per tile" in plain and "_map.jpg" not in plain


def test_embedded_report_is_one_file(faulty_run, tmp_path):
    for kind in ("thumbnails", "overlays"):  # what the run wrote
        shutil.copytree(faulty_run["report_dir"] / kind, tmp_path / "report" / kind)
    files = write_run_report(faulty_run["rows"], faulty_run["out"], tmp_path / "report", embed=True)
    html = files["html"].read_text(encoding="utf-8")
    assert 'src="thumbnails/' not in html and html.count('src="data:image/') >= 2 + 2 * (2 + 12)
    assert 'href="#slide-good-1"' in html and 'id="slide-good-1"' in html
    assert not (tmp_path / "report" / "slides" / "good-1.html").exists()


# ---------------------------------------------------------------- concurrent writers


@pytest.mark.slow
def test_two_worker_processes_write_one_store(qc_kit, tmp_path):
    """Two spawned workers (with reader processes) write different slides into one store at once."""
    config = load_config(qc_kit.config, overrides={"run": {"workers": 2, "overlays": False},
                                                   "tiles": {"workers": 1}})
    serial_cfg = load_config(qc_kit.config, overrides={"run": {"overlays": False}})
    rows = run_slides(qc_kit.slides, qc_kit.scorer, qc_kit.calibration, config, tmp_path / "par.zarr", tmp_path)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert len({r["peak_rss_mb"] for r in rows}) > 1  # measured per slide in the workers
    serial = run_slides(qc_kit.slides[1:3], qc_kit.scorer, qc_kit.calibration, serial_cfg, tmp_path / "ser.zarr",
                        tmp_path)
    par, ser = open_store(tmp_path / "par.zarr", create=False), open_store(tmp_path / "ser.zarr", create=False)
    assert list_slides(par) == {p.stem: "done" for p in qc_kit.slides}
    for row in serial:
        a, b = read_slide(par, row["slide"]), read_slide(ser, row["slide"])
        assert np.allclose(a["rl2"], b["rl2"], rtol=1e-5, atol=1e-6) and np.array_equal(a["coords"], b["coords"])
    consolidated = zarr.open_group(tmp_path / "par.zarr", mode="r")
    assert sorted(name for name, _ in consolidated.groups()) == sorted(p.stem for p in qc_kit.slides)


@pytest.mark.slow
def test_local_dask_cluster_runs_every_slide(qc_kit, tmp_path):
    pytest.importorskip("distributed")
    config = load_config(qc_kit.config, overrides={"run": {"workers": 2, "scheduler": "local", "overlays": False}})
    rows = run_slides(qc_kit.slides[:3], qc_kit.scorer, qc_kit.calibration, config, tmp_path / "qc.zarr", tmp_path)
    assert [r["status"] for r in rows] == ["done"] * 3 and [r["slide"] for r in rows] == ["good-0", "good-1",
                                                                                         "good-2"]
    root = open_store(tmp_path / "qc.zarr", create=False)
    assert all(read_slide(root, r["slide"])["attrs"]["n_tiles"] == r["n_tiles"] > 0 for r in rows)


def _with_a_crashing_slide(kit, folder):
    folder.mkdir()
    for i, name in enumerate(("good-0", "crash-1", "good-2", "good-3")):
        os.symlink(kit.slides[i], folder / f"{name}.tif")
    return sorted(folder.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [None, "local"])
def test_a_worker_that_dies_fails_only_its_slide(qc_kit, tmp_path, monkeypatch, scheduler):
    """--workers 2 and --scheduler local: a worker SIGKILLed on one slide gives that slide a failed row, the others
    are done, the report is written; relative paths reach the workers as absolute ones."""
    settings = contextlib.nullcontext()
    if scheduler:  # no retries of a task whose worker died, one task per worker thread at a time
        dask = pytest.importorskip("dask")
        pytest.importorskip("distributed")
        settings = dask.config.set({"distributed.scheduler.allowed-failures": 0,
                                    "distributed.scheduler.worker-saturation": 1.0})
    paths = _with_a_crashing_slide(qc_kit, tmp_path / "slides")
    monkeypatch.setattr(run_module, "qc_slide", _qc_or_die)
    monkeypatch.chdir(tmp_path)
    config = load_config(qc_kit.config, overrides={"run": {"workers": 2, "scheduler": scheduler, "overlays": False}})
    relative = [p.relative_to(tmp_path) for p in paths]
    with settings:
        rows = run_slides(relative, qc_kit.scorer, qc_kit.calibration, config, Path("qc.zarr"), Path("report"))
    assert [(r["slide"], r["status"]) for r in rows] == [("crash-1", "failed"), ("good-0", "done"),
                                                         ("good-2", "done"), ("good-3", "done")]
    assert [r["path"] for r in rows] == [str(p) for p in relative]  # as given
    assert rows[0]["error"].startswith("WorkerDied") and "died" in rows[0]["error"]
    files = write_run_report(rows, tmp_path / "qc.zarr", tmp_path / "report")
    assert "crash-1" in files["csv"].read_text()
    assert list_slides(open_store(tmp_path / "qc.zarr", create=False)) == {s: "done" for s in
                                                                          ("good-0", "good-2", "good-3")}


_DRIVER = """
import sys
from wsi_qc.config import load_config
from wsi_qc.run import run_slides
config = load_config(sys.argv[1], overrides={"run": {"workers": 2, "overlays": False}})
run_slides(sys.argv[2:-4], sys.argv[-4], sys.argv[-3], config, sys.argv[-2], sys.argv[-1])
"""


@pytest.mark.slow
def test_workers_die_with_a_parent_killed_while_they_start(qc_kit, tmp_path):
    """A run SIGKILLed while its worker processes start leaves no worker behind and no slide written."""
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    out = tmp_path / "qc.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(qc_kit.config), *map(str, qc_kit.slides),
                               str(qc_kit.scorer), str(qc_kit.calibration), str(out), str(tmp_path / "r")], env=env)
    try:
        deadline, workers = time.monotonic() + 120, []
        while time.monotonic() < deadline and driver.poll() is None:
            workers = [c for c in psutil.Process(driver.pid).children(recursive=True)
                       if "resource_tracker" not in " ".join(c.cmdline())]
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        assert len(workers) >= 2, "the run never started its workers"
    finally:
        driver.kill()  # SIGKILL while the workers import and start
        driver.wait(30)
    gone, alive = psutil.wait_procs(workers, timeout=90)
    assert not alive, f"workers outlived their killed parent: {[p.pid for p in alive]}"
    time.sleep(1)
    assert not out.exists() or list_slides(open_store(out, create=False)) == {}


def test_write_slide_groups_are_independent_of_the_root(tmp_path):
    """Slide writers never rewrite the root's zarr.json (so concurrent writers cannot clobber each other)."""
    root = open_store(tmp_path / "qc.zarr", attrs={"config": {"a": 1}})
    before = (tmp_path / "qc.zarr" / "zarr.json").read_bytes()
    for i in range(3):
        write_slide(root, f"s{i}", coords=np.zeros((2, 2), int), rl2=np.ones(2), keep=np.ones(2, bool),
                    grid=np.ones((1, 2), np.uint8), tissue=np.ones((4, 4), bool), attrs={"fingerprint": "f"})
    assert (tmp_path / "qc.zarr" / "zarr.json").read_bytes() == before



def test_discard_warning_only_when_most_tiles_score_above_the_threshold():
    assert discard_warning(np.array([1.0, 2.0, 3.0]), 2.5) == "" and discard_warning(np.array([]), 1.0) == ""
    warning = discard_warning(np.array([1.0, 3.0, 4.0]), 2.5)
    assert warning.startswith("67 % of its tiles score above the threshold") and "wsi-qc fit-reference" in warning


def test_a_slide_mostly_above_the_threshold_is_done_with_a_warning(qc_kit, tmp_path, caplog):
    calibration = json.loads(qc_kit.calibration.read_text())
    calibration["threshold"] = -1.0  # every tile scores above it
    (tmp_path / "low.json").write_text(json.dumps(calibration))
    out = tmp_path / "qc.zarr"
    with caplog.at_level("WARNING", logger="wsi_qc.run"):
        row = run_slides(qc_kit.slides[:1], qc_kit.scorer, tmp_path / "low.json", _config(qc_kit), out,
                         tmp_path / "r")[0]
    assert row["status"] == "done" and row["n_keep"] == 0
    assert row["warning"].startswith("100 % of its tiles score above the threshold")
    assert f"slide {row['slide']}: 100 % of its tiles" in caplog.text
    skipped = run_slides(qc_kit.slides[:1], qc_kit.scorer, tmp_path / "low.json", _config(qc_kit), out, tmp_path / "r")
    assert skipped[0]["status"] == "skipped" and skipped[0]["warning"] == row["warning"]  # from the store's attrs


def test_nan_scores_fail_the_slide_with_a_clear_error(qc_kit, tmp_path, monkeypatch):
    from wsi_qc.scorer import Scorer

    score_tiles = Scorer.score_tiles

    def broken(self, features, kind=None):  # a damaged network: some tiles score NaN
        scores, maps = score_tiles(self, features, kind)
        scores = scores.copy()
        scores[:1] = np.nan
        return scores, maps

    monkeypatch.setattr(Scorer, "score_tiles", broken)
    out = tmp_path / "qc.zarr"
    rows = run_slides(qc_kit.slides[1:3], qc_kit.scorer, qc_kit.calibration, _config(qc_kit), out, tmp_path / "r")
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("scored NaN or inf" in r["error"] and "ScoreError" in r["error"] for r in rows)
    assert list_slides(open_store(out, create=False)) == {}  # nothing stored as done


def test_a_slide_replaced_under_the_same_name_is_redone(qc_kit, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(qc_kit.slides[1], folder / "s.tif")
    config, out, report_dir = _config(qc_kit), tmp_path / "qc.zarr", tmp_path / "report"
    first = run_slides([folder / "s.tif"], qc_kit.scorer, qc_kit.calibration, config, out, report_dir)
    assert first[0]["status"] == "done"
    assert run_slides([folder / "s.tif"], qc_kit.scorer, qc_kit.calibration, config, out, report_dir)[0]["status"] \
        == "skipped"
    shutil.copy(qc_kit.slides[2], folder / "s.tif")  # rescanned: another file under the same name
    again = run_slides([folder / "s.tif"], qc_kit.scorer, qc_kit.calibration, config, out, report_dir)
    assert again[0]["status"] == "done"
    stored = read_slide(open_store(out, create=False), "s")
    assert stored["attrs"]["source_state"]["size"] == qc_kit.slides[2].stat().st_size
    assert stored["attrs"]["sha256_head"] == stored["attrs"]["source_state"]["head"]
    os.utime(folder / "s.tif", ns=(1, 1))  # touched (same bytes, another mtime): redone too
    assert run_slides([folder / "s.tif"], qc_kit.scorer, qc_kit.calibration, config, out, report_dir)[0]["status"] \
        == "done"


def test_a_slide_given_as_a_file_and_inside_its_folder_is_listed_once(tmp_path, monkeypatch):
    (tmp_path / "slides" / "sub").mkdir(parents=True)
    for name in ("a.tif", "sub/b.tif"):
        (tmp_path / "slides" / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    found = collect_slides([tmp_path / "slides" / "a.tif", Path("slides"), Path("slides/sub/b.tif")], PATTERN)
    assert [p.name for p in found] == ["a.tif", "b.tif"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.tif").write_bytes(b"y")
    with pytest.raises(ConfigError, match="share the id 'a'"):  # another file of the same id is still refused
        collect_slides([Path("slides"), tmp_path / "other" / "a.tif"], PATTERN)
