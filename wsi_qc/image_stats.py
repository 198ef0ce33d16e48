"""Cheap image statistics of tiles, in torch on the encoder's RGB tensor: per tile (`image_statistics`) and per
map position (`local_statistics`), appended to the encoder's features."""

from __future__ import annotations

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


def image_statistics(rgb: torch.Tensor) -> torch.Tensor:
    """Per-tile statistics (B, len(IMAGE_STATS)) of RGB tiles (B, 3, H, W) in [0, 1]; see IMAGE_STATS.

    Medians and percentiles are order statistics (the elements at rank n // 2 and int(0.99 (n - 1)) of n). HED
    channels use scikit-image's Ruifrok-Johnston matrix (`hed_from_rgb`) on the optical density. In-place steps
    on fresh buffers keep the per-pixel buffers few: on CPU, memory traffic costs more here than the arithmetic.
    """
    from skimage.color import hed_from_rgb

    b, _, h, w = rgb.shape
    pixels = rgb.reshape(b, 3, h * w)
    r, g, bl = pixels.unbind(1)
    grey = torch.mul(r, 0.299).add_(g, alpha=0.587).add_(bl, alpha=0.114).view(b, h, w)
    lap = grey[:, 1:-1, 1:-1] * 4
    for shifted in (grey[:, :-2, 1:-1], grey[:, 2:, 1:-1], grey[:, 1:-1, :-2], grey[:, 1:-1, 2:]):
        lap.sub_(shifted)
    lap = lap.abs_().view(b, -1)
    across_x, within_x = _block_steps((grey[:, :, 1:] - grey[:, :, :-1]).abs_())
    across_y, within_y = _block_steps((grey[:, 1:] - grey[:, :-1]).abs_().transpose(1, 2))
    high = torch.maximum(r, g).maximum(bl)
    sat = torch.minimum(r, g).minimum(bl).neg_().add_(high).div_(high.clamp_min(1e-6))
    # H&E hues are pink to purple: red and blue above green. Ink and other dyes put green at or above one of them.
    off = (sat > 0.15) & ((g >= r) | (g >= bl))
    od = pixels.clamp_min(1 / 255).log_().neg_()
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


def local_statistics(rgb: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-position statistics (B, len(LOCAL_STATS), grid, grid) of RGB tiles (B, 3, H, W) in [0, 1]."""
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    grey = 0.299 * r + 0.587 * g + 0.114 * b
    kernel = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], device=rgb.device).view(1, 1, 3, 3)
    lap = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernel)
    high = rgb.amax(1, keepdim=True)
    sat = (high - rgb.amin(1, keepdim=True)) / high.clamp_min(1e-6)
    od = -torch.log(rgb.clamp_min(1 / 255))
    off = ((sat > 0.15) & ((g >= r) | (g >= b))).float()
    neutral = ((high < DARK_NEUTRAL[0]) & (sat < DARK_NEUTRAL[1])).float()
    pixels = torch.cat([lap * lap, sat, high, od, (high < 0.3).float(), off, neutral], dim=1)
    cells = F.adaptive_avg_pool2d(pixels, grid)
    return torch.cat([torch.log(cells[:, :1] + 1e-6), cells[:, 1:]], dim=1)
