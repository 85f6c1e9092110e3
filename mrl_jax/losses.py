"""Matryoshka losses: L = sum_m w_m * loss(logits_m, y), mean over the batch (paper Eq. 1).

- `softmax_xent`: the official code's `Matryoshka_CE_Loss`: per-size CE with weights (default 1)
  and the same label smoothing for every size. Integer labels [B], or multi-hot [B, C] targets
  normalised to sum to one (big_vision's softmax_xent on multi-label data).
- `sigmoid_xent`: big_vision's `sigmoid_xent` for multi-label (JFT-style) pretraining, the loss
  of the original ViT ImageNet-21k / JFT runs: per size, binary cross-entropy summed over the
  classes, mean over the batch. Integer labels are one-hot targets.
Both in float32 whatever the compute dtype, and both also return the per-size loss and the
top-1 hit rate for logging: `loss@{m}`, and `top1@{m}` (integer labels) or `prec1@{m}` (multi-hot:
the top-1 prediction is one of the true labels).

`sample_nesting_weights` implements sentence-transformers' `n_dims_per_step`: each step trains a
random subset of k sizes, with the sampled sizes' weights scaled so that the expected loss equals
the full sum. All heads are still computed (they cost ~nothing next to the encoder); the skipped
sizes simply get zero weight, hence zero gradient, on that step.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from mrl_jax.errors import ConfigError

LOSSES = ("softmax_xent", "sigmoid_xent")


def targets(labels: jax.Array, num_classes: int) -> jax.Array:
  """float32 [B, C]: one-hot of integer labels [B], or multi-hot labels [B, C] as given."""
  if labels.ndim == 2:
    return labels.astype(jnp.float32)
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax CE with label smoothing: logits [B, C], labels [B] or [B, C] -> [B]."""
  logits = logits.astype(jnp.float32)
  t = targets(labels, logits.shape[-1])
  if labels.ndim == 2:  # several true classes share the probability mass
    t = t / jnp.maximum(t.sum(-1, keepdims=True), 1.0)
  if label_smoothing:
    t = optax.smooth_labels(t, label_smoothing)
  return optax.softmax_cross_entropy(logits, t)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example binary CE summed over classes: logits [B, C], labels [B] or [B, C] -> [B]."""
  logits = logits.astype(jnp.float32)
  t = targets(labels, logits.shape[-1])
  return -jnp.sum(t * jax.nn.log_sigmoid(logits) + (1.0 - t) * jax.nn.log_sigmoid(-logits),
                  axis=-1)


def correct_at_1(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] 1.0 where the top-1 class is the label (or, multi-hot, one of the labels)."""
  top = jnp.argmax(logits, -1)
  if labels.ndim == 2:
    return (jnp.take_along_axis(labels, top[:, None], axis=-1)[:, 0] > 0).astype(jnp.float32)
  return (top == labels).astype(jnp.float32)


def matryoshka_loss(logits_by_size: Mapping[int, jax.Array], labels: jax.Array, *,
                    loss: str = "softmax_xent",
                    weights: Mapping[int, float] | jax.Array | None = None,
                    label_smoothing: float = 0.0,
                    mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum over sizes of the batch-mean loss.

  Args:
    logits_by_size: {m: logits_m [B, C]}.
    labels: int [B], or multi-hot [B, C].
    loss: "softmax_xent" or "sigmoid_xent" (module docstring).
    weights: {m: w_m} (default 1 for every size), or an array aligned with sorted sizes.
    label_smoothing: epsilon of the smoothed targets (1 - eps) * onehot + eps / C (softmax).
    mask: optional [B] with 1 for real examples and 0 for padding.

  Returns:
    (loss, metrics) where metrics has `loss@{m}` (unweighted batch mean) and `top1@{m}`
    (`prec1@{m}` for multi-hot labels).
  """
  if loss not in LOSSES:
    raise ConfigError(f"unknown loss {loss!r} (config.loss.name); allowed: {list(LOSSES)}")
  sizes = sorted(logits_by_size)
  hit = "prec1" if labels.ndim == 2 else "top1"
  if mask is None:
    mask = jnp.ones(labels.shape[:1], jnp.float32)
  mask = mask.astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  if weights is None:
    weight_of = {m: 1.0 for m in sizes}
  elif isinstance(weights, Mapping):
    weight_of = {m: weights[m] for m in sizes}
  else:
    weight_of = {m: weights[i] for i, m in enumerate(sizes)}
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for m in sizes:
    logits = logits_by_size[m]
    per_example = (sigmoid_cross_entropy(logits, labels) if loss == "sigmoid_xent"
                   else cross_entropy(logits, labels, label_smoothing))
    value = (per_example * mask).sum() / denom
    total = total + weight_of[m] * value
    metrics[f"loss@{m}"] = value
    metrics[f"{hit}@{m}"] = (correct_at_1(logits, labels) * mask).sum() / denom
  return total, metrics


def nesting_weights(weights, sizes: tuple[int, ...]) -> tuple[float, ...]:
  """config.mrl.weights: () for all 1, or one weight >= 0 per size."""
  if isinstance(weights, str):
    raise ConfigError(f"config.mrl.weights={weights!r} is not a tuple; e.g. (1.0, 2.0)")
  if not weights:
    return tuple(1.0 for _ in sizes)
  values = tuple(float(w) for w in weights)
  if len(values) != len(sizes):
    raise ConfigError(f"config.mrl.weights has {len(values)} values but there are {len(sizes)} "
                      f"nesting sizes {list(sizes)}; give one weight per size")
  if any(w < 0 for w in values):
    raise ConfigError(f"config.mrl.weights={list(values)} has a negative weight; allowed: "
                      "w >= 0")
  return values


def sample_nesting_weights(rng: jax.Array, weights: jax.Array, sizes_per_step: int, *,
                           keep_smallest: bool = True, keep_largest: bool = True) -> jax.Array:
  """Per-size weights for one step when only `sizes_per_step` of the sizes are trained.

  The smallest/largest size are always kept when asked (they count towards k); the other
  k_free = k - kept sizes are drawn uniformly without replacement from the n_free others, and
  their weight is multiplied by n_free / k_free so that E[weights_step] = weights.
  `sizes_per_step` <= 0 or >= the number of sizes means all sizes, every step.
  """
  n = weights.shape[0]
  if sizes_per_step <= 0 or sizes_per_step >= n:
    return weights
  fixed_indices = ({0} if keep_smallest else set()) | ({n - 1} if keep_largest else set())
  fixed = jnp.zeros((n,), bool).at[jnp.array(sorted(fixed_indices), int)].set(True)
  num_fixed = len(fixed_indices)
  k_free = sizes_per_step - num_fixed
  n_free = n - num_fixed
  if k_free < 0:
    raise ConfigError(f"config.mrl.sizes_per_step={sizes_per_step} is smaller than the {num_fixed}"
                      " always-kept sizes (keep_smallest/keep_largest); allowed: >= "
                      f"{num_fixed} or 0 for all sizes")
  # Random priorities; fixed sizes never compete. The k_free free sizes with the lowest
  # priority are chosen.
  priority = jnp.where(fixed, jnp.inf, jax.random.uniform(rng, (n,)))
  rank = jnp.argsort(jnp.argsort(priority))
  chosen = (~fixed) & (rank < k_free)
  scale = jnp.where(fixed, 1.0, jnp.where(chosen, n_free / max(k_free, 1), 0.0))
  return weights * scale
