"""Store: zarr v3 layout read back with plain zarr, refusing foreign paths, done-last, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
import warnings

import numpy as np
import pytest
import zarr

from wsi_qc import __version__
from wsi_qc.errors import ConfigError
from wsi_qc.store import (StoreLocked, consolidate, list_slides, locked, open_store, read_slide, remove_slide,
                          slide_done, slide_key, tidy, write_slide)


def slide_arrays(n: int = 37, seed: int = 0, d: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    rl2 = rng.random(n).astype(np.float32)
    keep = rl2 <= 0.6
    grid = np.zeros((7, 9), np.uint8)
    grid.flat[:n] = np.where(keep, 1, 2)
    out = {"coords": rng.integers(0, 50_000, (n, 2)).astype(np.int64),  # any integer dtype is stored as int32
           "rl2": rl2, "keep": keep, "grid": grid, "tissue": rng.random((20, 30)) > 0.5}
    if d:
        out["features"] = rng.random((n, d)).astype(np.float32)
    return out


def attrs_for(fp: str = "fp1", n: int = 37) -> dict:
    return {"source": "/data/a.svs", "sha256_head": "ab" * 32, "mpp": np.float64(0.2527), "tile_size": 224,
            "tile_mpp": 1.0, "n_tiles": n, "n_keep": np.int64(20), "fingerprint": fp,
            "timings": {"total_s": 1.5}}


def test_round_trip_with_plain_zarr(tmp_path):
    path = tmp_path / "qc.zarr"
    root = open_store(path, attrs={"config": {"tiles": {"size": 224}}, "auc": 0.91})
    a = slide_arrays(d=16)
    write_slide(root, "slide A.svs", **a, attrs=attrs_for())

    plain = zarr.open_group(path, mode="r")
    assert plain.metadata.zarr_format == 3
    assert plain.attrs["wsi_qc"] == {"version": __version__, "config": {"tiles": {"size": 224}}, "auc": 0.91}
    g = plain["slide_A.svs"]
    expect = {"coords": (np.int32, (37, 2)), "rl2": (np.float32, (37,)), "keep": (np.bool_, (37,)),
              "grid": (np.uint8, (7, 9)), "tissue": (np.bool_, (20, 30)), "features": (np.float32, (37, 16))}
    for name, (dtype, shape) in expect.items():
        arr = g[name]
        assert arr.dtype == dtype and arr.shape == shape, name
        np.testing.assert_array_equal(arr[...], a[name])
    assert g["grid"].metadata.dimension_names == ("y", "x")
    assert g["tissue"].metadata.dimension_names == ("y", "x")
    assert g.attrs["status"] == "done" and g.attrs["fingerprint"] == "fp1"
    assert g.attrs["mpp"] == 0.2527 and g.attrs["n_keep"] == 20 and g.attrs["timings"] == {"total_s": 1.5}

    got = read_slide(open_store(path, create=False), "slide A.svs")
    assert set(got) == set(expect) | {"attrs"}
    np.testing.assert_array_equal(got["rl2"], a["rl2"])
    assert got["coords"].dtype == np.int32 and got["attrs"]["source"] == "/data/a.svs"
    assert list_slides(root) == {"slide_A.svs": "done"}


def test_empty_slide_round_trip(tmp_path):
    root = open_store(tmp_path / "qc.zarr")
    write_slide(root, "blank", coords=np.zeros((0, 2), int), rl2=np.zeros(0, np.float32), keep=np.zeros(0, bool),
                grid=np.zeros((3, 3), np.uint8), tissue=np.zeros((10, 10), bool), attrs=attrs_for(n=0))
    got = read_slide(root, "blank")
    assert got["coords"].shape == (0, 2) and got["rl2"].shape == (0,) and "features" not in got
    assert slide_done(root, "blank", "fp1")


def test_open_store_refuses_what_is_not_a_store(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    full_dir = tmp_path / "dir"
    full_dir.mkdir()
    (full_dir / "notes.txt").write_text("x")
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w", attributes={"other": 1})
    an_array = tmp_path / "array.zarr"
    zarr.create_array(an_array, data=np.zeros(3))
    for path in (a_file, full_dir, foreign, an_array):
        with pytest.raises(ConfigError) as err:
            open_store(path)
        assert str(path) in str(err.value) and "choose another --out or remove it" in str(err.value)
    assert (full_dir / "notes.txt").read_text() == "x"  # nothing touched
    assert dict(zarr.open_group(foreign, mode="r").attrs) == {"other": 1}

    with pytest.raises(ConfigError, match="no wsi-qc store"):
        open_store(tmp_path / "missing.zarr", create=False)
    assert not (tmp_path / "missing.zarr").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "wsi_qc" in open_store(empty).attrs  # an empty directory becomes a store


def test_root_attrs_update_keeps_slides(tmp_path):
    path = tmp_path / "qc.zarr"
    write_slide(open_store(path), "s1", **slide_arrays(), attrs=attrs_for())
    root = open_store(path, attrs={"threshold": {"threshold": 0.6}, "auc": 0.8})
    root = open_store(path, attrs={"auc": 0.9})
    assert root.attrs["wsi_qc"] == {"version": __version__, "threshold": {"threshold": 0.6}, "auc": 0.9}
    assert list_slides(root) == {"s1": "done"} and slide_done(root, "s1", "fp1")


def test_done_requires_status_and_fingerprint(tmp_path):
    root = open_store(tmp_path / "qc.zarr")
    assert not slide_done(root, "s1", "fp1")  # absent
    partial = root.create_group("s1", attributes={"fingerprint": "fp1", "n_tiles": 5})
    partial.create_array("rl2", data=np.ones(5, np.float32))
    assert not slide_done(root, "s1", "fp1")  # arrays but no status "done"
    assert list_slides(root) == {"s1": "unknown"}

    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for("fp1"))  # replaces the stale group
    assert slide_done(root, "s1", "fp1")
    assert not slide_done(root, "s1", "fp2")
    assert read_slide(root, "s1")["rl2"].shape == (37,)

    write_slide(root, "s1", **slide_arrays(n=5), attrs={**attrs_for("fp2", 5), "status": "writing"})
    assert slide_done(root, "s1", "fp2") and not slide_done(root, "s1", "fp1")  # status is always set by the store
    assert read_slide(root, "s1")["coords"].shape == (5, 2)


def test_bad_arrays_are_refused_before_anything_is_deleted(tmp_path):
    root = open_store(tmp_path / "qc.zarr")
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for())
    a = slide_arrays()
    bad = [({**a, "keep": a["keep"][:-1]}, "keep has 36 rows but rl2 has 37"),
           ({**a, "coords": a["coords"][:, :1]}, r"coords must have shape \(N, 2\)"),
           ({**a, "keep": a["keep"].astype(np.uint8)}, "keep must be a 1-d array"),
           ({**a, "grid": a["grid"].astype(float)}, "grid must be a 2-d array"),
           ({**a, "coords": a["coords"] + 2**40}, "do not fit int32"),
           ({**a, "features": np.zeros((3, 4), np.float32)}, "features has 3 rows")]
    for arrays, match in bad:
        with pytest.raises(ConfigError, match=match):
            write_slide(root, "s1", **arrays, attrs=attrs_for())
    with pytest.raises(ConfigError, match="JSON-able"):
        write_slide(root, "s1", **a, attrs={"fingerprint": object()})
    assert slide_done(root, "s1", "fp1")


def test_slide_key_list_and_remove(tmp_path):
    assert slide_key("TCGA-AA 01:02/x.svs") == "TCGA-AA_01_02_x.svs"
    assert slide_key("__hidden") == "_hidden"
    assert slide_key("ok-1.2_3") == "ok-1.2_3"
    for bad in ("", "..", "zarr.json"):
        with pytest.raises(ConfigError, match="rename the slide file"):
            slide_key(bad)
    root = open_store(tmp_path / "qc.zarr")
    for sid in ("b", "a"):
        write_slide(root, sid, **slide_arrays(), attrs=attrs_for())
    assert list_slides(root) == {"a": "done", "b": "done"}
    remove_slide(root, "a")
    remove_slide(root, "never-written")
    assert list_slides(root) == {"b": "done"}
    assert not (tmp_path / "qc.zarr" / "a").exists()
    with pytest.raises(ConfigError, match="'a' is not in the store"):
        read_slide(root, "a")


def _writer(path: str, ids: list[str], barrier) -> None:
    root = open_store(path)
    barrier.wait()
    for sid in ids:
        write_slide(root, sid, **slide_arrays(n=3000, seed=int(sid[-1]), d=64), attrs=attrs_for(f"fp-{sid}", 3000))


def test_two_processes_write_different_slides_at_once(tmp_path):
    path = tmp_path / "qc.zarr"
    open_store(path, attrs={"auc": 0.5})
    root_json = (path / "zarr.json").read_bytes()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(path), ids, barrier)) for ids in (["s0", "s1"], ["s2", "s3"])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (path / "zarr.json").read_bytes() == root_json  # slide writers never rewrite the root
    root = open_store(path, create=False)
    assert list_slides(root) == {f"s{i}": "done" for i in range(4)}
    for i in range(4):
        assert slide_done(root, f"s{i}", f"fp-s{i}")
        want = slide_arrays(n=3000, seed=i, d=64)
        got = read_slide(root, f"s{i}")
        for name in ("coords", "rl2", "keep", "features"):
            np.testing.assert_array_equal(got[name], want[name])


def _slow_writer(path: str) -> None:
    write_slide(open_store(path), "big", **slide_arrays(n=60_000, d=256), attrs=attrs_for())


def test_killed_writer_leaves_no_visible_group(tmp_path):
    path = tmp_path / "qc.zarr"
    open_store(path)
    proc = multiprocessing.get_context("spawn").Process(target=_slow_writer, args=(str(path),))
    proc.start()
    deadline = time.monotonic() + 60
    while not list(path.glob(".big.tmp-*/rl2/zarr.json")) and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through the array writes
    proc.join(10)
    assert list(path.glob(".big.tmp-*")), "the writer never created its temporary group"
    root = open_store(path, create=False)
    assert list_slides(root) == {} and not slide_done(root, "big", "fp1")
    assert [p.name for p in tidy(path)] == [f".big.tmp-{proc.pid}"]
    write_slide(root, "big", **slide_arrays(), attrs=attrs_for())  # a rerun writes it
    assert slide_done(root, "big", "fp1") and read_slide(root, "big")["rl2"].shape == (37,)


def _plain_groups(path) -> list[str]:
    """Group names as plain zarr lists them, failing on any zarr warning (stray files in the hierarchy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return sorted(zarr.open_group(path, mode="r", use_consolidated=False).group_keys())


def test_rerun_after_a_kill_while_an_old_group_was_deleted(tmp_path):
    path = tmp_path / "qc.zarr"
    root = open_store(path)
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for())
    (path / "s1" / "zarr.json").unlink()  # what zarr's `del root[key]` leaves when killed after this file
    write_slide(root, "s1", **slide_arrays(seed=3), attrs=attrs_for("fp2"))
    assert slide_done(root, "s1", "fp2")
    np.testing.assert_array_equal(read_slide(root, "s1")["rl2"], slide_arrays(seed=3)["rl2"])
    # killed while a replaced group's folder was being removed: the trash is hidden and tidied away
    (path / ".s1.trash-999" / "rl2").mkdir(parents=True)
    assert list_slides(root) == {"s1": "done"}
    tidy(path)
    assert _plain_groups(path) == ["s1"]
    remove_slide(root, "s1")
    assert not any(path.iterdir()) or [p.name for p in path.iterdir()] == ["zarr.json"]


