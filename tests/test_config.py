"""Config loading: defaults, overrides, refused unknown keys, stable fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsi_qc.config import DEFAULT_CONFIG, fingerprint, load_config
from wsi_qc.errors import ConfigError


def test_defaults_have_every_section_and_are_commented():
    config = load_config()
    assert set(config) == {"slide", "tissue", "tiles", "encoder", "flow", "score", "reference", "cascade", "threshold",
                           "run"}
    lines = [ln for ln in DEFAULT_CONFIG.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    leaf_lines = [ln for ln in lines if not ln.rstrip().endswith(":")]
    assert all("#" in ln for ln in leaf_lines), [ln for ln in leaf_lines if "#" not in ln]


def test_file_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"tiles": {"size": 128}, "flow": {"epochs": 3}}))
    config = load_config(path, overrides={"tiles": {"mpp": 1.0}})
    assert config["tiles"]["size"] == 128 and config["tiles"]["mpp"] == 1.0 and config["flow"]["epochs"] == 3
    assert config["tiles"]["overlap"] == load_config()["tiles"]["overlap"]


def test_base_key_chains_files(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"tiles": {"size": 96}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "flow": {"seed": 7}}))
    config = load_config(tmp_path / "child.yaml")
    assert config["tiles"]["size"] == 96 and config["flow"]["seed"] == 7


def test_unknown_key_is_refused_with_its_name_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"tiles": {"szie": 128}}))
    with pytest.raises(ConfigError, match=r"tiles\.szie.*typo\.yaml"):
        load_config(path)


def test_missing_or_invalid_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiles: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_fingerprint_is_stable_and_sensitive():
    a = load_config()
    b = load_config(overrides={"tiles": {"size": 256}})
    assert fingerprint(a) == fingerprint(load_config())
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a, ("flow",)) == fingerprint(b, ("flow",))


def test_paper_config_uses_the_papers_encoder():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    assert config["encoder"]["name"] == "resnet18.tv_in1k" and config["encoder"]["pooling"] == "avg"
