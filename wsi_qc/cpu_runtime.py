"""Networks on the CPU outside torch, cached on disk by content: the encoder's network exported once to ONNX, then
run by ONNX Runtime or OpenVINO in fp32 (`encoder.cpu_runtime`; benchmarks/runtimes.py measures them against torch),
and the flow's scoring module converted once to OpenVINO (`flow.cpu_runtime`)."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)

CPU_RUNTIMES = ("torch", "onnxruntime", "openvino")
OPSET = 18


def cache_dir() -> Path:
    """Where exported networks are kept: $WSI_QC_CACHE, else $XDG_CACHE_HOME/wsi_qc (~/.cache/wsi_qc)."""
    if os.environ.get("WSI_QC_CACHE"):
        return Path(os.environ["WSI_QC_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "wsi_qc"


def _content_key(module: torch.nn.Module, identity: dict) -> str:
    """sha256 of the identity (architecture, outputs, versions) and of every parameter and buffer."""
    h = hashlib.sha256(json.dumps({**identity, "torch": torch.__version__, "opset": OPSET}, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def export_onnx(module: torch.nn.Module, input_size: list[int], identity: dict) -> Path:
    """The ONNX file of `module` on (B, *input_size) float32 inputs, B free; exported on the first call only."""
    path = cache_dir() / "onnx" / f"{_content_key(module, identity)}.onnx"
    if path.is_file():
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
        os.replace(Path(tmp) / path.name, path)
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


def openvino_model(module: torch.nn.Module, example: torch.Tensor, identity: dict):
    """OpenVINO's model (fp32) of `module` on inputs shaped like `example` (batch free): converted in memory on the
    first call, then kept under cache_dir()/openvino by content, so that later processes only read it."""
    ov = import_runtime("openvino")
    path = cache_dir() / "openvino" / f"{_content_key(module, {**identity, 'openvino': ov.__version__})}.xml"
    if path.is_file():
        return ov.Core().read_model(path)
    with warnings.catch_warnings():  # torch.jit's tracer warnings
        warnings.simplefilter("ignore")
        model = ov.convert_model(module.eval(), example_input=example)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent workers: whole files only, .bin first
        ov.save_model(model, Path(tmp) / path.name, compress_to_fp16=False)
        os.replace(Path(tmp) / path.with_suffix(".bin").name, path.with_suffix(".bin"))
        os.replace(Path(tmp) / path.name, path)
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
