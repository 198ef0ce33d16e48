"""Packaging: environment.yml and pyproject.toml pin the same versions; the CLI entry point resolves."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_environment_yml_and_pyproject_pin_the_same_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = _pins(pip_section)
    assert len(pyproject) >= 30 and all(v for v in pyproject.values())
    assert conda == pyproject


def test_tiatoolbox_pin_is_the_same_in_makefile_and_environment_yml():
    make = re.search(r"tiatoolbox==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    env = re.search(r"tiatoolbox==([\w.]+)", (ROOT / "environment.yml").read_text()).group(1)
    assert make == env


def test_required_packages_are_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(project["dependencies"])
    for name in ("openslide-python", "torch", "timm", "freia", "scikit-learn", "zarr"):
        assert name in pins, name


def test_cli_entry_point_prints_version():
    out = subprocess.run([sys.executable, "-m", "wsi_qc.cli", "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"wsi-qc \d+\.\d+\.\d+\s*", out.stdout)
