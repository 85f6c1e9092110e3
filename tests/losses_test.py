"""Matryoshka loss against a plain numpy implementation of paper Eq. 1 (+ label smoothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax import losses
from mrl_jax.errors import ConfigError
from mrl_jax.models import heads as heads_lib


def np_cross_entropy(logits, labels, eps):
  """-sum_c t_c log softmax(logits)_c with t = (1 - eps) onehot + eps / C; float64."""
  logits = logits.astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  c = logits.shape[-1]
  targets = np.full(logits.shape, eps / c)
  targets[np.arange(len(labels)), labels] += 1.0 - eps
  return -(targets * logp).sum(-1)


def np_matryoshka_loss(z, kernels, biases, labels, weights, eps):
  """Paper Eq. 1: sum_m w_m * mean_i CE(W_m z_i[:m] + b_m, y_i)."""
  total = 0.0
  for m, w in weights.items():
    logits = z[:, :m] @ kernels[m] + biases[m]
    total += w * np_cross_entropy(logits, labels, eps).mean()
  return total


def _heads_params(h: heads_lib.MatryoshkaHeads, sizes):
  if h.efficient:
    kernel, bias = np.asarray(h.tied.kernel[...]), np.asarray(h.tied.bias[...])
    return {m: kernel[:m] for m in sizes}, {m: bias for m in sizes}
  return ({m: np.asarray(getattr(h, f"head_{m}").kernel[...]) for m in sizes},
          {m: np.asarray(getattr(h, f"head_{m}").bias[...]) for m in sizes})


@pytest.mark.parametrize("efficient", [False, True], ids=["mrl", "mrle"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_equals_numpy_reference_with_weights_and_label_smoothing(efficient, eps):
  rng = np.random.default_rng(0)
  d, c, b = 16, 7, 12
  sizes = (2, 4, 8, 16)
  weights = {2: 0.5, 4: 1.0, 8: 2.0, 16: 1.5}
  z = rng.normal(size=(b, d)).astype(np.float32)
  labels = rng.integers(0, c, size=b)
  h = heads_lib.MatryoshkaHeads(d, c, sizes, efficient=efficient, rngs=nnx.Rngs(1))
  loss, metrics = losses.matryoshka_loss(h(jnp.asarray(z)), jnp.asarray(labels),
                                         weights=weights, label_smoothing=eps)
  kernels, biases = _heads_params(h, sizes)
  expected = np_matryoshka_loss(z, kernels, biases, labels, weights, eps)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  for m in sizes:  # Per-size logs are the unweighted CE and the head's top-1.
    logits = z[:, :m] @ kernels[m] + biases[m]
    np.testing.assert_allclose(float(metrics[f"loss@{m}"]),
                               np_cross_entropy(logits, labels, eps).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"top1@{m}"]),
                               (logits.argmax(-1) == labels).mean(), rtol=1e-6)


def test_ff_head_reads_only_the_first_m_features():
  rng = np.random.default_rng(1)
  h = heads_lib.MatryoshkaHeads(32, 5, (8,), rngs=nnx.Rngs(0))
  z = rng.normal(size=(4, 32)).astype(np.float32)
  z2 = z.copy()
  z2[:, 8:] = rng.normal(size=(4, 24))
  np.testing.assert_array_equal(np.asarray(h(z)[8]), np.asarray(h(z2)[8]))
  kernels, biases = _heads_params(h, (8,))
  labels = rng.integers(0, 5, size=4)
  loss, _ = losses.matryoshka_loss(h(z), labels)
  np.testing.assert_allclose(float(loss), np_matryoshka_loss(z, kernels, biases, labels,
                                                             {8: 1.0}, 0.0), rtol=1e-5)


def test_mrle_logits_are_slices_of_the_tied_kernel_plus_full_bias():
  rng = np.random.default_rng(2)
  h = heads_lib.MatryoshkaHeads(16, 6, (2, 4, 16), efficient=True, rngs=nnx.Rngs(0))
  h.tied.bias[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
  z = rng.normal(size=(3, 16)).astype(np.float32)
  w, bias = np.asarray(h.tied.kernel[...]), np.asarray(h.tied.bias[...])
  out = h(z)
  for m in (2, 4, 16):
    np.testing.assert_allclose(np.asarray(out[m]), z[:, :m] @ w[:m] + bias, rtol=1e-5, atol=1e-6)
  # One kernel d x C and one bias, whatever the number of sizes.
  assert {k for k, _ in nnx.state(h, nnx.Param).flat_state()} == {("tied", "kernel"),
                                                                    ("tied", "bias")}


def test_mask_excludes_padding_from_loss_and_accuracy():
  rng = np.random.default_rng(2)
  logits = {4: jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
  labels = jnp.asarray([0, 1, 2, 0, 1, 2])
  mask = jnp.asarray([1, 1, 1, 0, 0, 0])
  loss, metrics = losses.matryoshka_loss(logits, labels, mask=mask)
  expected = np_cross_entropy(np.asarray(logits[4])[:3], np.asarray(labels)[:3], 0.0).mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss@4"]), expected, rtol=1e-5)
  hits = np.asarray(logits[4]).argmax(-1) == np.asarray(labels)
  assert hits[:3].mean() != hits.mean()  # the padding would change the accuracy
  assert float(metrics["top1@4"]) == pytest.approx(hits[:3].mean())


def test_sampled_sizes_keep_ends_pick_k_and_are_unbiased():
  weights = jnp.asarray([1.0, 2.0, 1.0, 0.5, 1.0, 3.0])
  n_steps = 4000
  samples = jax.vmap(lambda k: losses.sample_nesting_weights(
      k, weights, 3, keep_smallest=True, keep_largest=True))(
          jax.random.split(jax.random.key(0), n_steps))
  samples = np.asarray(samples)
  assert np.all(samples[:, 0] == 1.0) and np.all(samples[:, -1] == 3.0)
  assert np.all((samples != 0).sum(1) == 3)  # k = 3 sizes per step
  # E[w_step] = w: 1 of the 4 middle sizes is picked and scaled by 4 (std of mean ~ w*sqrt(3)/63).
  np.testing.assert_allclose(samples.mean(0), np.asarray(weights), rtol=0.1)


def test_sampling_all_sizes_is_the_identity():
  weights = jnp.ones(5)
  out = losses.sample_nesting_weights(jax.random.key(0), weights, 0)
  np.testing.assert_array_equal(np.asarray(out), np.ones(5))


def test_weights_must_match_the_number_of_sizes():
  with pytest.raises(ConfigError, match="has 2 values but there are 3 nesting sizes"):
    losses.nesting_weights((1.0, 2.0), (8, 16, 32))
  assert losses.nesting_weights((), (8, 16)) == (1.0, 1.0)


# --- sigmoid Matryoshka loss (multi-label) ----------------------------------------------------

def np_sigmoid_xent(logits, targets):
  """big_vision sigmoid_xent per example: -sum_c [t log s(x) + (1 - t) log(1 - s(x))]; f64."""
  x = logits.astype(np.float64)
  log_s = -np.logaddexp(0.0, -x)  # log sigmoid(x)
  log_not_s = -np.logaddexp(0.0, x)  # log sigmoid(-x) = log(1 - sigmoid(x))
  return -(targets * log_s + (1 - targets) * log_not_s).sum(-1)


def _multi_hot(rng, b, c):
  t = (rng.random((b, c)) < 0.3).astype(np.uint8)
  t[0] = 0  # an example with no label at all
  return t


@pytest.mark.parametrize("efficient", [False, True], ids=["mrl", "mrle"])
def test_sigmoid_loss_equals_numpy_reference_with_weights_and_mask(efficient):
  rng = np.random.default_rng(3)
  d, c, b = 16, 6, 10
  sizes = (2, 4, 16)
  weights = {2: 0.5, 4: 2.0, 16: 1.0}
  z = rng.normal(size=(b, d)).astype(np.float32)
  targets = _multi_hot(rng, b, c)
  mask = np.ones(b, np.float32)
  mask[-3:] = 0.0  # padding rows
  h = heads_lib.MatryoshkaHeads(d, c, sizes, efficient=efficient, bias_init=-2.0,
                                rngs=nnx.Rngs(1))
  loss, metrics = losses.matryoshka_loss(h(jnp.asarray(z)), jnp.asarray(targets),
                                         loss="sigmoid_xent", weights=weights,
                                         mask=jnp.asarray(mask))
  kernels, biases = _heads_params(h, sizes)
  expected = 0.0
  for m, w in weights.items():
    logits = z[:, :m] @ kernels[m] + biases[m]
    per_example = np_sigmoid_xent(logits, targets)
    mean = (per_example * mask).sum() / mask.sum()
    expected += w * mean
    np.testing.assert_allclose(float(metrics[f"loss@{m}"]), mean, rtol=1e-5)
    hit = targets[np.arange(b), logits.argmax(-1)] > 0  # top-1 is one of the labels
    np.testing.assert_allclose(float(metrics[f"prec1@{m}"]), (hit * mask).sum() / mask.sum())
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_sigmoid_loss_on_integer_labels_is_the_one_hot_case():
  rng = np.random.default_rng(0)
  logits = {4: jnp.asarray(rng.normal(size=(5, 7)).astype(np.float32))}
  labels = rng.integers(0, 7, size=5)
  a, _ = losses.matryoshka_loss(logits, jnp.asarray(labels), loss="sigmoid_xent")
  b, _ = losses.matryoshka_loss(logits, jnp.asarray(np.eye(7)[labels].astype(np.uint8)),
                                loss="sigmoid_xent")
  np.testing.assert_allclose(float(a), np_sigmoid_xent(np.asarray(logits[4]),
                                                       np.eye(7)[labels]).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_sigmoid_loss_gradient_matches_finite_differences():
  """d loss / d (head kernel, bias) of a tiny MRL head, against central differences in f64."""
  rng = np.random.default_rng(5)
  z = rng.normal(size=(4, 3))
  targets = _multi_hot(rng, 4, 2).astype(np.float64)
  params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}

  def loss_np(p):
    return sum(np_sigmoid_xent(z[:, :m] @ p["w"][:m] + p["b"], targets).mean() for m in (1, 3))

  def loss_jax(p):
    logits = {m: jnp.asarray(z[:, :m], jnp.float32) @ p["w"][:m] + p["b"] for m in (1, 3)}
    return losses.matryoshka_loss(logits, jnp.asarray(targets), loss="sigmoid_xent")[0]

  grads = jax.grad(loss_jax)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
  eps = 1e-6
  for name, value in params.items():
    numeric = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
      up = {k: v.copy() for k, v in params.items()}
      down = {k: v.copy() for k, v in params.items()}
      up[name][idx] += eps
      down[name][idx] -= eps
      numeric[idx] = (loss_np(up) - loss_np(down)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grads[name]), numeric, rtol=1e-4, atol=1e-5)


def test_softmax_on_multi_hot_targets_spreads_the_mass_over_the_labels():
  """big_vision softmax_xent with multi-label data: targets normalised to sum to one."""
  logits = np.array([[2.0, 0.5, -1.0, 0.0]], np.float32)
  targets = np.array([[1, 0, 1, 0]], np.uint8)
  loss, metrics = losses.matryoshka_loss({4: jnp.asarray(logits)}, jnp.asarray(targets))
  logp = logits[0] - np.log(np.exp(logits[0]).sum())
  assert float(loss) == pytest.approx(-(logp[0] + logp[2]) / 2, rel=1e-6)
  assert float(metrics["prec1@4"]) == 1.0


def test_softmax_multi_hot_normalises_each_row_by_its_own_label_count():
  """Rows with 1, 2 and 3 labels (and one with none: no loss) in one batch, against numpy."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  logits[np.arange(4), [0, 2, 3, 1]] += 5.0  # top classes: 3 rows right, in other columns
  targets = np.array([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]],
                     np.uint8)
  hit = targets[np.arange(4), logits.argmax(-1)] > 0  # the top class is one of the row's labels
  for name in losses.LOSSES:
    loss, metrics = losses.matryoshka_loss({5: jnp.asarray(logits)}, jnp.asarray(targets),
                                           loss=name)
    assert float(metrics["prec1@5"]) == pytest.approx(hit.mean()) == 0.75
    if name == "softmax_xent":
      softmax_loss = loss
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  t = targets / np.maximum(targets.sum(-1, keepdims=True), 1)
  assert float(softmax_loss) == pytest.approx(-(t * logp).sum(-1).mean(), rel=1e-5)


