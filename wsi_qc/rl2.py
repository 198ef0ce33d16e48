"""The RL2 metric in the flow's latent space (pure numpy), after Jeevan et al., arXiv 2411.01034.

- per tile: ``rl2 = sqrt(mean_d (z_d - mu_d)^2)``, the RMSE between a tile's latent z and the reference's
  mean latent mu (higher = further from the reference);
- per set: ``RL2(A, B) = || mean(z_A) - mean(z_B) ||_2``, or divided by sqrt(D) with ``rmse=True``;
  ``set_rl2_ci`` adds a 95 % percentile bootstrap interval that resamples both sets (with replacement,
  independently). The bootstrap distribution of a norm is biased upwards: two samples of the same
  tissue give a point value near 0 but an interval above it, so compare intervals, not zero;
- ``frechet_distance``: the FID formula on two feature (or latent) sets,
  ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` with sample covariances.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import linalg

from wsi_qc.errors import ConfigError

log = logging.getLogger(__name__)


def _as_2d(x, name: str, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be a 2-d array (tiles, dims), got shape {x.shape}")
    if len(x) < min_rows:
        raise ConfigError(f"{name} holds {len(x)} rows; at least {min_rows} are needed")
    return x


def _same_dims(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"{names} have {a.shape[1]} and {b.shape[1]} dimensions; both sets must come "
                          f"from the same encoder and flow")


def tile_rl2(z, mu) -> np.ndarray:
    """Per-tile rl2 (N,): RMSE between each latent row and the reference mean latent `mu`."""
    z = _as_2d(z, "z", min_rows=0)
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    if mu.shape[0] != z.shape[1]:
        raise ConfigError(f"z has {z.shape[1]} dimensions but mu has {mu.shape[0]}; use the mu_ of the flow "
                          f"that produced z")
    return np.sqrt(((z - mu) ** 2).mean(axis=1))


def set_rl2(z_a, z_b, rmse: bool = False) -> float:
    """RL2 between two latent sets: L2 distance of their means (over sqrt(D) with rmse=True)."""
    a, b = _as_2d(z_a, "z_a"), _as_2d(z_b, "z_b")
    _same_dims(a, b, "z_a and z_b")
    value = float(np.linalg.norm(a.mean(0) - b.mean(0)))
    return value / np.sqrt(a.shape[1]) if rmse else value


def _bootstrap_means(x: np.ndarray, n_bootstrap: int, rng: np.random.Generator, chunk: int = 100) -> np.ndarray:
    """Means (n_bootstrap, D) of resamples of x's rows, drawn as multinomial counts (no row copies)."""
    n = len(x)
    out = np.empty((n_bootstrap, x.shape[1]))
    for start in range(0, n_bootstrap, chunk):
        stop = min(start + chunk, n_bootstrap)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=stop - start)
        out[start:stop] = counts @ x / n
    return out


def set_rl2_ci(z_a, z_b, n_bootstrap: int = 1000, seed: int = 0, rmse: bool = False) -> tuple[float, float, float]:
    """(RL2, 2.5 %, 97.5 %): RL2 with a percentile bootstrap interval resampling both sets."""
    a, b = _as_2d(z_a, "z_a"), _as_2d(z_b, "z_b")
    _same_dims(a, b, "z_a and z_b")
    if n_bootstrap < 1:
        raise ConfigError(f"n_bootstrap={n_bootstrap} must be >= 1; 1000 is typical")
    rng = np.random.default_rng(seed)
    diffs = _bootstrap_means(a, n_bootstrap, rng) - _bootstrap_means(b, n_bootstrap, rng)
    values = np.linalg.norm(diffs, axis=1)
    if rmse:
        values = values / np.sqrt(a.shape[1])
    lo, hi = np.percentile(values, [2.5, 97.5])
    return set_rl2(a, b, rmse=rmse), float(lo), float(hi)


def frechet_distance(f_a, f_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two sets (the FID formula).

    When the covariance product is singular (fewer rows than dims) and its square root is not finite,
    `eps` is added to both diagonals; the imaginary part left by numerical error is dropped.
    """
    a, b = _as_2d(f_a, "f_a", min_rows=2), _as_2d(f_b, "f_b", min_rows=2)
    _same_dims(a, b, "f_a and f_b")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        log.warning("covariance product is singular; adding %g to the diagonals", eps)
        offset = np.eye(len(s_a)) * eps
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(np.abs(covmean.real).max(), 1e-12):
            log.warning("sqrtm left an imaginary part of %.3g; using the real part", imag)
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
