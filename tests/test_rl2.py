"""Tests of wsi_qc.rl2 against closed-form values."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_qc.errors import ConfigError
from wsi_qc.rl2 import frechet_distance, set_rl2, set_rl2_ci, tile_rl2


def exact_gaussian_sample(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n rows whose sample mean and sample covariance (ddof=1) equal `mean` and `cov` exactly."""
    x = np.random.default_rng(seed).standard_normal((n, len(mean)))
    x -= x.mean(0)
    w = np.linalg.cholesky(np.cov(x, rowvar=False))
    x = np.linalg.solve(w, x.T).T  # sample covariance is now the identity
    return x @ np.linalg.cholesky(cov).T + mean


def test_tile_rl2_is_rmse_to_mu():
    z = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0], [3.0, -3.0, 3.0, -3.0]])
    mu = np.zeros(4)
    np.testing.assert_allclose(tile_rl2(z, mu), [0.0, 1.0, 1.0, 3.0])
    np.testing.assert_allclose(tile_rl2(z + 5.0, mu + 5.0), [0.0, 1.0, 1.0, 3.0])
    assert tile_rl2(np.zeros((0, 4)), mu).shape == (0,)


def test_tile_rl2_refuses_other_dims():
    with pytest.raises(ConfigError, match="z has 4 dimensions but mu has 3"):
        tile_rl2(np.zeros((2, 4)), np.zeros(3))


def test_set_rl2_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 16))
    assert set_rl2(a, a) == 0.0
    shift = np.zeros(16)
    shift[:4] = 3.0  # norm 6
    b = a + shift
    assert set_rl2(a, b) == pytest.approx(6.0)
    assert set_rl2(b, a) == pytest.approx(6.0)
    assert set_rl2(a, b, rmse=True) == pytest.approx(6.0 / 4.0)
    # sets of different sizes: only the means count
    assert set_rl2(a[:100] - a[:100].mean(0), np.full((7, 16), 2.0)) == pytest.approx(8.0)


def test_set_rl2_refuses_other_dims():
    with pytest.raises(ConfigError, match="z_a and z_b have 3 and 4 dimensions"):
        set_rl2(np.zeros((5, 3)), np.zeros((5, 4)))


def test_set_rl2_ci_covers_the_true_distance():
    rng = np.random.default_rng(1)
    d, true = 8, 1.0
    a = rng.standard_normal((400, d))
    b = rng.standard_normal((400, d)) + true / np.sqrt(d)  # population RL2 = 1.0
    value, lo, hi = set_rl2_ci(a, b, n_bootstrap=500, seed=0)
    assert value == pytest.approx(set_rl2(a, b))
    assert lo < value < hi
    assert lo < true < hi
    assert hi - lo < 0.6
    # rmse form is the same interval over sqrt(D); same seed -> same interval
    v2, lo2, hi2 = set_rl2_ci(a, b, n_bootstrap=500, seed=0, rmse=True)
    np.testing.assert_allclose([v2, lo2, hi2], np.array([value, lo, hi]) / np.sqrt(d))
    assert set_rl2_ci(a, b, n_bootstrap=500, seed=0) == (value, lo, hi)
    assert set_rl2_ci(a, b, n_bootstrap=500, seed=1) != (value, lo, hi)


def test_set_rl2_ci_narrows_with_more_tiles():
    rng = np.random.default_rng(2)
    small = set_rl2_ci(rng.standard_normal((50, 4)), rng.standard_normal((50, 4)), n_bootstrap=300)
    large = set_rl2_ci(rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4)), n_bootstrap=300)
    assert large[2] - large[1] < 0.5 * (small[2] - small[1])


def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(3).standard_normal((300, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_gaussians_closed_form():
    mean_a, mean_b = np.zeros(3), np.array([1.0, 2.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    a = exact_gaussian_sample(200, mean_a, np.diag(var_a), seed=0)
    b = exact_gaussian_sample(300, mean_b, np.diag(var_b), seed=1)
    # ||mu_a - mu_b||^2 + sum (sqrt(var_a) - sqrt(var_b))^2 = 5 + (1 + 1 + 0)
    assert frechet_distance(a, b) == pytest.approx(7.0, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(7.0, rel=1e-9)


def test_frechet_full_covariances_closed_form():
    rng = np.random.default_rng(4)
    m = rng.standard_normal((4, 4))
    s_a = m @ m.T + np.eye(4)
    s_b = 4.0 * s_a  # commuting: Tr(S_a + 4 S_a - 2 * 2 S_a) = Tr(S_a)
    a = exact_gaussian_sample(100, np.zeros(4), s_a, seed=2)
    b = exact_gaussian_sample(100, np.ones(4), s_b, seed=3)
    assert frechet_distance(a, b) == pytest.approx(4.0 + np.trace(s_a), rel=1e-8)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((10, 40)), rng.standard_normal((10, 40)) + 1.0  # rank-9 covariances
    value = frechet_distance(a, b)
    assert np.isfinite(value)
    assert value > 40.0 * 0.9  # at least the mean term ||1||^2 = 40 (minus sampling noise)


def test_frechet_refuses_a_single_row():
    with pytest.raises(ConfigError, match="f_b holds 1 rows"):
        frechet_distance(np.zeros((5, 2)), np.zeros((1, 2)))