def test_one_real_example_is_its_own_loss_and_an_all_padding_batch_is_zero():
  logits = {4: jnp.asarray(np.random.default_rng(4).normal(size=(3, 5)), jnp.float32)}
  labels = jnp.asarray([1, 2, 3])
  one, _ = losses.matryoshka_loss(logits, labels, mask=jnp.asarray([0, 1, 0]))
  want = np_cross_entropy(np.asarray(logits[4])[1:2], np.asarray([2]), 0.0)[0]
  assert float(one) == pytest.approx(want, rel=1e-5)
  none, metrics = losses.matryoshka_loss(logits, labels, mask=jnp.zeros(3))
  assert float(none) == 0.0 and float(metrics["top1@4"]) == 0.0


def test_zero_weights_are_allowed_and_negative_ones_are_not():
  assert losses.nesting_weights((0.0, 0.5, 2), (8, 16, 32)) == (0.0, 0.5, 2.0)
  with pytest.raises(ConfigError, match="negative weight"):
    losses.nesting_weights((1.0, -0.5), (8, 16))


@pytest.mark.parametrize("keep_smallest, keep_largest", [(True, True), (True, False),
                                                         (False, True), (False, False)])
def test_sampling_as_many_sizes_as_are_kept(keep_smallest, keep_largest):
  """k = the kept sizes (none free), kept + 1 or kept + 2 (the free ones scaled by n_free / k_free)
  per step."""
  weights = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0])
  kept = [i for i, keep in ((0, keep_smallest), (4, keep_largest)) if keep]
  n_free = 5 - len(kept)
  for k in (len(kept), len(kept) + 1, len(kept) + 2) if kept else (1, 2):
    for seed in range(8):
      got = np.asarray(losses.sample_nesting_weights(
          jax.random.key(seed), weights, k, keep_smallest=keep_smallest,
          keep_largest=keep_largest))
      assert all(got[i] == weights[i] for i in kept)
      free = [i for i in range(5) if i not in kept and got[i] != 0]
      assert len(free) == k - len(kept)
      for i in free:
        assert got[i] == pytest.approx(float(weights[i]) * n_free / (k - len(kept)))
