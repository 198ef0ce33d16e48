"""The report of a run, from its rows and its store: report.csv, report.html, slides/<slide>.html with the
score map and worst-tile crops (read again from the slide files), and the manifest of kept tiles."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_qc.cascade import PASSES
from wsi_qc.errors import WSIQCError
from wsi_qc.report.manifest import write_manifest, write_report_csv
from wsi_qc.report.pages import slide_section, write_report_html, write_slide_page
from wsi_qc.report.scoremap import score_map_png, write_tile_gallery
from wsi_qc.slide import Slide
from wsi_qc.store import open_store, read_slide, slide_key


def _rl2_map(root, slide_id: str) -> np.ndarray | None:
    """The slide's per-position scores (N, h, w) when the store has them (stores before rl2_map have none)."""
    group = root.get(slide_key(slide_id))
    return group["rl2_map"][...] if group is not None and "rl2_map" in group else None


def _background(report_dir: Path, slide_id: str, tissue: np.ndarray) -> np.ndarray:
    """The thumbnail PNG the run wrote for the slide, else its tissue mask in grey."""
    png = report_dir / "thumbnails" / f"{slide_id}.png"
    if png.is_file():
        with Image.open(png) as image:
            return np.asarray(image.convert("RGB"))
    return np.repeat(np.where(tissue, 190, 255).astype(np.uint8)[..., None], 3, axis=2)


def _slide_assets(found: dict, rl2_map: np.ndarray | None, report_dir: Path, slide_id: str,
                  n_worst: int) -> tuple[dict, list[dict], str, str]:
    """(images, gallery, score map caption, note) of a slide in the store; files go to slides/<slide>/."""
    attrs, folder = found["attrs"], report_dir / "slides" / slide_id
    size, tile_mpp, mpp = int(attrs["tile_size"]), float(attrs["tile_mpp"]), float(attrs["mpp"])
    overlay = report_dir / "overlays" / f"{slide_id}.png"
    images: dict[str, Path | None] = {"overlay": overlay if overlay.is_file() else None, "score_map": None}
    caption = ""
    if attrs.get("thumbnail_mpp"):
        background = _background(report_dir, slide_id, found["tissue"])
        thumb_mpp = float(attrs["thumbnail_mpp"]) * found["tissue"].shape[1] / background.shape[1]
        images["score_map"], (vmin, vmax) = score_map_png(folder / "score_map.png", background, thumb_mpp, mpp,
                                                          found["coords"], size * tile_mpp / mpp, found["rl2"],
                                                          rl2_map)
        caption = (f"rl2 {'per position' if rl2_map is not None else 'per tile'}, inferno scale: "
                   f"dark {vmin:.4g} to bright {vmax:.4g} (99th percentile) and above")
    try:
        with Slide(attrs["source"], mpp=mpp) as slide:
            gallery = write_tile_gallery(folder, lambda x, y: slide.read_region((x, y), (size, size), tile_mpp),
                                         found["coords"], found["rl2"], rl2_map, n_worst)
        note = ""
        if "pass" in found:  # a cascade run: which pass decided each worst tile
            index = {(int(x), int(y)): i for i, (x, y) in enumerate(found["coords"])}
            for item in gallery:
                item["pass"] = PASSES[int(found["pass"][index[item["x"], item["y"]]])]
    except (OSError, WSIQCError) as exc:  # moved or unreadable slide: the rest of the page is still useful
        gallery, note = [], f"worst tiles not shown: {attrs['source']} cannot be read ({exc})"
    return images, gallery, caption, note


def write_run_report(rows: Sequence[Mapping[str, Any]], out: str | os.PathLike, report_dir: str | os.PathLike, *,
                     embed: bool = False, n_worst: int = 12) -> dict[str, Path]:
    """report.csv, report.html, a page per slide (slides/<slide>.html, images beside it) and the manifest.

    With ``embed`` the slide pages are sections of report.html and every image is a data URI: one
    self-contained file, for a handful of slides.
    """
    report_dir = Path(report_dir)
    root = open_store(out)
    summary = report_dir / "report.html"
    thumbnails, pages, sections, records = {}, {}, {}, []
    for row in rows:
        slide_id = row["slide"]
        if (report_dir / "thumbnails" / f"{slide_id}.png").is_file():
            thumbnails[slide_id] = {"thumbnail": report_dir / "thumbnails" / f"{slide_id}.png"}
        images, gallery, caption, note = {}, [], "", ""
        if row["status"] != "failed":
            found = read_slide(root, slide_id)
            records.append({"slide": slide_id, "path": row["path"], "coords": found["coords"],
                            "keep": found["keep"], "rl2": found["rl2"], "mpp": found["attrs"]["tile_mpp"],
                            "size": found["attrs"]["tile_size"]})
            images, gallery, caption, note = _slide_assets(found, _rl2_map(root, slide_id), report_dir, slide_id,
                                                           n_worst)
        if embed:
            sections[slide_id] = slide_section(row, images, gallery, report_dir, embed=True, score_caption=caption,
                                               note=note)
        else:
            pages[slide_id] = write_slide_page(report_dir / "slides" / f"{slide_id}.html", row, images, gallery,
                                               report=summary, score_caption=caption, note=note)
    csv_path = write_report_csv(report_dir / "report.csv", rows)
    html_path = write_report_html(summary, rows, thumbnails, title=f"wsi-qc report: {Path(out).name}", embed=embed,
                                  slide_pages=pages, sections=sections)
    manifest_csv, manifest_parquet = write_manifest(report_dir / "manifest", records)
    return {"csv": csv_path, "html": html_path, "manifest_csv": manifest_csv, "manifest_parquet": manifest_parquet}
