"""`wsi-qc` from the command line: exit codes, a run killed with SIGKILL and resumed, tile export, Dask, quiet logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_tile_folder
from wsi_qc import cli
from wsi_qc.store import list_slides, locked, open_store, read_slide

ROOT = Path(__file__).resolve().parents[1]


def _folder(kit, path: Path, bad: bool = False) -> Path:
    path.mkdir(parents=True)
    for slide in kit.slides:
        os.symlink(slide, path / slide.name)
    if bad:
        (path / "broken.svs").write_bytes(b"II*\x00" + os.urandom(500))
        (path / "empty.svs").write_bytes(b"")
    return path


def _run_args(kit, inputs, out, *extra) -> list[str]:
    config = kit.root / "no-overlays.yaml"  # overlay PNGs are tested in test_run.py; here they only cost time
    if not config.exists():
        config.write_text(f"base: {kit.config.name}\nrun: {{overlays: false}}\n")
    return ["run", *map(str, inputs), "--config", str(config), "--scorer", str(kit.scorer),
            "--calibration", str(kit.calibration), "--out", str(out), *extra]


def _done(store: Path) -> set[str]:
    """Slides marked done, read from the files (the store may be mid-write)."""
    done = set()
    for meta in store.glob("*/zarr.json"):
        try:
            if json.loads(meta.read_text()).get("attributes", {}).get("status") == "done":
                done.add(meta.parent.name)
        except (OSError, ValueError):
            pass
    return done


@pytest.fixture(scope="module")
def reference_run(qc_kit, tmp_path_factory):
    """An uninterrupted CLI run over the four good slides (exit code 0)."""
    tmp = tmp_path_factory.mktemp("cli_ref")
    folder = _folder(qc_kit, tmp / "slides")
    code = cli.main(_run_args(qc_kit, [folder], tmp / "ref.zarr", "--export-tiles", str(tmp / "tiles")))
    return {"code": code, "folder": folder, "out": tmp / "ref.zarr", "tiles": tmp / "tiles"}


def test_all_done_exits_0_and_exports_kept_tiles(reference_run, capsys):
    assert reference_run["code"] == 0
    root = open_store(reference_run["out"], create=False)
    assert list_slides(root) == {f"good-{i}": "done" for i in range(4)}
    for sid in list_slides(root):
        n_keep = int(read_slide(root, sid)["keep"].sum())
        assert len(list((reference_run["tiles"] / sid).glob("*.png"))) == n_keep > 0
    report = pd.read_csv(reference_run["out"].with_name("ref-report") / "report.csv")
    assert list(report.status) == ["done"] * 4


def test_failed_slides_exit_1_and_good_ones_finish(qc_kit, tmp_path, capsys):
    folder = _folder(qc_kit, tmp_path / "slides", bad=True)
    for slide in qc_kit.slides[1:]:  # keep it short: one good slide, two bad ones
        (folder / slide.name).unlink()
    code = cli.main(_run_args(qc_kit, [folder], tmp_path / "qc.zarr", "--report", str(tmp_path / "rep")))
    assert code == 1
    out = capsys.readouterr().out
    assert "1 of 3 slides done" in out and "empty (0 bytes)" in out
    report = pd.read_csv(tmp_path / "rep" / "report.csv").set_index("slide")
    assert report.status.to_dict() == {"broken": "failed", "empty": "failed", "good-0": "done"}
    assert report.loc["broken", "traceback"].startswith("Traceback")


def test_bad_config_scorer_or_calibration_exit_2_before_any_slide(qc_kit, tmp_path, capsys):
    folder = _folder(qc_kit, tmp_path / "slides")
    out = tmp_path / "qc.zarr"
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("tiles: {sise: 64}\n")
    args = _run_args(qc_kit, [folder], out)
    cases = {
        "config": [*args[:2], "--config", str(bad_config), *args[4:]],  # a misspelt key
        "scorer": [a if a != str(qc_kit.scorer) else str(tmp_path / "no-scorer") for a in args],
        "calibration": [a if a != str(qc_kit.calibration) else str(tmp_path / "none.json") for a in args],
        "no slides": _run_args(qc_kit, [tmp_path / "empty-folder"], out),
    }
    (tmp_path / "empty-folder").mkdir()
    messages = {}
    for name, argv in cases.items():
        assert cli.main(argv) == 2, name
        messages[name] = capsys.readouterr().err
        assert not out.exists(), f"{name}: a store was created"  # refused before any slide
    assert "sise" in messages["config"]
    assert "no-scorer does not exist" in messages["scorer"] and "Traceback" not in messages["scorer"]
    assert "none.json not found" in messages["calibration"]
    assert "no slides found" in messages["no slides"]


def test_run_killed_with_sigkill_then_rerun_equals_uninterrupted(qc_kit, reference_run, tmp_path):
    out = tmp_path / "killed.zarr"
    argv = [sys.executable, "-m", "wsi_qc.cli", *_run_args(qc_kit, [reference_run["folder"]], out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while not _done(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_at_kill = _done(out)
    assert proc.returncode == -signal.SIGKILL and 1 <= len(done_at_kill) < 4

    assert cli.main(_run_args(qc_kit, [reference_run["folder"]], out)) == 0
    report = pd.read_csv(out.with_name("killed-report") / "report.csv").set_index("slide")
    assert {s for s in report.index if report.loc[s, "status"] == "skipped"} == done_at_kill
    resumed, ref = open_store(out, create=False), open_store(reference_run["out"], create=False)
    assert list_slides(resumed) == list_slides(ref)
    for sid in list_slides(ref):
        a, b = read_slide(resumed, sid), read_slide(ref, sid)
        assert np.array_equal(a["coords"], b["coords"]) and np.array_equal(a["grid"], b["grid"])
        assert np.allclose(a["rl2"], b["rl2"], rtol=1e-5, atol=1e-6)
        assert np.array_equal(a["keep"], b["keep"]) and np.array_equal(a["tissue"], b["tissue"])


def _same_store(got: Path, ref: Path, exact: bool = False) -> None:
    a_root, b_root = open_store(got, create=False), open_store(ref, create=False)
    assert list_slides(a_root) == list_slides(b_root)
    for sid in list_slides(b_root):
        a, b = read_slide(a_root, sid), read_slide(b_root, sid)
        for name in ("coords", "grid", "keep", "tissue"):
            assert np.array_equal(a[name], b[name]), (sid, name)
        if exact:
            assert np.array_equal(a["rl2"], b["rl2"]), sid
        else:
            assert np.allclose(a["rl2"], b["rl2"], rtol=1e-5, atol=1e-6), sid


def _cli(kit, inputs, out, *extra, env=None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "wsi_qc.cli", *_run_args(kit, inputs, out, *extra)]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _lock_wait_config(kit, seconds: float) -> Path:
    path = kit.root / f"lock-wait-{seconds:g}.yaml"
    path.write_text(f"base: {kit.config.name}\nrun: {{overlays: false, lock_wait: {seconds}}}\n")
    return path


def test_a_second_run_on_a_locked_store_exits_2_naming_the_holder_then_waits(qc_kit, reference_run, tmp_path):
    out = tmp_path / "qc.zarr"
    with locked(out):  # this process holds the store, as a running `wsi-qc run` would
        refused = _cli(qc_kit, [reference_run["folder"]], out, "--config", str(_lock_wait_config(qc_kit, 0)))
        _, err = refused.communicate(timeout=180)
        waiting = _cli(qc_kit, [reference_run["folder"]], out, "--config", str(_lock_wait_config(qc_kit, 300)),
                       "--tile-mpp", "0.5", "--size", "64")  # the README's tile options, as for `tiles`
        time.sleep(3)
        assert waiting.poll() is None and not out.exists()  # it waits for the lock, writing nothing
    assert refused.returncode == 2 and "Traceback" not in err, err
    assert f"in use by another wsi-qc run (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert not out.exists()  # refused before touching the store
    _, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    _same_store(out, reference_run["out"])


@pytest.mark.slow
def test_two_runs_on_one_store_one_waits_and_the_store_equals_an_uninterrupted_run(qc_kit, reference_run,
                                                                                     tmp_path):
    out = tmp_path / "qc.zarr"
    wait = str(_lock_wait_config(qc_kit, 600))
    runs = [_cli(qc_kit, [reference_run["folder"]], out, "--config", wait, "--report", str(tmp_path / f"r{i}"))
            for i in range(2)]
    for proc in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    statuses = sorted(tuple(pd.read_csv(tmp_path / f"r{i}" / "report.csv").status.unique()) for i in range(2))
    assert statuses == [("done",), ("skipped",)]  # the second run waited for the first, then found all done
    _same_store(out, reference_run["out"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


@pytest.mark.slow
def test_masks_are_identical_for_any_worker_or_thread_count(qc_kit, reference_run, tmp_path):
    """--workers 2 (one thread per core before), OMP_NUM_THREADS=1 and the in-process run give the same bits."""
    procs = {"workers2": _cli(qc_kit, [reference_run["folder"]], tmp_path / "w2.zarr", "--workers", "2")}
    _, err = procs["workers2"].communicate(timeout=600)
    assert procs["workers2"].returncode == 0, err
    procs["omp1"] = _cli(qc_kit, [reference_run["folder"]], tmp_path / "omp1.zarr",
                         env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    _, err = procs["omp1"].communicate(timeout=600)
    assert procs["omp1"].returncode == 0, err
    for name in ("w2", "omp1"):
        _same_store(tmp_path / f"{name}.zarr", reference_run["out"], exact=True)


@pytest.mark.slow
def test_run_against_a_dask_scheduler_address(qc_kit, reference_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        code = cli.main(_run_args(qc_kit, [reference_run["folder"]], tmp_path / "dask.zarr", "--scheduler", address))
        assert code == 0
        # the scheduler is not in the fingerprint: resuming the reference store under it redoes nothing
        shutil.copytree(reference_run["out"], tmp_path / "resumed.zarr")
        resumed = _run_args(qc_kit, [reference_run["folder"]], tmp_path / "resumed.zarr", "--scheduler", address)
        assert cli.main([*resumed, "--report", str(tmp_path / "resumed")]) == 0
    assert set(pd.read_csv(tmp_path / "resumed" / "report.csv").status) == {"skipped"}
    _same_store(tmp_path / "dask.zarr", reference_run["out"], exact=True)  # the same bits as a local run


def test_commands_are_quiet_unless_verbose(tmp_path):
    """Third-party loading chatter (timm's checkpoint INFO lines) stays off stderr by default, back with -v."""
    tiles = write_tile_folder(tmp_path / "tiles", n=24)
    config = tmp_path / "tiny.yaml"
    config.write_text("tiles: {size: 64}\nencoder: {device: cpu}\n"
                      "flow: {epochs: 1, n_blocks: 1, hidden: 16, min_reference: 20, device: cpu}\n")
    argv = [sys.executable, "-m", "wsi_qc.cli", "fit-reference", str(tiles), "--config", str(config)]
    quiet = subprocess.run([*argv, "--out", str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 0, quiet.stderr
    assert "reference: 24 tiles" in quiet.stdout
    assert quiet.stderr == ""
    loud = subprocess.run([*argv[:3], "-v", *argv[3:], "--out", str(tmp_path / "b")], capture_output=True, text=True,
                          cwd=ROOT)
    assert loud.returncode == 0, loud.stderr
    assert "INFO timm" in loud.stderr


def test_run_refuses_a_calibration_of_another_score_kind_before_any_slide(qc_kit, tmp_path, capsys):
    config = tmp_path / "nll.yaml"
    config.write_text(f"base: {qc_kit.config}\nscore: {{kind: nll}}\nrun: {{overlays: false}}\n")
    code = cli.main(["run", str(qc_kit.slides[1]), "--config", str(config), "--scorer", str(qc_kit.scorer),
                     "--calibration", str(qc_kit.calibration), "--out", str(tmp_path / "qc.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "'kind': 'rl2'" in err and "'kind': 'nll'" in err and "recalibrate" in err
    assert not (tmp_path / "qc.zarr").exists()  # refused before the store or any slide was touched
