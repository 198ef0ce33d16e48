"""pipelines/nuclei_study.py: config, refusal without data, paired contrasts and the printed table."""

from __future__ import annotations

import pytest

from pipelines import nuclei_study


def test_missing_data_exits_2_naming_the_folder(tmp_path, capsys):
    assert nuclei_study.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_paired_difference_of_a_constant_shift():
    a = {f"img{i}": {"aji": 0.5 + 0.01 * i} for i in range(6)}
    b = {k: {"aji": v["aji"] - 0.1} for k, v in a.items()}
    d, lo, hi = nuclei_study.paired_diff_ci(a, b, "aji", 200)
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_table_lists_rows_not_run_and_the_published_figures():
    study = nuclei_study.load_study()
    assert study["rows"][0]["levels"] == [0, 1, 2, 3] and study["rows"][1]["levels"] == [3]
    scores = {k: 0.5 for k in ("dice", "aji", "pq")} | {f"{k}_ci": (0.4, 0.6) for k in ("dice", "aji", "pq")}
    result = {"row": study["rows"][0], "train_seconds": 12.0, "test_monuseg": dict(scores),
              "test_consep": {**scores, "f1_detection": 0.7, "f1_type": {2: 0.4, 3: 0.5, 4: 0.6}}}
    text = nuclei_study.table([result], ["lite2 multi-level"], study)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[1].count("---") == lines[0].count("|") - 1
    assert "| 0.500 [0.40, 0.60] |" in lines[2] and "| 0.400 | 0.500 | 0.600 | 12 |" in lines[2]
    assert "lite2 multi-level | not run" in lines[3]
    assert "0.618 | 0.597" in lines[4] and "0.571 | 0.547" in lines[4]
