"""SVD / PCA / random baselines and the linear probe against numpy references."""


import numpy as np
import pytest

from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import baselines
from mrl_jax.evaluation import probe


# --- baselines and probe ----------------------------------------------------------------------

def test_pca_matches_numpy_svd_of_the_centred_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
  mean, vectors = baselines.pca_basis(x)
  _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
  for i in range(3):  # same components up to sign
    assert abs(abs(vectors[:, i] @ vt[i]) - 1.0) < 1e-8
  proj = baselines.projector("pca", 3, database=x, head_kernel=None)(x)
  np.testing.assert_allclose(proj.var(0, ddof=1), s[:3]**2 / 199, rtol=1e-8)
  np.testing.assert_allclose(mean, x.mean(0))


def test_svd_head_is_the_eckart_young_rank_m_approximation():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(16, 10))
  u, s, vt = np.linalg.svd(kernel, full_matrices=False)
  for m in (1, 4, 10):
    p, head = baselines.svd_head(kernel, m)
    approx = p @ head
    np.testing.assert_allclose(approx, (u[:, :m] * s[:m]) @ vt[:m], atol=1e-10)
    assert np.sum((kernel - approx)**2) == pytest.approx(np.sum(s[m:]**2))


def test_random_baselines_are_seeded_and_have_m_dimensions():
  x = np.random.default_rng(2).normal(size=(50, 12))
  for kind in ("random_projection", "random_subset"):
    a = baselines.projector(kind, 5, database=x, head_kernel=None)(x)
    b = baselines.projector(kind, 5, database=x, head_kernel=None)(x)
    assert a.shape == (50, 5)
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="unknown baseline 'ica'"):
    baselines.projector("ica", 5, database=x, head_kernel=None)


def test_random_subset_picks_distinct_coordinates_and_projection_is_linear():
  """random_subset: each output column is one distinct input coordinate, unchanged;
  random_projection: a fixed linear map (f(ax + by) = a f(x) + b f(y)) of rank m, with
  columns of variance ~1/m per unit input (R ~ N(0, 1/m))."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(200, 32))
  subset = baselines.projector("random_subset", 6, database=x, head_kernel=None)(x)
  columns = [int(np.flatnonzero(np.all(x == subset[:, [j]], axis=0))[0]) for j in range(6)]
  assert len(set(columns)) == 6 and columns == sorted(columns)
  project = baselines.projector("random_projection", 6, database=x, head_kernel=None)
  y = rng.normal(size=(200, 32))
  np.testing.assert_allclose(project(2 * x - 3 * y), 2 * project(x) - 3 * project(y),
                             atol=1e-10)
  r = project(np.eye(32))  # the matrix itself
  assert np.linalg.matrix_rank(r) == 6
  assert 0.5 / 6 < r.var() < 2 / 6




def test_linear_probe_reaches_the_least_squares_accuracy_on_separable_data():
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(4, 8)) * 4
  y = rng.integers(0, 4, 400)
  x = centers[y] + rng.normal(size=(400, 8))
  x1 = np.c_[x, np.ones(len(x))]
  w, *_ = np.linalg.lstsq(x1, np.eye(4)[y], rcond=None)  # closed-form one-hot regression
  lstsq_acc = np.mean(np.argmax(x1 @ w, 1) == y)
  lp = probe.LinearProbe(4, l2=1e-4, steps=100).fit(x, y)
  assert lstsq_acc > 0.95
  assert lp.accuracy(x, y) >= lstsq_acc
  assert lp.final_loss < 0.1


