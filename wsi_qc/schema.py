"""The config's one typed schema: each key's type comes from its default, ranges and choices from LIMITS.

A key whose default (in config.DEFAULT_CONFIG) is a bool must be a bool, an int an integer, a float a finite
number, a str a string, a list a list, a mapping a mapping. A key whose default is null takes its type from
LIMITS (any value when it is not listed there). So a key added to the default config is type-checked with no
change here; LIMITS adds the ranges and choices of the keys that need them. Choices written "module:NAME" are
read from that module's tuple when a value is checked, so a new choice added there (a threshold rule, a
tissue method) is accepted without editing this file. Values equal to their default are not checked again.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

from wsi_qc.errors import ConfigError


@dataclass(frozen=True)
class Limit:
    """Range, choices and null-ability of one key; `kind` gives the type of keys whose default is null."""

    kind: type | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False    # low itself is refused
    open_high: bool = False   # high itself is refused
    choices: tuple | str | None = None
    null: bool = False


POSITIVE = Limit(low=0, open_low=True)
AT_LEAST_0 = Limit(low=0)
AT_LEAST_1 = Limit(low=1)
FRACTION = Limit(low=0, high=1)
POSITIVE_MPP_OR_NULL = Limit(float, low=0, open_low=True, null=True)

LIMITS: dict[str, Limit] = {
    "slide.mpp": POSITIVE_MPP_OR_NULL,
    "slide.mpp_fallback": POSITIVE_MPP_OR_NULL,
    "tissue.method": Limit(choices="wsi_qc.tissue:METHODS"),
    "tissue.thumbnail_mpp": POSITIVE,
    "tissue.min_area_um2": AT_LEAST_0,
    "tissue.closing_um": AT_LEAST_0,
    "tiles.mpp": POSITIVE,
    "tiles.size": Limit(low=8),
    "tiles.overlap": AT_LEAST_0,  # and < tiles.size, checked in check_config
    "tiles.min_tissue": FRACTION,
    "tiles.workers": AT_LEAST_0,
    "tiles.batch_size": AT_LEAST_1,
    "encoder.pooling": Limit(choices="wsi_qc.encoder:POOLINGS"),
    "encoder.precision": Limit(choices="wsi_qc.encoder:PRECISIONS"),
    "encoder.cpu_runtime": Limit(choices="wsi_qc.cpu_runtime:CPU_RUNTIMES"),
    "encoder.levels": Limit(null=True),
    "encoder.grid": Limit(int, low=1, null=True),
    "encoder.input_size": Limit(int, low=8, null=True),
    "flow.pca_dim": Limit(int, low=1, null=True),
    "reference.calibration_fraction": Limit(low=0, high=1, open_high=True),
    "reference.trim_z": POSITIVE,
    "reference.core_z": POSITIVE,
    "reference.stat_z": Limit(float, low=0, open_low=True, null=True),
    "reference.rounds": AT_LEAST_0,
    "reference.max_rows": Limit(int, low=1000, null=True),
    "reference.tiles_per_slide": AT_LEAST_1,
    "reference.max_tiles": AT_LEAST_1,
    "reference.false_discard": Limit(low=0, high=1, open_low=True, open_high=True),
    "flow.cpu_runtime": Limit(choices="wsi_qc.flow:CPU_RUNTIMES"),
    "flow.n_blocks": AT_LEAST_1,
    "flow.hidden": AT_LEAST_1,
    "flow.clamp": POSITIVE,
    "flow.epochs": AT_LEAST_1,
    "flow.batch_size": AT_LEAST_1,
    "flow.lr": POSITIVE,
    "flow.weight_decay": AT_LEAST_0,
    "flow.val_fraction": Limit(low=0, high=1, open_low=True, open_high=True),
    "flow.patience": AT_LEAST_1,
    "flow.seed": AT_LEAST_0,
    "flow.min_reference": Limit(low=2),
    "score.kind": Limit(choices="wsi_qc.scorer:SCORE_KINDS"),
    "cascade.enabled": Limit(bool, null=True),
    "cascade.coarse_mpp": POSITIVE,
    "cascade.coarse_grid": AT_LEAST_1,
    "cascade.settle": FRACTION,
    "cascade.focus_alpha": Limit(low=0, high=1, open_high=True),
    "threshold.rule": Limit(choices="wsi_qc.threshold:RULES"),
    "threshold.value": Limit(float, null=True),
    "threshold.n_bootstrap": AT_LEAST_0,
    "threshold.seed": AT_LEAST_0,
    "run.workers": AT_LEAST_1,
    "run.threads": AT_LEAST_1,
    "run.scheduler": Limit(str, null=True),
    "run.lock_wait": AT_LEAST_0,
}

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a mapping"}


def _choices(limit: Limit) -> tuple:
    if isinstance(limit.choices, str):
        module, name = limit.choices.split(":")
        return tuple(getattr(importlib.import_module(module), name))
    return tuple(limit.choices or ())


def allowed(kind: type | None, limit: Limit) -> str:
    """Words for the values a key takes, e.g. 'an integer >= 1' or 'one of avg, grid2'."""
    if limit.choices is not None:
        text = "one of " + ", ".join(map(str, _choices(limit)))
    else:
        text = _NAMES.get(kind, "any value")
        if limit.low is not None:
            text += f" {'>' if limit.open_low else '>='} {limit.low:g}"
        if limit.high is not None:
            text += f"{' and' if limit.low is not None else ''} {'<' if limit.open_high else '<='} {limit.high:g}"
    return text + (" or null" if limit.null else "")


def _problem(value: Any, kind: type | None, limit: Limit) -> str | None:
    """Why value does not fit (a short phrase), or None when it does."""
    if value is None:
        return None if limit.null or kind is None else "is null"
    if kind is bool and not isinstance(value, bool):
        return f"is a {type(value).__name__}, not true/false"
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"is a {type(value).__name__}, not an integer"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is a {type(value).__name__}, not a number"
        if not math.isfinite(value):
            return "is not finite"
    if kind in (str, list, dict) and not isinstance(value, kind):
        return f"is a {type(value).__name__}, not {_NAMES[kind]}"
    if limit.choices is not None and value not in _choices(limit):
        return "is not a known choice"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if limit.low is not None and (value < limit.low or (limit.open_low and value == limit.low)):
            return "is out of range"
        if limit.high is not None and (value > limit.high or (limit.open_high and value == limit.high)):
            return "is out of range"
    return None


def check_value(name: str, value: Any, kind: type | None, limit: Limit, where: str, fix: str) -> None:
    """ConfigError naming key, value, source and the allowed values when value does not fit."""
    problem = _problem(value, kind, limit)
    if problem is not None:
        raise ConfigError(f"{name}={value!r} in {where} {problem}; allowed: {allowed(kind, limit)} - {fix}")


def _kind(default: Any, limit: Limit) -> type | None:
    if default is None:
        return limit.kind
    return float if isinstance(default, float) else type(default)


def check(values: dict, defaults: dict, source: str, prefix: str = "") -> None:
    """Type-, range- and choice-check the keys of one config layer (its keys are known to the defaults)."""
    for key, value in values.items():
        name, default = f"{prefix}{key}", defaults.get(key)
        if isinstance(default, dict) and default and isinstance(value, dict):
            check(value, default, source, name + ".")
            continue
        if value == default and type(value) is type(default):
            continue
        limit = LIMITS.get(name, Limit())
        default_text = "" if default is None else f" (default {default!r})"
        check_value(name, value, _kind(default, limit), limit, source, f"fix it in {source}{default_text}")


def check_config(config: dict) -> None:
    """Checks that involve several keys of the resolved config."""
    tiles = config["tiles"]
    if tiles["overlap"] >= tiles["size"]:
        raise ConfigError(f"tiles.overlap={tiles['overlap']!r} must be smaller than tiles.size={tiles['size']!r} "
                          f"(stride = size - overlap); lower tiles.overlap")
