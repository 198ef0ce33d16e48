"""benchmarks/slide.py: a smoke run on one small slide prints every mode, step and ratio; bad --sizes are refused."""

from __future__ import annotations

import pytest

from benchmarks.slide import MODES, STEPS, main, time_beyond_encoder
from wsi_qc.errors import ConfigError


def test_smoke_run_prints_every_mode_and_ratio(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text('{"heads": {"local flow": {"test": {"overall": 0.958}}, "cascade": {"test": {"overall": 0.93}}}}')
    assert main(["--size-px", "3072", "--subset", "16", "--cache", str(tmp_path / "cache"),
                 "--qc-results", str(results)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("3072px")]
    assert [mode for mode in MODES if any(mode in row for row in rows)] == list(MODES)
    header = next(line for line in out.splitlines() if line.startswith("slide"))
    assert all(name in header for name, _ in STEPS) and "peak MiB" in header
    for text in ("single-pass tiles/s / encoder-alone tiles/s: 3072px", "cascade speed-up over single pass",
                 "peak RSS 60k slide / 10k slide", "goal: 60000 x 45000 slide <= 60 s",
                 "goal: 40000 x 40000 slide <= 30 s", "single pass (local flow) 0.958; cascade (cascade) 0.930",
                 "start: load average", "end: load average"):
        assert text in out, text
    assert any(line.startswith("3072px: single pass") and "encoder alone" in line for line in out.splitlines())
    single = next(row for row in rows if "single pass" in row).split()
    assert int(single[4]) > 0 and float(single[7]) > 0  # tiles, tiles/s ("3072px 3072x3072 single pass ...")
    assert (tmp_path / "cache" / "scorers" / "cascade" / "coarse").is_dir()


def test_time_beyond_encoder_adds_up_to_the_single_pass():
    single = {"seconds": 50.0, "encoded": 1000,
              "timings": {"encode_s": 36.0, "score_s": 8.0, "tile_s": 2.0, "report_s": 1.5}}
    line = time_beyond_encoder(single, encoder_rate=40.0)  # 25 s for the encoder alone
    assert line == ("single pass 50.0 s = encoder alone 25.0 s + encoder slowdown beside the readers 11.0 s + "
                    "flow + aggregation 8.0 s + tiling 2.0 s + report 1.5 s + other 2.5 s; "
                    "0.9x the encoder allows 27.8 s")


def test_unknown_size_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"--sizes '20k' is unknown; use some of 10k, 40k, 60k"):
        main(["--sizes", "20k"])
