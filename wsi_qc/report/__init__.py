"""What a run leaves for a person: overlays and score maps (figures, scoremap), GeoJSON of discarded tiles
(geojson), report.csv and the curation manifest (manifest), report.html with a page per slide (pages, html),
and the whole report of a run from its store (build).

The figure, table and page functions take plain numpy arrays and dicts; only `build` reads the store and slides.
"""

from wsi_qc.report.build import write_run_report
from wsi_qc.report.figures import DISCARD_COLOR, KEEP_COLOR, RL2_LABEL, overlay_png, roc_png, thumbnail_png, tiles_png
from wsi_qc.report.geojson import discarded_geojson, write_geojson
from wsi_qc.report.manifest import MANIFEST_COLUMNS, REPORT_COLUMNS, write_manifest, write_report_csv
from wsi_qc.report.pages import slide_section, write_report_html, write_slide_page
from wsi_qc.report.scoremap import score_map_png, write_tile_gallery

__all__ = [
    "DISCARD_COLOR", "KEEP_COLOR", "MANIFEST_COLUMNS", "REPORT_COLUMNS", "RL2_LABEL", "discarded_geojson",
    "overlay_png", "roc_png", "score_map_png", "slide_section", "thumbnail_png", "tiles_png", "write_geojson",
    "write_manifest", "write_report_csv", "write_report_html", "write_run_report", "write_slide_page",
    "write_tile_gallery",
]
