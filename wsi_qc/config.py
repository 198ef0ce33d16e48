"""Configuration: the package's configs/default.yaml overlaid with user YAML files and explicit overrides."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from wsi_qc import schema
from wsi_qc.errors import ConfigError
from wsi_qc.identity import json_digest


def package_file(*parts: str) -> Path:
    """Path of a data file shipped inside the wsi_qc package, e.g. package_file("configs", "default.yaml")."""
    return Path(str(resources.files("wsi_qc").joinpath(*parts)))


DEFAULT_CONFIG = package_file("configs", "default.yaml")


def _read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); fix the syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a mapping of sections")
    return data


def _merge(base: dict, override: dict, source: str, prefix: str = "") -> dict:
    """Deep-merge override into a copy of base; keys unknown to base are refused."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{name}' in {source}; known keys here: {known}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' in {source} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, source, name + ".")
        else:
            out[key] = value
    return out


class Config(dict):
    """A loaded config: the plain dict of sections, which also knows the (section, key) pairs that a file or an
    override set (`explicit`), so that a loaded scorer keeps its own value where the config only has the default.
    Copies (copy.deepcopy, pickle) keep `explicit`; JSON and dict(...) drop it (with_explicit restores it)."""

    explicit: frozenset = frozenset()


def with_explicit(config: dict, explicit) -> Config:
    """`config` as a Config whose explicitly set keys are `explicit` ((section, key) pairs)."""
    out = Config(config)
    out.explicit = frozenset(tuple(k) for k in explicit)
    return out


def explicit_keys(config: dict) -> frozenset | None:
    """The (section, key) pairs a loaded config set explicitly, or None for a dict that does not know them."""
    return getattr(config, "explicit", None)


def load_config(*paths: str | Path | None, overrides: dict | None = None,
                overrides_source: str = "overrides") -> dict[str, Any]:
    """Defaults, then each YAML file in order (a pipeline file may name a base with `base:`), then overrides.

    Every layer is checked against the schema (wsi_qc.schema) as it is merged: an unknown key, a wrong type,
    a value out of range or not among the choices raises ConfigError naming the key, the value and its source.
    Returns a Config: its `explicit` names the keys the files and overrides set.
    """
    defaults = _read_yaml(DEFAULT_CONFIG)
    config = defaults
    explicit: set[tuple[str, str]] = set()

    def layer(data: dict, source: str) -> dict:
        merged = _merge(config, data, source)
        schema.check(data, defaults, source)
        explicit.update((section, key) for section, values in data.items() if isinstance(values, dict)
                        for key in values)
        return merged

    for path in paths:
        if path is None:
            continue
        data = _read_yaml(Path(path))
        base = data.pop("base", None)
        if base is not None:
            config = layer(_read_yaml(Path(path).parent / base), str(Path(path).parent / base))
        config = layer(data, str(path))
    if overrides:
        config = layer(overrides, overrides_source)
    schema.check_config(config)
    return with_explicit(config, explicit)


def fingerprint(config: dict, sections: tuple[str, ...] | None = None) -> str:
    """Key: the named sections' values (all when None) as JSON, stable across key order; 16 hex digits of
    identity.json_digest."""
    part = config if sections is None else {k: config[k] for k in sections}
    return json_digest(part, 16)


def resolve_device(device: str, what: str):
    """torch device for a config's `device` value: auto (cuda when present), cpu or cuda[:N]."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{what} device {device!r} is not a torch device; use auto, cpu or cuda") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} device {device!r} asked for but CUDA is not available; use device='auto' or 'cpu'")
    return resolved
