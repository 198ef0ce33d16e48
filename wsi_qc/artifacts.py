"""Image degradations and synthetic slide artifacts, pure numpy / scipy / scikit-image.

Two groups, both seeded with a `numpy.random.Generator`:

- `degrade(images, kind, level, rng)`: the controlled degradations of the RL2 study
  (Jeevan et al., arXiv 2411.01034): Gaussian blur, additive Gaussian noise, salt-and-pepper,
  random filled rectangles and DDPM forward diffusion. `LEVELS[kind]` lists the study's levels,
  increasing, the first (0) being the identity. A level is the parameter itself (sigma, fraction,
  count, timestep), not an index.
- `make_artifact(image, kind, severity, rng)`: artifacts that look like real slide defects
  (blur, defocus, pen, fold, bubble, over/under-staining, JPEG, noise, debris) at severity 1..3,
  for a labelled calibration set. Geometric sizes scale with the tile side (224 px = reference).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed
from skimage.draw import polygon

from wsi_qc.errors import ConfigError

LEVELS: dict[str, tuple[float, ...]] = {
    "blur": (0, 1, 2, 3, 4, 6, 8),  # Gaussian sigma, px
    "noise": (0, 5, 10, 20, 30, 50, 75),  # additive Gaussian sigma, 0-255 units
    "salt_pepper": (0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2),  # fraction of pixels set to 0 or 255
    "rectangles": (0, 1, 2, 3, 5, 8, 12),  # random filled rectangles per image
    "diffusion": (0, 10, 25, 50, 100, 200, 400),  # DDPM timestep t of q(x_t | x_0), T = 1000
}
DEGRADATION_KINDS: tuple[str, ...] = tuple(LEVELS)

ARTIFACT_KINDS: tuple[str, ...] = ("blur", "defocus", "pen", "fold", "bubble", "overstain", "understain",
                                   "jpeg", "noise", "debris", "small_bubble", "small_debris", "small_pen")
# Local kinds cover a small part of the tile: 5, 10 or 20 % of its area at severity 1, 2, 3.
LOCAL_COVER: tuple[float, ...] = (0.05, 0.10, 0.20)
SEVERITIES: tuple[int, ...] = (1, 2, 3)

# DDPM linear schedule (Ho et al. 2020): beta_t from 1e-4 to 0.02 over T = 1000 steps.
DIFFUSION_T = 1000
_ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, DIFFUSION_T))


def _check_kind(kind: str, kinds: tuple[str, ...], what: str) -> None:
    if kind not in kinds:
        raise ConfigError(f"unknown {what} kind {kind!r}; choose one of: {', '.join(kinds)}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Degradations of the RL2 study
# ---------------------------------------------------------------------------------------------

def degrade(images: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """Degrade a batch of uint8 RGB images (B, H, W, 3); level 0 returns an unchanged copy.

    kinds (see `LEVELS` for the study's values): blur (Gaussian sigma, px), noise (additive Gaussian
    sigma, 0-255 units), salt_pepper (fraction of pixels), rectangles (count of random filled
    rectangles of random colour and size), diffusion (DDPM timestep t: sqrt(abar_t) x0 +
    sqrt(1 - abar_t) eps with x in [-1, 1], linear betas 1e-4..0.02, T = 1000).
    """
    _check_kind(kind, DEGRADATION_KINDS, "degradation")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"degrade expects uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}; "
                          f"stack RGB tiles into one uint8 array")
    if level < 0:
        raise ConfigError(f"{kind} level must be >= 0, got {level}; use one of LEVELS[{kind!r}] = {LEVELS[kind]}")
    if level == 0:
        return images.copy()
    if kind == "blur":
        return _to_uint8(ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, level, level, 0),
                                                 mode="reflect", truncate=3.0))
    if kind == "noise":
        return _to_uint8(images + rng.normal(0.0, level, images.shape))
    if kind == "salt_pepper":
        if level > 1:
            raise ConfigError(f"salt_pepper level is a fraction of pixels in [0, 1], got {level}")
        out = images.copy()
        hit = rng.random(images.shape[:3]) < level
        salt = rng.random(images.shape[:3]) < 0.5
        out[hit & salt] = 255
        out[hit & ~salt] = 0
        return out
    if kind == "rectangles":
        return _rectangles(images, int(round(level)), rng)
    t = int(round(level))
    if t > DIFFUSION_T:
        raise ConfigError(f"diffusion level is a timestep in 0..{DIFFUSION_T}, got {level}")
    abar = _ALPHA_BAR[t - 1]
    x0 = images.astype(np.float64) / 127.5 - 1.0
    xt = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * rng.standard_normal(images.shape)
    return _to_uint8((xt + 1.0) * 127.5)


def _rectangles(images: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    _, h, w, _ = images.shape
    for img in out:
        for _ in range(count):
            rh = int(rng.integers(max(1, h // 10), max(2, h // 3) + 1))
            rw = int(rng.integers(max(1, w // 10), max(2, w // 3) + 1))
            y = int(rng.integers(0, h - rh + 1))
            x = int(rng.integers(0, w - rw + 1))
            img[y:y + rh, x:x + rw] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic slide artifacts for calibration
# ---------------------------------------------------------------------------------------------

def make_artifact(image: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of a uint8 RGB tile (H, W, 3) with one synthetic artifact; severity 1 (mild) to 3 (strong).

    kinds (`ARTIFACT_KINDS`): blur (Gaussian out-of-focus), defocus (disc kernel), pen (marker
    strokes: green, blue or black), fold (tissue folded over itself: darker, more saturated band),
    bubble (air bubble: pale disc, dark rim), overstain / understain (H and E concentrations
    scaled in HED space), jpeg (heavy compression), noise (Gaussian sensor noise), debris (dark
    dust particles and fibres); small_bubble, small_debris, small_pen: one bubble, one speck of dust or
    one ink blot covering LOCAL_COVER[severity - 1] of the tile (5-20 %), the rest untouched.
    """
    _check_kind(kind, ARTIFACT_KINDS, "artifact")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ConfigError(f"make_artifact expects one uint8 RGB tile (H, W, 3), got {image.dtype} {image.shape}")
    if severity not in SEVERITIES:
        raise ConfigError(f"artifact severity must be one of {SEVERITIES}, got {severity!r}")
    return _ARTIFACTS[kind](image, severity, rng)


