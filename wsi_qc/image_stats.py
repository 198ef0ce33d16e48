"""Cheap image statistics of tiles: per tile in numpy (`image_statistics`) and per map position in torch
(`local_statistics`), appended to the encoder's features."""

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
)


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
    pixels = torch.cat([lap * lap, sat, high, od, (high < 0.3).float(), off], dim=1)
    cells = F.adaptive_avg_pool2d(pixels, grid)
    return torch.cat([torch.log(cells[:, :1] + 1e-6), cells[:, 1:]], dim=1)
