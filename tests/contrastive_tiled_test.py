"""The row-tiled Matryoshka contrastive loss: its hand-written gradient against autodiff of the
direct per-size formula, its values against numpy, and no B x B array in the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import contrastive
from mrl_jax import contrastive_tiled
from tests.contrastive_test import np_info_nce
from tests.contrastive_test import np_unit

SIZES = (4, 8, 16)


def direct_loss(a, b, scale, bias, weights, *, loss, symmetric, eps):
  """Each size on its own: truncate, L2-normalise, one matmul, the textbook loss (jax.nn), for
  autodiff to differentiate."""
  total, n = 0.0, a.shape[0]
  for k, m in enumerate(SIZES):
    x = a[:, :m] / jnp.maximum(jnp.linalg.norm(a[:, :m], axis=-1, keepdims=True), 1e-12)
    y = b[:, :m] / jnp.maximum(jnp.linalg.norm(b[:, :m], axis=-1, keepdims=True), 1e-12)
    logits = scale[k] * x @ y.T + bias[k]
    if loss == "sigmoid":
      labels = 2.0 * jnp.eye(n) - 1.0
      value = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
    else:
      targets = (1.0 - eps) * jnp.eye(n) + eps / n
      rows = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
      cols = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=0), axis=0)
      value = jnp.mean(0.5 * (rows + cols) if symmetric else rows)
    total = total + weights[k] * value
  return total


def _inputs(n=12, d=16, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d)).astype(np.float32) * 2
  b = a + rng.normal(size=(n, d)).astype(np.float32)
  b[7] = b[6]  # identical positives: a tie in the top-1
  a[5, 4:8] = 0.0  # a block of zeros: sizes 4 and 8 differ only through the norm
  return jnp.asarray(a), jnp.asarray(b)


CASES = [("softmax", True, 0.0), ("softmax", True, 0.1), ("softmax", False, 0.0),
         ("softmax", False, 0.2), ("sigmoid", True, 0.0)]


@pytest.mark.parametrize("loss, symmetric, eps", CASES)
def test_tiled_gradient_equals_autodiff_of_the_direct_formula(loss, symmetric, eps):
  """d/d(a, b, per-size scale, per-size bias, weights) over 3 tiles of 4 rows, large logits;
  the loss enters the differentiated function scaled (a cotangent other than 1)."""
  a, b = _inputs()
  scale, weights = jnp.asarray([30.0, 50.0, 80.0]), jnp.asarray([1.0, 0.5, 2.0])
  bias = jnp.asarray([-5.0, -8.0, -10.0]) if loss == "sigmoid" else jnp.zeros(3)
  kw = dict(loss=loss, symmetric=symmetric)
  tiled = lambda *x: 0.3 * contrastive.matryoshka_contrastive_loss(
      x[0], x[1], SIZES, x[4], scale=x[2], bias=x[3] if loss == "sigmoid" else None,
      label_smoothing=eps, tile_rows=5, **kw)[0]
  got_value, got = jax.jit(jax.value_and_grad(tiled, argnums=(0, 1, 2, 3, 4)))(
      a, b, scale, bias, weights)
  want_value, want = jax.value_and_grad(
      lambda *x: 0.3 * direct_loss(*x, eps=eps, **kw), argnums=(0, 1, 2, 3, 4))(
          a, b, scale, bias, weights)
  assert float(got_value) == pytest.approx(float(want_value), rel=1e-5)
  names = ["a", "b", "scale", "bias", "weights"]
  for name, x, y in zip(names, got, want, strict=True):
    if loss != "sigmoid" and name == "bias":
      continue  # the softmax has no bias
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5,
                               err_msg=name)


@pytest.mark.parametrize("loss, symmetric, eps", CASES)
def test_tiled_metrics_equal_numpy(loss, symmetric, eps):
  """loss@m and acc@m (ties count as hits) per size, against float64 numpy."""
  a, b = _inputs(seed=1)
  scale, bias = np.array([30.0, 50.0, 80.0]), np.array([-5.0, -8.0, -10.0])
  _, metrics = contrastive.matryoshka_contrastive_loss(
      a, b, SIZES, jnp.ones(3), scale=jnp.asarray(scale), loss=loss, symmetric=symmetric,
      bias=jnp.asarray(bias) if loss == "sigmoid" else None, label_smoothing=eps, tile_rows=4)
  for k, m in enumerate(SIZES):
    logits = scale[k] * np_unit(np.asarray(a)[:, :m]) @ np_unit(np.asarray(b)[:, :m]).T
    if loss == "sigmoid":
      logits = logits + bias[k]
      labels = 2 * np.eye(len(logits)) - 1
      value = np.sum(np.logaddexp(0.0, -labels * logits)) / len(logits)
    else:
      value = np_info_nce(logits, symmetric, eps).mean()
    # abs: lse - diagonal cancels in float32 at logits ~80 (|error| ~ 80 * 1e-7 * a few)
    assert float(metrics[f"loss@{m}"]) == pytest.approx(value, rel=1e-5, abs=5e-5)
    hits = np.mean(np.diag(logits) >= logits.max(1))
    assert float(metrics[f"acc@{m}"]) == pytest.approx(hits)
  assert float(metrics["acc@4"]) < 1.0  # the case is not trivial


def test_tiled_loss_without_gradient_equals_the_untiled_one():
  """The primal (forward-only) path, e.g. under evaluation, and one size = the plain loss."""
  a, b = _inputs(seed=2)
  for sizes in (SIZES, (16,)):
    for loss in ("softmax", "sigmoid"):
      kw = dict(scale=10.0, bias=-10.0 if loss == "sigmoid" else None, loss=loss,
                symmetric=True)
      want, _ = contrastive.matryoshka_contrastive_loss(a, b, sizes, jnp.ones(len(sizes)), **kw)
      got, _ = contrastive.matryoshka_contrastive_loss(a, b, sizes, jnp.ones(len(sizes)),
                                                       tile_rows=3, **kw)
      assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_metrics_carry_no_gradient():
  """The per-size metrics are stopped: only the weighted total is differentiated."""
  a, b = _inputs()
  grad = jax.grad(lambda x: contrastive.matryoshka_contrastive_loss(
      x, b, SIZES, jnp.ones(3), scale=10.0, symmetric=True, tile_rows=4)[1]["loss@8"])(a)
  assert not np.any(np.asarray(grad))


def test_tile_size_is_the_largest_divisor_within_the_limit():
  assert contrastive_tiled.tile_size(4096, 256) == 256
  assert contrastive_tiled.tile_size(96, 64) == 48
  assert contrastive_tiled.tile_size(12, 5) == 4
  assert contrastive_tiled.tile_size(32, 256) == 32
  assert contrastive_tiled.tile_size(7, 4) == 1


def test_compiled_step_holds_no_batch_by_batch_array():
  """XLA's own accounting of the compiled loss + gradient: the tiled loss's temporaries
  (O(|M| T B): each size's gradient tile is kept for the descending block sums) stay under one
  B x B float32 matrix; autodiff of the untiled loss keeps one per size and more."""
  n, d, sizes = 1024, 64, (8, 16, 32, 64)
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  square = n * n * 4

  def temp_bytes(tile_rows):
    fn = lambda a, b: contrastive.matryoshka_contrastive_loss(
        a, b, sizes, jnp.ones(len(sizes)), scale=10.0, symmetric=True, tile_rows=tile_rows)[0]
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(0) > len(sizes) * square
  assert temp_bytes(16) < square


def test_column_log_sum_exp_is_shifted_per_column():
  """Columns far apart: at scale 100 one caption matches every image (logits ~ +100) and one
  matches none (~ -100). A column's log-sum-exp must be shifted by that column's own maximum
  (exp(-200) underflows); the result equals the untiled loss and is finite."""
  rng = np.random.default_rng(4)
  u = rng.normal(size=(1, 16)).astype(np.float32)
  a = u + 0.05 * rng.normal(size=(8, 16)).astype(np.float32)
  b = u + 0.05 * rng.normal(size=(8, 16)).astype(np.float32)
  b[1] = -u[0]
  kw = dict(scale=100.0, symmetric=True)
  want, _ = contrastive.matryoshka_contrastive_loss(a, b, SIZES, jnp.ones(3), **kw)
  got, _ = contrastive.matryoshka_contrastive_loss(a, b, SIZES, jnp.ones(3), tile_rows=2, **kw)
  assert np.isfinite(float(got))
  assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("tile_rows", [0, 5])
def test_a_zero_prefix_has_cosine_0_and_a_finite_gradient(loss, tile_rows):
  """An all-zero embedding and a zero 4-prefix (a dead unit block, a locked tower's zero
  output): gradients are finite, tiled and untiled, and equal autodiff of the direct formula
  in which those prefixes' unit vectors are the constant 0 (masks found in numpy)."""
  a, b = _inputs(seed=3)
  a, b = np.array(a), np.array(b)
  a[2] = 0.0
  b[9, :4] = 0.0
  scale, weights = jnp.asarray([10.0, 20.0, 30.0]), jnp.ones(3)
  bias = jnp.asarray([-5.0, -8.0, -10.0]) if loss == "sigmoid" else None

  def unit(x, m, zero):  # zero: numpy [n] bool, the rows whose m-prefix is all zero
    keep = jnp.asarray(~zero, jnp.float32)[:, None]
    safe = x[:, :m] * keep + (1.0 - keep)  # no norm of a zero vector is ever taken
    return keep * safe / jnp.linalg.norm(safe, axis=-1, keepdims=True)

  def direct(x, y):
    total, n = 0.0, x.shape[0]
    for k, m in enumerate(SIZES):
      logits = scale[k] * unit(x, m, ~a[:, :m].any(1)) @ unit(y, m, ~b[:, :m].any(1)).T
      if loss == "sigmoid":
        total = total - jnp.sum(jax.nn.log_sigmoid((2.0 * jnp.eye(n) - 1.0)
                                                   * (logits + bias[k]))) / n
      else:
        total = total + jnp.mean(-0.5 * (jnp.diag(jax.nn.log_softmax(logits, 1))
                                         + jnp.diag(jax.nn.log_softmax(logits, 0))))
    return total

  got = jax.grad(lambda x, y: contrastive.matryoshka_contrastive_loss(
      x, y, SIZES, weights, scale=scale, bias=bias, loss=loss, symmetric=True,
      tile_rows=tile_rows)[0], argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
  want = jax.grad(direct, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
  for x, y in zip(got, want, strict=True):
    assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6)
  assert not np.any(np.asarray(got[0])[2])  # the zero embedding sends no gradient


def test_tiled_loss_is_invariant_to_the_embeddings_scale():
  """Cosines do not depend on the norm: embeddings 100x smaller (norms well under 1) give the
  same loss, and a zero prefix stays a cosine of 0 (its norm clamped at 1e-12, not at 1)."""
  a, b = _inputs(seed=5)
  a = a.at[2, :4].set(0.0)
  kw = dict(scale=10.0, symmetric=True, tile_rows=4)
  want, _ = contrastive.matryoshka_contrastive_loss(a, b, SIZES, jnp.ones(3), **kw)
  got, _ = contrastive.matryoshka_contrastive_loss(a * 1e-2, b * 1e-2, SIZES, jnp.ones(3), **kw)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
