"""Networks on the CPU outside torch, cached on disk by content: the encoder's network exported once to ONNX, then
run by ONNX Runtime or OpenVINO in fp32 (`encoder.cpu_runtime`; benchmarks/runtimes.py measures them against torch),
and the flow's scoring module converted once to OpenVINO (`flow.cpu_runtime`).

The cache (`cache_dir()`, one folder per format) is keyed by `export_key`: the wsi-qc version, the source of the
exported module's class and of the code its forward runs, its identity dict, every parameter and buffer, and the
torch, opset and runtime versions; so a code change, another installed version or other weights never read an old
export. Each entry is written whole (temporary folder, then renamed) with `<key>.sha256` beside it, the digest of
each of its files, written last; an entry whose files are missing, truncated or changed is rebuilt (with a warning).
Each format keeps its MAX_ENTRIES most recently used entries.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from wsi_qc import __version__
from wsi_qc.errors import ConfigError
from wsi_qc.identity import Digest, file_digest

log = logging.getLogger(__name__)

CPU_RUNTIMES = ("torch", "onnxruntime", "openvino")
OPSET = 18
MAX_ENTRIES = 16  # exported networks kept per format (the most recently used ones)


def cache_dir() -> Path:
    """Where exported networks are kept: $WSI_QC_CACHE, else $XDG_CACHE_HOME/wsi_qc (~/.cache/wsi_qc)."""
    if os.environ.get("WSI_QC_CACHE"):
        return Path(os.environ["WSI_QC_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "wsi_qc"


def export_key(module: torch.nn.Module, identity: dict, code: tuple = ()) -> str:
    """Key of an exported network: wsi-qc, torch and opset versions with the identity dict (architecture, outputs,
    runtime version) as JSON, the source of the module's class and of `code` (what its forward calls), then every
    parameter and buffer (identity.Digest)."""
    return (Digest().json({**identity, "wsi_qc": __version__, "torch": torch.__version__, "opset": OPSET})
            .code(type(module), *code).tensors(module.state_dict()).hex(32))


def _manifest(path: Path) -> Path:
    return path.with_name(f"{path.stem}.sha256")


def _cached(path: Path, names: tuple[str, ...]) -> bool:
    """True when the entry's files (`names`, beside `path`) are all there with the digests its manifest records;
    else the caller rebuilds it (a damaged one with a warning naming it). Nothing is deleted here: another process
    may be publishing the entry right now, and a rebuilt entry replaces each file whole."""
    manifest = _manifest(path)
    if not manifest.is_file() and not any((path.parent / n).exists() for n in names):
        return False
    try:
        recorded = json.loads(manifest.read_text())
        ok = sorted(recorded) == sorted(names) and all(
            file_digest(path.parent / n) == recorded[n] for n in names)
    except (OSError, ValueError, TypeError):
        ok = False
    if ok:
        try:
            os.utime(manifest)  # recently used: kept by _prune
        except OSError:
            pass
        return True
    log.warning("cached network %s is incomplete or corrupt (missing file or digest mismatch); rebuilding it", path)
    return False


def _publish(tmp: Path, path: Path, names: tuple[str, ...]) -> None:
    """Move an entry's files from `tmp` beside `path`, then its manifest (last: an entry without one is never used),
    and prune the format's folder."""
    digests = {n: file_digest(tmp / n) for n in names}
    (tmp / _manifest(path).name).write_text(json.dumps(digests, sort_keys=True))
    for n in names:
        os.replace(tmp / n, path.parent / n)
    os.replace(tmp / _manifest(path).name, _manifest(path))
    _prune(path.parent)


def _prune(folder: Path, keep: int = MAX_ENTRIES) -> None:
    """Remove all but the `keep` most recently used entries of a format's folder, and files of no entry (older
    exports) untouched for an hour."""
    listed = {manifest.name for manifest in folder.glob("*.sha256")}
    for manifest in folder.glob("*.sha256"):
        try:
            listed.update(json.loads(manifest.read_text()))
        except (OSError, ValueError):
            pass
    for p in folder.iterdir():
        try:
            if p.is_file() and p.name not in listed and time.time() - p.stat().st_mtime > 3600:
                p.unlink()
        except OSError:
            pass
    entries = sorted(folder.glob("*.sha256"), key=lambda p: p.stat().st_mtime_ns if p.exists() else 0, reverse=True)
    for manifest in entries[keep:]:
        try:
            names = json.loads(manifest.read_text())
        except (OSError, ValueError):
            names = {}
        for name in (manifest.name, *names):
            (folder / name).unlink(missing_ok=True)
        log.info("removed the cached network %s (the cache keeps %d per format)", manifest.stem, keep)


