"""Kept for old commands: `python -m pipelines.make_calibration_set ARGS` runs `wsi-qc make-calibration-set ARGS`
(the logic lives in wsi_qc.calibration_set)."""

from __future__ import annotations

import sys

from wsi_qc import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["make-calibration-set", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
