"""Where a batch's slides run: in this process, in local worker processes (run.workers) or on Dask (run.scheduler).

`run_each(work, paths, args, config, failed)` returns one row per slide, `work(path, *args)` (wsi_qc.run.qc_slide,
which never raises) or, for a slide whose worker died, `failed(path, why)`. A worker that dies (killed, out of
memory, crashed) fails only the slide it was processing; the other slides finish. Worker processes and Dask
workers get absolute paths (a remote worker resolves relative ones against its own folder); rows keep the paths
as given. Worker processes die with the process that started them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm.auto import tqdm

from wsi_qc.config import explicit_keys, with_explicit

DIED = ("the worker process died while processing this slide (killed, out of memory or crashed); run it alone "
        "(--workers 1) to see why")


def run_each(work: Callable, paths: list, args: tuple, config: dict, failed: Callable[[str, str], dict]) -> list[dict]:
    """One row per slide path (module docstring); `args` hold the config (Dask: without reader processes) and the
    paths `work` needs as Path objects (made absolute for workers)."""
    run = config["run"]
    bar = tqdm(total=len(paths), desc="slides", unit="slide", disable=None)
    if run["scheduler"] or run["workers"] > 1:
        given = {str(Path(p).absolute()): str(p) for p in paths}
        cfg = _no_reader_processes(config) if run["scheduler"] else config
        common = tuple(cfg if a is config else str(a.absolute()) if isinstance(a, Path) else a for a in args)
        each = _on_dask if run["scheduler"] else _in_pool
        rows = each(work, list(given), common, config, failed, bar)
        for row in rows:
            row["path"] = given.get(row["path"], row["path"])
    else:
        rows = []
        for p in paths:
            rows.append(work(p, *args))
            bar.update()
    bar.close()
    return rows


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this worker when the process that started it (pid `parent`) dies (e.g. by
    SIGKILL), so no orphan keeps writing into the store while a rerun redoes its slide; a worker whose parent died
    while it started (before this ran, so no signal comes) exits before it takes any slide."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _no_reader_processes(config: dict) -> dict:
    """Dask workers are daemonic and cannot start reader processes: they read tiles with a thread."""
    out = {**config, "tiles": {**config["tiles"], "workers": 0}}
    explicit = explicit_keys(config)
    return out if explicit is None else with_explicit(out, explicit)


def _pool(n: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
                               initargs=(os.getpid(),))


def _in_pool(work: Callable, paths: list[str], args: tuple, config: dict, failed, bar) -> list[dict]:
    """Rows of slides run in run.workers local processes, at most one slide per process in flight. When a process
    dies the pool breaks and every slide in flight is in doubt: each of those is redone alone in a fresh process
    (a slide that kills its process again fails, naming that), the rest go on in a fresh pool."""
    workers = config["run"]["workers"]
    todo, rows, doubt = list(paths), [], []
    while todo or doubt:
        for path in doubt:  # alone: a death here is this slide's
            with _pool(1) as alone:
                try:
                    rows.append(alone.submit(work, path, *args).result())
                except BrokenProcessPool:
                    rows.append(failed(path, DIED))
            bar.update()
        doubt = []
        if not todo:
            break
        with _pool(workers) as many:
            running: dict = {}
            while todo or running:
                while todo and len(running) < workers:
                    path = todo.pop(0)
                    running[many.submit(work, path, *args)] = path
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    path = running.pop(fut)
                    try:
                        rows.append(fut.result())
                        bar.update()
                    except BrokenProcessPool:
                        doubt.append(path)
                        broken = True
                if broken:  # the other slides in flight died with the pool, unless they had just finished
                    for fut, path in running.items():
                        if fut.done() and fut.exception() is None:
                            rows.append(fut.result())
                            bar.update()
                        else:
                            doubt.append(path)
                    break
    return rows


def _on_dask(work: Callable, paths: list[str], args: tuple, config: dict, failed, bar) -> list[dict]:
    """Rows of slides run on Dask (run.scheduler: "local" starts a local cluster of run.workers processes, one
    thread each). At most one slide per worker thread is in flight, so a worker that dies takes no queued slide
    with it; a task whose workers died (KilledWorker after Dask's retries) or that failed to run fails only its
    slide."""
    from distributed import Client, LocalCluster, as_completed as dask_completed

    run = config["run"]
    if run["scheduler"] == "local":
        cluster = LocalCluster(n_workers=run["workers"], threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(run["scheduler"])
    rows, todo, futures = [], list(paths), {}
    try:
        client.wait_for_workers(run["workers"] if cluster is not None else 1)
        slots = max(1, sum(client.nthreads().values()))

        def submit():
            path = todo.pop(0)
            fut = client.submit(work, path, *args, pure=False)
            futures[fut] = path
            return fut

        pending = dask_completed([submit() for _ in range(min(slots, len(todo)))])
        for fut in pending:
            try:
                rows.append(fut.result())
            except Exception as exc:  # KilledWorker, a worker's unpickling or comm error: this slide only
                rows.append(failed(futures[fut], f"{type(exc).__name__}: the Dask worker running this slide died or "
                                                 f"could not run it ({str(exc)[:200]})"))
            bar.update()
            if todo:
                pending.add(submit())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return rows