def export_onnx(module: torch.nn.Module, input_size: list[int], identity: dict, code: tuple = ()) -> Path:
    """The ONNX file of `module` on (B, *input_size) float32 inputs, B free; exported on the first call only (key:
    export_key, `code` the functions its forward runs)."""
    path = cache_dir() / "onnx" / f"{export_key(module, identity, code)}.onnx"
    if _cached(path, (path.name,)):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting the encoder network to %s (once per network)", path)
    example = torch.zeros(2, *input_size)
    try:
        program = torch.onnx.export(module.eval(), (example,), input_names=["x"], output_names=["features"],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
                                    dynamo=True, verbose=False)
    except Exception as exc:  # torch.export and the ONNX translation fail in many ways
        raise ConfigError(f"encoder {identity.get('name')!r} could not be exported to ONNX ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); set encoder.cpu_runtime: torch") from exc
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent workers: whole files only
        program.save(Path(tmp) / path.name)
        if len(list(Path(tmp).iterdir())) != 1:  # external data beside the graph: not a one-file entry
            raise ConfigError(f"encoder {identity.get('name')!r} exports to more than one ONNX file; set "
                              f"encoder.cpu_runtime: torch")
        _publish(Path(tmp), path, (path.name,))
    return path


def import_runtime(runtime: str, key: str = "encoder.cpu_runtime"):
    """The runtime's package, or a ConfigError naming the config key that asked for it."""
    try:
        return importlib.import_module(runtime)
    except ImportError as exc:
        raise ConfigError(f"{key} {runtime!r} needs the {runtime} package ({exc}); "
                          f"pip install {runtime} or set {key}: torch") from exc


def openvino_settings(threads: int) -> dict:
    """OpenVINO's CPU settings for every network here: torch's thread count, fp32 (not bf16 on CPUs that have it)."""
    return {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}


def openvino_model(module: torch.nn.Module, example: torch.Tensor, identity: dict, code: tuple = ()):
    """OpenVINO's model (fp32) of `module` on inputs shaped like `example` (batch free): converted in memory on the
    first call, then kept under cache_dir()/openvino (key: export_key with the OpenVINO version), so that later
    processes only read it."""
    ov = import_runtime("openvino")
    path = cache_dir() / "openvino" / f"{export_key(module, {**identity, 'openvino': ov.__version__}, code)}.xml"
    names = (path.name, path.with_suffix(".bin").name)
    if _cached(path, names):
        return ov.Core().read_model(path)
    with warnings.catch_warnings():  # torch.jit's tracer warnings
        warnings.simplefilter("ignore")
        model = ov.convert_model(module.eval(), example_input=example)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent workers: whole files only
        ov.save_model(model, Path(tmp) / path.name, compress_to_fp16=False)
        _publish(Path(tmp), path, names)
    return model


class ExportedNetwork:
    """Calls the ONNX network with ONNX Runtime or OpenVINO, fp32, with torch's current intra-op thread count
    (one session per count, so run.threads holds here too)."""

    def __init__(self, runtime: str, path: Path) -> None:
        self.runtime, self.path = runtime, path
        self._module = import_runtime(runtime)
        self._sessions: dict[int, object] = {}

    def _session(self, threads: int):
        if self.runtime == "onnxruntime":
            options = self._module.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = self._module.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            return lambda x: session.run(None, {"x": x})[0]
        compiled = self._module.Core().compile_model(str(self.path), "CPU", openvino_settings(threads))
        return lambda x: compiled(x)[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        if threads not in self._sessions:
            self._sessions[threads] = self._session(threads)
        return torch.from_numpy(self._sessions[threads](x.contiguous().numpy()))
