"""Shared fixtures: real slides from ../shared/data/slides (skipped when absent) and generated slides."""

from __future__ import annotations

from pathlib import Path

import pytest

SLIDES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    if not (SLIDES_DIR / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"real slides not found at {SLIDES_DIR} (only present beside a wsi-qc checkout in ../shared)")
    return SLIDES_DIR