def _scale(image: np.ndarray) -> float:
    """Geometric scale of a tile relative to the 224 px reference tile."""
    return min(image.shape[:2]) / 224.0


def _blur(image, severity, rng):
    sigma = (1.5, 3.0, 5.0)[severity - 1] * rng.uniform(0.85, 1.15)
    return _to_uint8(ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect"))


def _defocus(image, severity, rng):
    radius = (2.0, 4.0, 7.0)[severity - 1] * rng.uniform(0.85, 1.15)
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    # anti-aliased pillbox: coverage of each kernel pixel by a disc of the given radius
    kernel = np.clip(radius + 0.5 - np.hypot(yy, xx), 0.0, 1.0)
    kernel /= kernel.sum()
    img = image.astype(np.float32)
    out = np.stack([ndimage.convolve(img[..., c], kernel, mode="reflect") for c in range(3)], axis=-1)
    return _to_uint8(out)


def _smooth_path(h: int, w: int, rng: np.random.Generator, n: int = 200) -> np.ndarray:
    """A smooth random curve (n, 2) of (y, x) points crossing a good part of an h x w tile."""
    length = rng.uniform(0.6, 1.3) * max(h, w)
    start = np.array([rng.uniform(0, h), rng.uniform(0, w)])
    heading = rng.uniform(0, 2 * np.pi)
    bend = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma=n / 6, mode="nearest")
    angles = heading + 0.6 * bend / (bend.std() + 1e-12)  # gentle, slowly varying curvature
    steps = np.stack([np.sin(angles), np.cos(angles)], axis=1) * (length / n)
    path = np.cumsum(steps, axis=0)
    return start + path - path[n // 2]  # the stroke's middle lies on start, inside the tile


_INK = {  # transmittance of marker ink per RGB channel (multiplicative, Beer-Lambert-like)
    "green": (0.10, 0.55, 0.25),
    "blue": (0.12, 0.22, 0.75),
    "black": (0.12, 0.12, 0.15),
}


def _draw(mask: np.ndarray, points: np.ndarray) -> None:
    """Set the pixels of mask under (y, x) points that fall inside it."""
    pts = np.rint(points).astype(int)
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < mask.shape[0]) & (pts[:, 1] >= 0) & (pts[:, 1] < mask.shape[1])
    mask[pts[ok, 0], pts[ok, 1]] = True