def test_store_creation_cannot_be_left_half_done(tmp_path):
    path = tmp_path / "qc.zarr"
    path.mkdir()
    (path / "zarr.1f2e3d.partial").write_bytes(b'{"zarr_fo')  # a first creation killed mid-write
    root = open_store(path, attrs={"auc": 0.5})
    assert root.attrs["wsi_qc"]["auc"] == 0.5 and sorted(p.name for p in path.iterdir()) == ["zarr.json"]
    # a creation killed before its rename leaves only a hidden folder beside the store
    other = tmp_path / "other.zarr"
    zarr.open_group(tmp_path / ".other.zarr.tmp-999", mode="w")
    (tmp_path / ".other.zarr.tmp-999" / "zarr.json").write_text("{")
    assert not other.exists()
    open_store(other)
    assert [p.name for p in tidy(other)] == [".other.zarr.tmp-999"]
    # a root attrs update killed mid-write leaves zarr.<hex>.partial: tidy removes it, zarr stays quiet
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for())
    (path / "zarr.abc123.partial").write_bytes(b"{")
    tidy(path)
    assert _plain_groups(path) == ["s1"]
    home = tmp_path / "home"  # a folder that is not a store keeps its hidden files
    (home / ".config.tmp-1").mkdir(parents=True)
    (home / "notes.partial").write_text("mine")
    assert tidy(home) == [] and len(list(home.iterdir())) == 2


