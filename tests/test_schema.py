"""Config schema: every key typed from its default, ranges and choices, refused before any slide (exit 2)."""

from __future__ import annotations

import re

import pytest
import yaml

from wsi_qc import cli, config as config_mod, threshold
from wsi_qc.config import load_config
from wsi_qc.errors import ConfigError


@pytest.mark.parametrize("override, match", [
    ({"tiles": {"overlap": -4}}, r"tiles.overlap=-4 in .* out of range; allowed: an integer >= 0"),
    ({"tiles": {"overlap": 224}}, r"tiles.overlap=224 must be smaller than tiles.size=224"),
    ({"tiles": {"min_tissue": 1.5}}, r"tiles.min_tissue=1.5 .* allowed: a number >= 0 and <= 1"),
    ({"tiles": {"workers": -1}}, r"tiles.workers=-1 .* an integer >= 0"),
    ({"tiles": {"batch_size": "64"}}, r"tiles.batch_size='64' .* is a str, not an integer"),
    ({"tiles": {"batch_size": 0}}, r"tiles.batch_size=0 .* an integer >= 1"),
    ({"tiles": {"size": 64.0}}, r"tiles.size=64.0 .* is a float, not an integer"),
    ({"tissue": {"method": "magic"}}, r"tissue.method='magic' .* one of otsu_saturation, otsu_od"),
    ({"tissue": {"thumbnail_mpp": -8}}, r"tissue.thumbnail_mpp=-8 .* a number > 0"),
    ({"slide": {"mpp_fallback": -1}}, r"slide.mpp_fallback=-1 .* a number > 0 or null"),
    ({"slide": {"mpp": float("nan")}}, r"slide.mpp=nan .* is not finite"),
    ({"run": {"workers": "two"}}, r"run.workers='two' .* is a str, not an integer"),
    ({"run": {"save_features": "no"}}, r"run.save_features='no' .* is a str, not true/false"),
    ({"run": {"overlays": 1}}, r"run.overlays=1 .* not true/false"),
    ({"run": {"scheduler": 5}}, r"run.scheduler=5 .* a string or null"),
    ({"encoder": {"pooling": "max"}}, r"encoder.pooling='max' .* one of avg, grid2"),
    ({"encoder": {"levels": "0,1"}}, r"encoder.levels='0,1' .* a list or null"),
    ({"flow": {"val_fraction": 1.0}}, r"flow.val_fraction=1.0 .* > 0 and < 1"),
    ({"score": {"kind": "anomaly"}}, r"score.kind='anomaly' .* one of rl2, nll"),
    ({"threshold": {"rule": "bogus"}}, r"threshold.rule='bogus' .* one of youden, fpr, tpr, fixed"),
    ({"threshold": {"n_bootstrap": "many"}}, r"threshold.n_bootstrap='many' .* not an integer"),
])
def test_bad_values_are_refused_naming_key_value_source_and_allowed(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=override)


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("tiles: {batch_size: '64'}\n")
    with pytest.raises(ConfigError, match=rf"tiles.batch_size='64' in {path} .* fix it in {path} \(default 64\)"):
        load_config(path)


def test_good_values_pass_ints_for_floats_and_nulls_where_allowed():
    config = load_config(overrides={"tissue": {"thumbnail_mpp": 16}, "slide": {"mpp": 0.25, "mpp_fallback": None},
                                    "encoder": {"levels": None}, "flow": {"pca_dim": 32},
                                    "threshold": {"rule": "fixed", "value": 2}, "run": {"scheduler": "local"}})
    assert config["tissue"]["thumbnail_mpp"] == 16 and config["encoder"]["levels"] is None


def test_new_keys_are_typed_from_their_default_and_new_choices_need_no_schema_edit(tmp_path, monkeypatch):
    defaults = yaml.safe_load(config_mod.DEFAULT_CONFIG.read_text())
    defaults["scorer"] = {"head": "flow", "k": 5, "shrink": 0.1, "robust": False}  # another engineer's section
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(defaults))
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG", path)
    assert load_config(overrides={"scorer": {"k": 7, "shrink": 1}})["scorer"]["k"] == 7
    for bad, match in (({"k": "7"}, "scorer.k='7' .* not an integer"), ({"shrink": "x"}, "not a number"),
                       ({"robust": "yes"}, "not true/false"), ({"head": 3}, "not a string")):
        with pytest.raises(ConfigError, match=match):
            load_config(overrides={"scorer": bad})
    monkeypatch.setattr(threshold, "RULES", (*threshold.RULES, "fdr"))
    assert load_config(overrides={"threshold": {"rule": "fdr"}})["threshold"]["rule"] == "fdr"


@pytest.mark.parametrize("argv, match", [
    (["--mpp", "-1"], "slide.mpp=-1.0 in the command-line options is out of range"),
    (["--mpp", "nan"], "slide.mpp=nan in the command-line options is not finite"),
    (["--workers", "0"], "run.workers=0 in the command-line options is out of range"),
    (["--size", "-5"], "tiles.size=-5"),
])
def test_cli_refuses_bad_options_with_exit_2_before_any_slide(tmp_path, capsys, argv, match):
    out = tmp_path / "qc.zarr"
    code = cli.main(["run", str(tmp_path), "--scorer", "s", "--calibration", "c.json", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert re.search(match, err), err


def test_cli_refuses_a_bad_config_file_with_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run: {workers: two}\n")
    code = cli.main(["run", str(tmp_path), "--config", str(path), "--scorer", "s", "--calibration", "c.json",
                     "--out", str(tmp_path / "qc.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and f"run.workers='two' in {path}" in err and "Traceback" not in err