def _mottle(shape: tuple[int, int], sigma: float, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random factor in [1 - 2 amount, 1] (uneven ink or dirt density)."""
    g = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    g /= g.std() + 1e-12
    return np.clip(1.0 - amount + amount * np.clip(g, -1, 1), 0.0, 1.0)


def _pen(image, severity, rng):
    h, w = image.shape[:2]
    s = _scale(image)
    ink = np.array(_INK[rng.choice(list(_INK))])
    n_strokes = (1, 2, 3)[severity - 1]
    width = (12.0, 24.0, 44.0)[severity - 1] * s
    alpha = (0.55, 0.75, 0.9)[severity - 1]
    centre = np.zeros((h, w), bool)
    for _ in range(n_strokes):
        _draw(centre, _smooth_path(h, w, rng))
    dist = ndimage.distance_transform_edt(~centre)
    # soft-edged stroke with uneven ink density along it
    mask = np.clip((width / 2 - dist) / max(1.0, width * 0.15) + 0.5, 0.0, 1.0)
    a = (alpha * mask * _mottle((h, w), 4 * s + 1, 0.12, rng))[..., None]
    out = image.astype(np.float32) * (1.0 - a + a * ink)
    return _to_uint8(out)


def _band(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Signed distance (px) of every pixel to a random line through the middle part of the tile."""
    theta = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)


