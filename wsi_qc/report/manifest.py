"""Tables a run leaves: report.csv (one row per slide) and the curation manifest of kept tiles (CSV + Parquet)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_qc.report.inputs import tile_arrays

REPORT_COLUMNS = (
    "slide", "path", "status", "error", "warning", "n_tiles", "n_keep", "kept_pct",
    "rl2_median", "rl2_p95", "seconds",
)
MANIFEST_COLUMNS = ("slide", "x", "y", "mpp", "size", "rl2")


def report_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """REPORT_COLUMNS, then every other key of the rows in the order first seen."""
    columns = list(REPORT_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_report_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write report.csv: one row per slide, the standard columns first, then any extra keys."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows), columns=report_columns(rows)).to_csv(path, index=False)
    return path


def write_manifest(path_prefix: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write the curation manifest of kept tiles as ``<prefix>.csv`` and ``<prefix>.parquet``.

    Each record is one slide: ``slide``, ``coords`` (N, 2) level-0 x, y, ``keep`` (N,), ``rl2`` (N,),
    ``mpp`` and ``size`` (the tile's mpp and side in pixels), optionally ``path`` (the slide file,
    added as a column). Returns (csv path, parquet path).
    """
    import pandas as pd

    frames = []
    with_path = False
    for rec in records:
        coords, keep, rl2 = tile_arrays(rec["coords"], rec["keep"], rec["rl2"])
        kept = coords[keep]
        frame = pd.DataFrame({
            "slide": pd.Series([str(rec["slide"])] * len(kept), dtype="string"),
            "x": kept[:, 0].astype(np.int64),
            "y": kept[:, 1].astype(np.int64),
            "mpp": np.full(len(kept), float(rec["mpp"])),
            "size": np.full(len(kept), int(rec["size"]), dtype=np.int32),
            "rl2": rl2[keep].astype(np.float32),
        })
        if rec.get("path") is not None:
            with_path = True
            frame["path"] = pd.Series([str(rec["path"])] * len(kept), dtype="string")
        frames.append(frame)
    empty = pd.DataFrame({
        "slide": pd.Series([], dtype="string"), "x": np.zeros(0, np.int64), "y": np.zeros(0, np.int64),
        "mpp": np.zeros(0), "size": np.zeros(0, np.int32), "rl2": np.zeros(0, np.float32),
    })
    table = pd.concat([empty, *frames], ignore_index=True) if frames else empty
    table = table[list(MANIFEST_COLUMNS) + (["path"] if with_path else [])]
    if with_path:
        table["path"] = table["path"].astype("string")
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path = prefix.with_name(prefix.name + ".csv")
    parquet_path = prefix.with_name(prefix.name + ".parquet")
    table.to_csv(csv_path, index=False)
    table.to_parquet(parquet_path, engine="pyarrow", index=False)
    return csv_path, parquet_path
