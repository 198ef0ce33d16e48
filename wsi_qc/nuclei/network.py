"""The frozen encoder's multi-level maps and the light decoder that turns them into nucleus maps.

The encoder is wsi_qc.encoder.Encoder (weights, strict loading, identity); here its stage maps are taken at
the image's own resolution (no resize to the encoder's input size), the image padded to a multiple of 32.
The decoder (U-Net-like) starts at the deepest map, doubles resolution stage by stage, concatenates the
projected encoder map of that stride (the skips) and, at full resolution, a small stem of the image itself;
heads: nucleus foreground (logit), distance map (0 edge .. 1 centre) and, optionally, type logits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_qc.encoder import Encoder
from wsi_qc.errors import ConfigError
from wsi_qc.image_stats import rgb_tensor

PAD = 32  # images are padded to a multiple of this, so every stage map is exactly H / stride
WIDTHS = {2: 24, 4: 32, 8: 40, 16: 56, 32: 80}  # decoder channels per stride
FULL = 8  # channels of the full-resolution layer


class _Maps(nn.Module):
    """The encoder's stage maps of a [0, 1] RGB batch as one module (what a CPU runtime runs)."""

    def __init__(self, frozen: "FrozenEncoder") -> None:
        super().__init__()
        self.model, self.levels = frozen.encoder.model, frozen.levels
        self.register_buffer("mean", frozen.encoder._mean.clone())
        self.register_buffer("std", frozen.encoder._std.clone())

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        x = (rgb - self.mean) / self.std
        return self.model.forward_intermediates(x, indices=self.levels, stop_early=True, intermediates_only=True)


class FrozenEncoder:
    """A frozen timm encoder (via wsi_qc.encoder.Encoder) returning its stage maps at native resolution.

    runtime: "openvino" (the default on the CPU; converted once and cached, see wsi_qc.cpu_runtime) or "torch".
    """

    def __init__(self, name: str, weights: str, levels: list[int], runtime: str = "openvino") -> None:
        self.encoder = Encoder(name, weights=weights, levels=sorted(levels), device="cpu", channels_last=False,
                               cpu_runtime="torch")
        info = self.encoder.model.feature_info
        self.levels = sorted(int(i) for i in levels)
        self.dims = [int(info[i]["num_chs"]) for i in self.levels]
        self.strides = [int(info[i]["reduction"]) for i in self.levels]
        if len(set(self.strides)) != len(self.strides) or max(self.strides) > 32:
            raise ConfigError(f"nuclei levels {self.levels} of {name!r} have strides {self.strides}; pick stages "
                              f"of distinct strides up to 32")
        self.runtime = runtime
        self.module = _Maps(self).eval()
        self._compiled: dict[int, object] = {}

    def meta(self) -> dict:
        m = self.encoder.meta()
        return {"name": m["name"], "weights": m["weights"], "weights_sha256": m["weights_sha256"],
                "levels": self.levels, "dims": self.dims, "strides": self.strides, "timm_version": m["timm_version"]}

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) with H, W multiples of PAD -> the (B, 3, H, W) [0, 1] RGB tensor."""
        return rgb_tensor(np.require(images, requirements=["C", "W"]))

    @torch.inference_mode()
    def maps(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps (B, C_l, H / s_l, W / s_l) of a [0, 1] RGB batch whose sides are multiples of PAD."""
        if self.runtime == "openvino":
            return [torch.from_numpy(m) for m in run_openvino(self.module, rgb, self._compiled, self.meta())]
        return [m.float() for m in self.module(rgb)]


def run_openvino(module: nn.Module, x: torch.Tensor, compiled: dict, identity: dict) -> list[np.ndarray]:
    """Outputs of `module` on `x` in OpenVINO (fp32, dynamic shapes, torch's thread count), compiled once per
    thread count into `compiled` and cached on disk by content (wsi_qc.cpu_runtime.openvino_model)."""
    from wsi_qc.cpu_runtime import import_runtime, openvino_model, openvino_settings

    threads = torch.get_num_threads()
    if threads not in compiled:
        ov = import_runtime("openvino", "the nuclei runtime")
        model = openvino_model(module, x[:1], {**identity, "nuclei": True})
        compiled[threads] = ov.Core().compile_model(model, "CPU", openvino_settings(threads))
    result = compiled[threads](x.contiguous().numpy())
    return [result[i] for i in range(len(result))]


def pad_to(image: np.ndarray, multiple: int = PAD) -> np.ndarray:
    """Reflect-pad an (H, W, ...) array at the bottom and right to multiples of `multiple`."""
    h, w = image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return image
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="reflect" if min(h, w) > max(ph, pw) else "edge")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Decoder(nn.Module):
    """Skip-connected decoder over encoder maps of strides `strides` (channels `dims`) plus the image.

    From the deepest map up to stride 2: upsample x2, concatenate the projected encoder map of that stride
    (when a level has it) and, at stride 2, the image's 2 x 2 pixels as channels (pixel unshuffle); one
    3 x 3 conv block per stride. Then a thin full-resolution layer on the upsampled features and the image.
    """

    def __init__(self, dims: list[int], strides: list[int], n_types: int = 0) -> None:
        super().__init__()
        if min(strides) < 2:
            raise ConfigError(f"decoder skips need encoder strides >= 2, got {strides}")
        self.strides, self.n_types = list(strides), int(n_types)
        self.proj = nn.ModuleDict({str(s): nn.Sequential(nn.Conv2d(d, WIDTHS[s], 1, bias=False),
                                                         nn.BatchNorm2d(WIDTHS[s]), nn.ReLU(inplace=True))
                                   for d, s in zip(dims, strides)})
        self.top = max(strides)
        blocks = {}
        s = self.top // 2
        while s >= 2:
            c_in = WIDTHS[s * 2] + (WIDTHS[s] if s in strides else 0) + (12 if s == 2 else 0)
            blocks[str(s)] = _block(c_in, WIDTHS[s])
            s //= 2
        self.blocks = nn.ModuleDict(blocks)
        self.reduce = nn.Conv2d(WIDTHS[2], FULL, 1)
        self.full = _block(FULL + 3, FULL)
        self.head = nn.Conv2d(FULL, 2 + (self.n_types + 1 if self.n_types else 0), 1)

    def forward(self, maps: list[torch.Tensor], rgb: torch.Tensor) -> torch.Tensor:
        """(B, 2 [+ 1 + n_types], H, W): foreground logit, distance logit, type logits (0 = background)."""
        by_stride = dict(zip(self.strides, maps))
        x = self.proj[str(self.top)](by_stride[self.top])
        s = self.top // 2
        while s >= 2:
            parts = [F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)]
            if s in by_stride:
                parts.append(self.proj[str(s)](by_stride[s]))
            if s == 2:
                parts.append(F.pixel_unshuffle(rgb, 2))
            x = self.blocks[str(s)](torch.cat(parts, 1))
            s //= 2
        x = F.interpolate(self.reduce(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(self.full(torch.cat([x, rgb], 1)))
