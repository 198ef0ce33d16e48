"""Tissue masks from slide thumbnails: Otsu on saturation or optical density, then morphology."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage import color, filters, morphology

from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("otsu_saturation", "otsu_od", "tiatoolbox_otsu", "tiatoolbox_morphological")

# Otsu always splits an image in two, even a blank one; its threshold is never allowed below these
# floors, so a white (or nearly white) thumbnail gives an empty mask instead of noise.
MIN_SATURATION = 0.05  # HSV saturation, 0..1
MIN_OD = 0.05  # optical density, log10, mean of the three channels (about grey level 228)


def find_tissue(
    thumbnail: np.ndarray,
    mpp: float,
    method: str = "otsu_saturation",
    min_area_um2: float = 1e4,
    closing_um: float = 16,
    fill_holes: bool = True,
) -> np.ndarray:
    """Boolean tissue mask (h, w) of an RGB uint8 thumbnail read at `mpp` µm/px.

    The method gives a first mask; then a closing of radius `closing_um` joins nearby pieces,
    holes are filled (`fill_holes`) and pieces smaller than `min_area_um2` are dropped.
    Methods: otsu_saturation (HSV saturation, finds pale stains), otsu_od (optical density),
    tiatoolbox_otsu / tiatoolbox_morphological (tiatoolbox's maskers, for comparison).
    """
    image = _check_thumbnail(thumbnail)
    if not mpp > 0:
        raise ConfigError(f"thumbnail mpp must be > 0, got {mpp!r}; pass the mpp the thumbnail was read at")
    if min_area_um2 < 0 or closing_um < 0:
        raise ConfigError(
            f"tissue.min_area_um2 and tissue.closing_um must be >= 0, got {min_area_um2!r} and {closing_um!r}"
        )
    if method == "otsu_saturation":
        mask = _otsu_above(color.rgb2hsv(image)[..., 1], MIN_SATURATION)
    elif method == "otsu_od":
        mask = _otsu_above(optical_density(image), MIN_OD)
    elif method in ("tiatoolbox_otsu", "tiatoolbox_morphological"):
        mask = _tiatoolbox_mask(image, mpp, method, min_area_um2)
    else:
        raise ConfigError(f"unknown tissue method {method!r}; choose one of {', '.join(METHODS)}")

    radius = int(round(closing_um / mpp))
    if radius > 0 and mask.any():
        mask = morphology.closing(mask, morphology.disk(radius, decomposition="sequence"), mode="ignore")
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    min_pixels = int(np.ceil(min_area_um2 / mpp**2))
    if min_pixels > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_pixels - 1, connectivity=2)
    log.debug("tissue %s: %.1f %% of a %s thumbnail at %g mpp", method, 100 * mask.mean(), mask.shape, mpp)
    return mask.astype(bool, copy=False)


def optical_density(image: np.ndarray) -> np.ndarray:
    """Mean optical density (log10) over the RGB channels of a uint8 image, 0 for white."""
    return -np.log10((image.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)


def _otsu_above(values: np.ndarray, floor: float) -> np.ndarray:
    """Pixels above Otsu's threshold of `values`, the threshold being at least `floor`."""
    if values.max() <= floor:
        return np.zeros(values.shape, dtype=bool)
    threshold = max(float(filters.threshold_otsu(values)), floor)
    return values > threshold


def _tiatoolbox_mask(image: np.ndarray, mpp: float, method: str, min_area_um2: float) -> np.ndarray:
    try:
        from tiatoolbox.tools import tissuemask
    except ImportError as error:
        raise ConfigError(
            f"tissue method {method!r} needs tiatoolbox, which is not importable ({error}); "
            "install it with `pip install --no-deps tiatoolbox==2.1.3` or choose otsu_saturation / otsu_od"
        ) from error
    if method == "tiatoolbox_otsu":
        masker = tissuemask.OtsuTissueMasker()
    else:
        min_region = max(1, int(np.ceil(min_area_um2 / mpp**2)))
        masker = tissuemask.MorphologicalMasker(mpp=mpp, min_region_size=min_region)
    return np.asarray(masker.fit_transform(image[np.newaxis])[0], dtype=bool)


def _check_thumbnail(thumbnail: np.ndarray) -> np.ndarray:
    image = np.asarray(thumbnail)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
        raise ConfigError(
            f"thumbnail must be an RGB uint8 array (h, w, 3), got dtype {image.dtype} shape {image.shape}; "
            "read it with Slide.thumbnail(mpp)"
        )
    if min(image.shape[:2]) < 2:
        raise ConfigError(f"thumbnail of shape {image.shape} is too small to find tissue; use a finer thumbnail mpp")
    return np.ascontiguousarray(image[..., :3])
