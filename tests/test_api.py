"""The README's Python example, executed as written on generated slides (the default config)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import zarr

import wsi_qc.calibrate  # noqa: F401  (imported first, as in a full test run: the API must not be shadowed by it)
from wsi_qc.data import write_example_slide

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- api-example --> python block"
    return block.group(1)


def test_readme_example_has_five_lines_and_runs(tmp_path, monkeypatch):
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 5
    for i in range(2):
        write_example_slide(tmp_path / "good" / f"good-{i}.tif", size=(8192, 8192), mpp=0.25, seed=10 + i)
    write_example_slide(tmp_path / "slide.tif", size=(4096, 4096), mpp=0.25, seed=12)
    write_example_slide(tmp_path / "slides" / "new-1.tif", size=(2048, 2048), mpp=0.25, seed=13)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    tiles, rows = namespace["tiles"], namespace["rows"]
    assert list(tiles.columns) == ["slide", "x", "y", "rl2", "nll"] and len(tiles) >= 5
    assert np.isfinite(tiles["rl2"]).all()
    assert [r["status"] for r in rows] == ["done"]
    group = zarr.open_group(tmp_path / "qc.zarr", mode="r")["new-1"]
    assert group["rl2_map"].shape == (group["rl2"].shape[0], 14, 14)  # the default scorer is local
    assert (tmp_path / "qc-report" / "report.html").is_file()
