"""Scorer: a frozen encoder plus a flow fitted on reference features, saved and loaded as one directory.

`rl2` (default) or `nll` is the per-tile score; both come from the same latent (see wsi_qc.rl2).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from wsi_qc.encoder import Encoder
from wsi_qc.errors import ConfigError
from wsi_qc.flow import Flow
from wsi_qc.rl2 import tile_rl2
from wsi_qc.slide import Slide
from wsi_qc.tiles import iter_tile_batches, tile_slide

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SCORE_KINDS = ("rl2", "nll")
# Config keys a scorer is bound to: loading it under other values is refused.
BOUND_KEYS = ("encoder.name", "encoder.pooling", "encoder.levels", "encoder.image_stats", "tiles.mpp", "tiles.size")


def encoder_from_config(config: dict) -> Encoder:
    """The frozen encoder the config's `encoder` section describes."""
    e = config["encoder"]
    return Encoder(e["name"], weights=e["weights"], pooling=e["pooling"], levels=e["levels"], device=e["device"],
                   precision=e["precision"], channels_last=e["channels_last"], compile=e["compile"],
                   model_kwargs=e["model_kwargs"], image_stats=e["image_stats"])


def flow_from_config(config: dict) -> Flow:
    """An unfitted flow with the config's `flow` section as parameters."""
    return Flow(**config["flow"])


def image_paths(folder: str | Path) -> list[Path]:
    """Tile image files under a folder (recursive, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of tile images; pass a directory of PNG/JPEG tiles")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"{folder} holds no tile images ({', '.join(IMAGE_SUFFIXES)}); point at a folder of tiles")
    return paths


def read_tile_images(paths: Iterable[str | Path], size: int) -> np.ndarray:
    """Tile images as uint8 (N, size, size, 3); images of another size are resized."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                out.append(np.asarray(im))
        except OSError as exc:
            raise ConfigError(f"{path} is not a readable image ({exc}); remove it or replace it") from exc
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(index, images) batches of an in-memory image array."""
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        yield np.arange(start, stop), images[start:stop]


def encode(encoder: Encoder, batch_iter: Iterable[tuple[np.ndarray, np.ndarray]], n: int,
           desc: str = "tiles") -> np.ndarray:
    """Features (n, D) from an iterator of (index, uint8 images) batches."""
    features = np.zeros((n, encoder.dim), np.float32)
    with tqdm(total=n, desc=desc, unit="tile", leave=False, disable=None) as bar:
        for index, images in batch_iter:
            features[index] = encoder(images)
            bar.update(len(index))
    return features


def slide_features(slide: Slide, encoder: Encoder, config: dict):
    """(thumbnail, thumbnail mpp, tissue, tiles, features) of one opened slide."""
    thumbnail, thumbnail_mpp, tissue, tiles = tile_slide(slide, config)
    t = config["tiles"]
    it = iter_tile_batches(slide.path, tiles, batch_size=t["batch_size"], workers=t["workers"], slide_mpp=slide.mpp)
    return thumbnail, thumbnail_mpp, tissue, tiles, encode(encoder, it, len(tiles.coords), desc=slide.id)


def folder_features(folder: str | Path, encoder: Encoder, config: dict) -> tuple[list[Path], np.ndarray]:
    """(paths, features) of a folder of tile images."""
    paths = image_paths(folder)
    images = read_tile_images(paths, config["tiles"]["size"])
    return paths, encode(encoder, batches(images, config["tiles"]["batch_size"]), len(images), desc=Path(folder).name)


def _config_value(config: dict, dotted: str):
    section, key = dotted.split(".")
    return config[section][key]


class Scorer:
    """An encoder and a fitted flow; `score(features)` gives the per-tile score (higher = worse)."""

    def __init__(self, encoder: Encoder, flow: Flow, config: dict):
        self.encoder = encoder
        self.flow = flow
        self.config = config
        self.kind = config["score"]["kind"]
        if self.kind not in SCORE_KINDS:
            raise ConfigError(f"score.kind={self.kind!r} is unknown; use one of {', '.join(SCORE_KINDS)}")
        self.meta: dict = {}

    @classmethod
    def fit(cls, features: np.ndarray, encoder: Encoder, config: dict) -> "Scorer":
        """Fit the flow on reference features from `encoder`."""
        return cls(encoder, flow_from_config(config).fit(features), config)

    @property
    def fingerprint(self) -> str:
        if "fingerprint" not in self.meta:
            raise ConfigError("this scorer has not been saved yet; save it to give it a fingerprint")
        return self.meta["fingerprint"]

    def latent(self, features: np.ndarray) -> np.ndarray:
        return self.flow.transform(features)

    def scores(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Both per-tile scores: rl2 and nll."""
        return {"rl2": tile_rl2(self.flow.transform(features), self.flow.mu_), "nll": self.flow.nll(features)}

    def score(self, features: np.ndarray) -> np.ndarray:
        """The configured per-tile score (score.kind)."""
        if self.kind == "rl2":
            return tile_rl2(self.flow.transform(features), self.flow.mu_)
        return self.flow.nll(features)

    def bound_values(self) -> dict:
        return {k: _config_value(self.config, k) for k in BOUND_KEYS}

    def save(self, path: str | Path) -> Path:
        meta = {"encoder": self.encoder.meta(), "bound": self.bound_values(), "score_kind": self.kind,
                "tiles": {"mpp": self.config["tiles"]["mpp"], "size": self.config["tiles"]["size"]}}
        self.flow.save(path, meta)
        _, self.meta = Flow.load(path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, config: dict) -> "Scorer":
        """Load a saved scorer; a config that disagrees on encoder, pooling, levels, tile mpp or size is refused."""
        path = Path(path)
        flow, meta = Flow.load(path, device=config["flow"]["device"])
        bound = meta.get("bound", {})
        for key in BOUND_KEYS:
            want = _config_value(config, key)
            have = bound.get(key)
            if have != want and not (isinstance(have, list) and list(want or []) == have):
                raise ConfigError(f"scorer {path} was fitted with {key}={have!r} but the config asks for {want!r}; "
                                  f"use the config the scorer was fitted with or refit with wsi-qc fit-reference")
        encoder = encoder_from_config(config)
        if encoder.weights_sha256 != meta["encoder"]["weights_sha256"]:
            raise ConfigError(f"scorer {path} was fitted with encoder weights {meta['encoder']['weights_sha256']} but "
                              f"encoder.weights={config['encoder']['weights']!r} has {encoder.weights_sha256}; "
                              f"point encoder.weights at the original weights or refit")
        scorer = cls(encoder, flow, config)
        scorer.meta = meta
        return scorer