def test_done_needs_every_array_with_one_row_per_tile(tmp_path):
    path = tmp_path / "qc.zarr"
    root = open_store(path)
    write_slide(root, "s1", **slide_arrays(d=4), attrs=attrs_for())
    assert slide_done(root, "s1", "fp1") and slide_done(root, "s1", "fp1", arrays=("features",))
    write_slide(root, "s2", **slide_arrays(), attrs=attrs_for())
    assert not slide_done(root, "s2", "fp1", arrays=("features",))  # asked for, not there
    shutil.rmtree(path / "s1" / "keep")
    assert not slide_done(root, "s1", "fp1")
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for())
    zarr.open_group(path / "s1", mode="r+").create_array("rl2", data=np.ones(5, np.float32), overwrite=True)
    assert not slide_done(root, "s1", "fp1")  # rl2 no longer has n_tiles rows
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for(n=36))
    assert not slide_done(root, "s1", "fp1")  # the attrs disagree with the arrays


def test_rl2_map_is_stored_with_its_dimension_names(tmp_path):
    root = open_store(tmp_path / "qc.zarr")
    a = slide_arrays(n=5)
    rl2_map = np.random.default_rng(0).random((5, 3, 4)).astype(np.float32)
    write_slide(root, "s1", **a, attrs=attrs_for(n=5), rl2_map=rl2_map)
    write_slide(root, "old", **a, attrs=attrs_for(n=5))
    plain = zarr.open_group(tmp_path / "qc.zarr", mode="r")["s1"]["rl2_map"]
    assert plain.metadata.dimension_names == ("tile", "y", "x") and plain.dtype == np.float32
    np.testing.assert_array_equal(read_slide(root, "s1")["rl2_map"], rl2_map)
    assert "rl2_map" not in read_slide(root, "old") and slide_done(root, "old", "fp1")
    with pytest.raises(ConfigError, match="rl2_map has 4 rows"):
        write_slide(root, "s1", **a, attrs=attrs_for(n=5), rl2_map=rl2_map[:4])


