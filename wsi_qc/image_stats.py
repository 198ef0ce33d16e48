"""Cheap image statistics of tiles, in torch on the encoder's RGB tensor: per tile (`image_statistics`) and per
map position (`local_statistics`), appended to the encoder's features."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

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


def rgb_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 RGB tiles (B, H, W, 3) as the float RGB tensor (B, 3, H, W) in [0, 1] the statistics and encoder take."""
    nchw = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
    # planar in the same pass as the conversion: the statistics and the exported networks read channel planes
    return nchw.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std over the last dimension; two passes, faster than torch.std on CPU."""
    mean = x.mean(-1)
    return mean, (x - mean[..., None]).square_().mean(-1).sqrt_()


def _block_steps(steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean grey step (B,) across 8-px block edges (steps j -> j + 1 with j % 8 == 7 along the last axis) and
    elsewhere."""
    edges = steps[..., 7::8]
    n_edges, n_rest = edges[0].numel(), steps[0].numel() - edges[0].numel()
    edge_sum = edges.sum((1, 2))
    return edge_sum / n_edges, (steps.sum((1, 2)) - edge_sum) / n_rest


class Pixels(NamedTuple):
    """Per-pixel planes of RGB tiles that both kinds of statistics read, computed once per batch (`pixel_planes`)."""

    grey: torch.Tensor  # (B, H, W) grey level (ITU-R 601 luma)
    lap: torch.Tensor   # (B, H, W) its 4-neighbour Laplacian, edges replicated
    high: torch.Tensor  # (B, H, W) HSV value (the largest channel)
    sat: torch.Tensor   # (B, H, W) HSV saturation
    off: torch.Tensor   # (B, H, W) bool: saturated with a hue outside H&E's pink-purple
    od: torch.Tensor    # (B, 3, H, W) optical density per channel


def pixel_planes(rgb: torch.Tensor) -> Pixels:
    """The per-pixel planes of RGB tiles (B, 3, H, W) in [0, 1]. In-place steps on fresh buffers keep the buffers
    few: on CPU, memory traffic costs more here than the arithmetic."""
    r, g, bl = rgb.unbind(1)
    grey = torch.mul(r, 0.299).add_(g, alpha=0.587).add_(bl, alpha=0.114)
    padded = F.pad(grey[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    lap = padded[:, 1:-1, 1:-1] * 4
    for shifted in (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]):
        lap.sub_(shifted)
    high = torch.maximum(r, g).maximum(bl)
    sat = torch.minimum(r, g).minimum(bl).neg_().add_(high).div_(high.clamp_min(1e-6))
    # H&E hues are pink to purple: red and blue above green. Ink and other dyes put green at or above one of them.
    off = (sat > 0.15) & ((g >= r) | (g >= bl))
    return Pixels(grey, lap, high, sat, off, rgb.clamp_min(1 / 255).log_().neg_())


def image_statistics(rgb: torch.Tensor, pixels: Pixels | None = None) -> torch.Tensor:
    """Per-tile statistics (B, len(IMAGE_STATS)) of RGB tiles (B, 3, H, W) in [0, 1]; see IMAGE_STATS. `pixels`:
    their `pixel_planes`, when already computed.

    Medians and percentiles are order statistics (the elements at rank n // 2 and int(0.99 (n - 1)) of n). The
    Laplacian statistics use interior pixels only. HED channels use scikit-image's Ruifrok-Johnston matrix
    (`hed_from_rgb`) on the optical density.
    """
    from skimage.color import hed_from_rgb

    px = pixel_planes(rgb) if pixels is None else pixels
    b, _, h, w = rgb.shape
    lap = px.lap[:, 1:-1, 1:-1].abs().view(b, -1)
    across_x, within_x = _block_steps((px.grey[:, :, 1:] - px.grey[:, :, :-1]).abs_())
    across_y, within_y = _block_steps((px.grey[:, 1:] - px.grey[:, :-1]).abs_().transpose(1, 2))
    high, sat, off = px.high.reshape(b, -1), px.sat.reshape(b, -1), px.off.reshape(b, -1)
    od = px.od.reshape(b, 3, h * w)
    od_pixel = od.mean(1)
    n = od_pixel.shape[1]
    m = hed_from_rgb.tolist()
    od_r, od_g, od_b = od.unbind(1)
    hematoxylin = torch.mul(od_r, m[0][0]).add_(od_g, alpha=m[1][0]).add_(od_b, alpha=m[2][0]).clamp_min_(0)
    eosin = torch.mul(od_r, m[0][1]).add_(od_g, alpha=m[1][1]).add_(od_b, alpha=m[2][1]).clamp_min_(0)
    eps = 1e-6
    return torch.stack([
        torch.log(_mean_std(lap)[1].square() + eps),
        torch.log(lap.kthvalue(lap.shape[1] // 2 + 1, dim=1).values + eps),
        torch.log((across_x + across_y + eps) / (within_x + within_y + eps)),
        *_mean_std(sat), *_mean_std(high),
        *od.mean(2).unbind(1),
        _mean_std(od_pixel)[1], od_pixel.topk(n - int(0.99 * (n - 1)), dim=1).values.amin(1),  # rank int(0.99 (n-1))
        *_mean_std(hematoxylin), *_mean_std(eosin),
        (high < 0.3).float().mean(1), off.float().mean(1),
    ], dim=1)


# Per-position statistics (appended to local features with image_stats=True), one channel each; each is the
# mean over the pixels of one grid cell.
LOCAL_STATS = (
    "log_laplacian_energy",  # sharpness: log mean squared grey-level Laplacian (blur, defocus, noise)
    "saturation",            # HSV saturation (stain strength, bubbles, pen)
    "value",                 # HSV value (brightness: folds, bubbles, debris)
    "od_red",                # optical density per RGB channel (stain amount and colour)
    "od_green",
    "od_blue",
    "dark_fraction",         # pixels with HSV value < 0.3 (debris, ink, bubble rims)
    "off_palette_fraction",  # saturated pixels with a hue outside H&E's pink-purple (pen)
    "dark_neutral_fraction",  # dark, greyish pixels (HSV value < 0.4, saturation < 0.4): dust, debris, foreign
                              # bodies, black ink; stained nuclei are darker only where they are saturated
)
DARK_NEUTRAL = (0.4, 0.4)  # HSV value and saturation below which a pixel counts as dark neutral


def local_statistics(rgb: torch.Tensor, grid: int, pixels: Pixels | None = None) -> torch.Tensor:
    """Per-position statistics (B, len(LOCAL_STATS), grid, grid) of RGB tiles (B, 3, H, W) in [0, 1]. `pixels`:
    their `pixel_planes`, when already computed."""
    px = pixel_planes(rgb) if pixels is None else pixels
    neutral = (px.high < DARK_NEUTRAL[0]) & (px.sat < DARK_NEUTRAL[1])
    planes = [px.lap.square(), px.sat, px.high, px.od, px.high < 0.3, px.off, neutral]
    cells = torch.cat([F.adaptive_avg_pool2d((p if p.ndim == 4 else p[:, None]).float(), grid) for p in planes], 1)
    return torch.cat([torch.log(cells[:, :1] + 1e-6), cells[:, 1:]], dim=1)