def _od(image: np.ndarray) -> np.ndarray:
    return -np.log((image.astype(np.float32) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return _to_uint8(np.exp(-od) * 256.0 - 1.0)


def _fold(image, severity, rng):
    h, w = image.shape[:2]
    s = _scale(image)
    half = (0.10, 0.18, 0.28)[severity - 1] * min(h, w) * rng.uniform(0.85, 1.15)
    extra = (0.45, 0.7, 1.0)[severity - 1]
    dist = _band(h, w, rng)
    # soft band edges (the fold's crease is not a sharp line)
    inside = np.clip((half - np.abs(dist)) / (4.0 * s + 1.0) + 0.5, 0.0, 1.0)
    # the folded-over layer: a shifted, mirrored copy of the tissue, adding its optical density
    shift = (int(rng.integers(-h // 4, h // 4 + 1)), int(rng.integers(-w // 4, w // 4 + 1)))
    layer = np.roll(image[::-1] if rng.random() < 0.5 else image[:, ::-1], shift, axis=(0, 1))
    layer_od = _od(ndimage.gaussian_filter(layer.astype(np.float32), sigma=(1, 1, 0)).clip(0, 255))
    od = _od(image) + inside[..., None] * (extra * layer_od + 0.08 * extra)
    return _from_od(od)


def _bubble(image, severity, rng):
    h, w = image.shape[:2]
    n = (1, 2, 3)[severity - 1]
    radius_frac = (0.18, 0.28, 0.38)[severity - 1]
    img = image.astype(np.float32)
    # refraction inside the bubble: blurred, washed-out tissue
    blurred = ndimage.gaussian_filter(img, sigma=(2, 2, 0))
    out = img.copy()
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        r = radius_frac * min(h, w) * rng.uniform(0.7, 1.3)
        cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
        d = np.hypot(yy - cy, xx - cx)
        inside = np.clip(r - d + 0.5, 0.0, 1.0)[..., None]
        ring_w = max(1.5, 0.08 * r)
        ring = np.exp(-0.5 * ((d - r) / ring_w) ** 2)[..., None]
        pale = 0.45 * blurred + 0.55 * 245.0
        out = out * (1 - inside) + pale * inside
        out = out * (1 - 0.65 * ring) + 60.0 * 0.65 * ring  # dark grey rim
    return _to_uint8(out)


def _hed_scale(image, factors):
    """Scale haematoxylin and eosin concentrations; the transmittance ratio keeps what HED cannot model."""
    hed = rgb2hed(image)
    scaled = hed.copy()
    scaled[..., 0] *= factors[0]
    scaled[..., 1] *= factors[1]
    ratio = hed2rgb(scaled) / np.maximum(hed2rgb(hed), 1e-6)
    return _to_uint8(image * ratio)


def _overstain(image, severity, rng):
    base = (1.5, 2.0, 2.8)[severity - 1]
    return _hed_scale(image, base * rng.uniform(0.9, 1.1, 2))


def _understain(image, severity, rng):
    base = (0.65, 0.45, 0.25)[severity - 1]
    return _hed_scale(image, base * rng.uniform(0.9, 1.1, 2))


def _jpeg(image, severity, rng):
    quality = int(rng.integers(*((16, 21), (10, 15), (5, 9))[severity - 1]))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


def _noise(image, severity, rng):
    sigma = (8.0, 16.0, 28.0)[severity - 1]
    # sensor noise: mostly shared across channels (luminance) plus a little per channel (chroma)
    lum = rng.normal(0.0, sigma * 0.8, image.shape[:2])[..., None]
    chroma = rng.normal(0.0, sigma * 0.6, image.shape)
    return _to_uint8(image + lum + chroma)


def _debris(image, severity, rng):
    h, w = image.shape[:2]
    s = _scale(image)
    n = (6, 14, 30)[severity - 1]
    alpha = np.zeros((h, w), np.float32)
    for _ in range(n):
        r = rng.uniform(2.0, 5.0 + 2.5 * severity) * s
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        k = int(rng.integers(6, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = r * rng.uniform(0.4, 1.0, k)
        rr, cc = polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=(h, w))
        alpha[rr, cc] = np.maximum(alpha[rr, cc], rng.uniform(0.7, 0.95))
    fibres = np.zeros((h, w), bool)
    for _ in range(severity - 1):  # a few thin fibres
        _draw(fibres, _smooth_path(h, w, rng, n=400)[:int(rng.integers(150, 400))])
    if fibres.any():
        fibres = ndimage.distance_transform_edt(~fibres) <= max(0.8, 0.7 * s)
        alpha = np.maximum(alpha, 0.8 * fibres)
    alpha = np.clip(ndimage.gaussian_filter(alpha, sigma=0.6 * s + 0.3), 0, 1)[..., None]
    colour = np.array([45.0, 35.0, 30.0])  # dark brown-black dust
    out = image.astype(np.float32) * (1 - alpha) + colour * alpha
    return _to_uint8(out)


def _blob(h: int, w: int, cover: float, rng: np.random.Generator) -> np.ndarray:
    """Soft mask of one irregular blob inside the tile covering about `cover` of its area."""
    r = np.sqrt(cover * h * w / np.pi)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = sum(rng.uniform(0.05, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    d = np.hypot(yy - cy, xx - cx) / (r * (1 + wobble))
    return np.clip((1.0 - d) * r / 2.0 + 0.5, 0.0, 1.0)


def _small_bubble(image, severity, rng):
    h, w = image.shape[:2]
    r = np.sqrt(LOCAL_COVER[severity - 1] * h * w / np.pi)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(yy - cy, xx - cx)
    img = image.astype(np.float32)
    pale = 0.45 * ndimage.gaussian_filter(img, sigma=(2, 2, 0)) + 0.55 * 245.0
    inside = np.clip(r - d + 0.5, 0.0, 1.0)[..., None]
    ring = np.exp(-0.5 * ((d - r) / max(1.5, 0.08 * r)) ** 2)[..., None]
    out = img * (1 - inside) + pale * inside
    return _to_uint8(out * (1 - 0.65 * ring) + 60.0 * 0.65 * ring)


def _small_debris(image, severity, rng):
    h, w = image.shape[:2]
    alpha = _blob(h, w, LOCAL_COVER[severity - 1], rng) * _mottle((h, w), 3.0, 0.15, rng)
    alpha = alpha[..., None] * rng.uniform(0.8, 0.95)
    return _to_uint8(image.astype(np.float32) * (1 - alpha) + np.array([45.0, 35.0, 30.0]) * alpha)


def _small_pen(image, severity, rng):
    h, w = image.shape[:2]
    ink = np.array(_INK[rng.choice(list(_INK))])
    a = (rng.uniform(0.6, 0.85) * _blob(h, w, LOCAL_COVER[severity - 1], rng) * _mottle((h, w), 5.0, 0.12, rng))
    return _to_uint8(image.astype(np.float32) * (1.0 - a[..., None] + a[..., None] * ink))


_ARTIFACTS = {
    "blur": _blur, "defocus": _defocus, "pen": _pen, "fold": _fold, "bubble": _bubble,
    "overstain": _overstain, "understain": _understain, "jpeg": _jpeg, "noise": _noise, "debris": _debris,
    "small_bubble": _small_bubble, "small_debris": _small_debris, "small_pen": _small_pen,
}