def test_long_ids_are_cut_and_hashed_the_same_everywhere():
    long_a, long_b = "a" * 250 + "x", "a" * 250 + "y"
    key = slide_key(long_a)
    assert len(key) <= 200 and key == slide_key(long_a) and key != slide_key(long_b)
    assert len(f".{key}.tmp-4194304".encode()) < 255 and len(f"{key}.geojson".encode()) < 255
    assert slide_key(".hidden") == "_hidden"  # "." names the store's temporary folders


def _hold_lock(path: str, ready) -> None:
    with locked(path):
        ready.set()
        time.sleep(60)


def _lock_from_another_thread(path) -> list[StoreLocked]:
    """The StoreLocked another thread of this process gets for the store at path (none when it gets the lock)."""
    errors = []

    def other_thread():
        try:
            with locked(path):
                pass
        except StoreLocked as exc:
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    return errors


def test_lock_refuses_a_second_writer_naming_the_holder_and_dies_with_it(tmp_path):
    path = tmp_path / "qc.zarr"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(path), ready))
    proc.start()
    try:
        assert ready.wait(60)
        t0 = time.monotonic()
        with pytest.raises(StoreLocked, match=rf"pid {proc.pid} on host {socket.gethostname()}.*run.lock_wait"):
            with locked(path, wait=0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 5  # waited, but a bounded time
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the kernel releases a dead holder's lock
        proc.join(10)
    with locked(path, wait=5) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with locked(path):  # the holding thread may take it again
            pass
        assert len(_lock_from_another_thread(path)) == 1  # another thread is another writer


def test_consolidate_and_reopen(tmp_path):
    path = tmp_path / "qc.zarr"
    root = open_store(path, attrs={"auc": 0.7})
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for())
    consolidate(path)
    meta = json.loads((path / "zarr.json").read_text())
    assert "s1" in meta["consolidated_metadata"]["metadata"]

    plain = zarr.open_group(path, mode="r")
    assert plain.metadata.consolidated_metadata is not None
    assert list(plain.group_keys()) == ["s1"] and plain["s1"].attrs["status"] == "done"

    root = open_store(path)  # a consolidated store still opens, and new slides are seen
    assert root.attrs["wsi_qc"]["auc"] == 0.7
    write_slide(root, "s2", **slide_arrays(seed=2), attrs=attrs_for("fp2"))
    consolidated_root = zarr.open_group(path, mode="r+")  # stale consolidated view, passed in by a caller
    assert list_slides(consolidated_root) == {"s1": "done", "s2": "done"}
    assert slide_done(consolidated_root, "s2", "fp2")
    np.testing.assert_array_equal(read_slide(consolidated_root, "s2")["rl2"], slide_arrays(seed=2)["rl2"])

    open_store(path, attrs={"auc": 0.8})  # a new run's root attrs drop the stale consolidation
    assert json.loads((path / "zarr.json").read_text()).get("consolidated_metadata") is None
    consolidate(path)
    plain = zarr.open_group(path, mode="r")
    assert sorted(plain.group_keys()) == ["s1", "s2"] and plain.attrs["wsi_qc"]["auc"] == 0.8


def test_done_requires_the_same_source_file_when_asked(tmp_path):
    root = open_store(tmp_path / "qc.zarr")
    state = {"size": 10, "mtime_ns": 5, "head": "sha256:ab:10"}
    arrays = dict(coords=np.zeros((1, 2), np.int32), rl2=np.zeros(1), keep=np.ones(1, bool),
                  grid=np.ones((1, 1), np.uint8), tissue=np.ones((2, 2), bool))
    write_slide(root, "s1", **arrays, attrs={"fingerprint": "fp1", "source_state": state, "sha256_head": state["head"]})
    assert slide_done(root, "s1", "fp1", source_state=state) and slide_done(root, "s1", "fp1")
    assert not slide_done(root, "s1", "fp1", source_state={**state, "mtime_ns": 6})
    assert not slide_done(root, "s1", "fp1", source_state={**state, "head": "sha256:cd:10"})
    write_slide(root, "old", **arrays, attrs={"fingerprint": "fp1", "sha256_head": state["head"]})  # older store
    assert slide_done(root, "old", "fp1", source_state=state)
    assert not slide_done(root, "old", "fp1", source_state={**state, "head": "sha256:cd:10"})


def test_a_link_to_a_store_shares_the_stores_lock(tmp_path):
    real = tmp_path / "real" / "qc.zarr"
    open_store(real)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "out.zarr"
    os.symlink(real, link)
    with locked(real) as lock:
        assert lock == real.with_name(".qc.zarr.lock")
        assert len(_lock_from_another_thread(link)) == 1  # the link is the same store: the same lock


def test_a_writer_of_an_earlier_run_cannot_put_its_group_in_place(tmp_path):
    from wsi_qc.store import StaleRun

    root = open_store(tmp_path / "qc.zarr", attrs={"run_id": "old"})
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for(), run_id="old")
    before = read_slide(root, "s1")["attrs"]
    root = open_store(tmp_path / "qc.zarr", attrs={"run_id": "new"})  # a new run took the store
    with pytest.raises(StaleRun, match="now written by run new, not by this writer's run old"):
        write_slide(root, "s1", **slide_arrays(), attrs={**attrs_for(), "n_keep": 0}, run_id="old")
    assert read_slide(root, "s1")["attrs"] == before  # the new run's group stays
    assert sorted(p.name for p in (tmp_path / "qc.zarr").iterdir()) == ["s1", "zarr.json"]  # no leftovers
    write_slide(root, "s1", **slide_arrays(), attrs=attrs_for(), run_id="new")
