"""Matryoshka contrastive losses: in-batch negatives at every nesting size, and 2D Matryoshka.

At each size m both embeddings are truncated to their first m coordinates and L2-renormalised
(paper Sec. 3 and Appendix C: "MRL is applied to both the embeddings that are being
contrasted"); their cosines, times a scale (1 / temperature), are the logits of a softmax over
the batch: row i's positive is column i (InfoNCE). With one direction this is
sentence-transformers' MultipleNegativesRankingLoss (scale 20); with both directions, averaged,
CLIP/ALIGN's loss (optionally with label smoothing, as ALIGN); or SigLIP's sigmoid loss (every
pair a binary problem, a learned bias). The Matryoshka loss is the weighted sum over sizes
(sentence-transformers' MatryoshkaLoss), with k-of-n size sampling.

All sizes' cosine matrices come from one pass: the dot products and squared norms of the blocks
between consecutive sizes are accumulated (cos_{m_k} = (dots_{m_(k-1)} + a_blk b_blk^T) /
(|a|_{m_k} |b|_{m_k})), so |M| sizes cost about one full-size B x B matmul, and only one B x B
matrix per size is alive at a time. With `tile_rows` > 0 (config.contrastive.tile_rows) the same
loss is computed T rows at a time with a hand-written gradient (contrastive_tiled.py): no B x B
array at all, memory O(T B) instead of autodiff's |M| B x B. Inside the jitted step the arrays
are the global batch, so the negatives come from every device (equal on 1 and 8 devices and
2 processes).

2D Matryoshka (layers x dims; Li et al. 2024, sentence-transformers' Matryoshka2dLoss =
AdaptiveLayerLoss(MatryoshkaLoss)): the loss above at the last layer, plus, for sampled earlier
layers l (the embedding output counts as layer 0), the same loss on the pooled hidden states of
layer l, weighted prior_layers_weight / (number sampled), plus kl_temperature x kl_div_weight x
KL(softmax(e_last / T) || softmax(e_l / T)) (batch mean; the last layer's side without gradient)
on the full-size embeddings of every text in the batch. Differences from sentence-transformers
(docs/text.md): the full size at the last layer is trained in every step (sentence-transformers
samples n_dims_per_step sizes there too, default 1); embeddings are L2-normalised before the KL
(sentence-transformers uses the model's output, which all-MiniLM-L6-v2 normalises); layers and
sizes are sampled from the step's RNG with jax.random, so a resumed run samples the same.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mrl_jax import contrastive_tiled


def nested_cosines(a: jax.Array, b: jax.Array, sizes: Sequence[int]) -> dict[int, jax.Array]:
  """{m: cos(a[:, :m], b[:, :m]) [A, B]} of the renormalised prefixes, from block partial sums.

  A zero prefix has cosine 0 with everything and no gradient (inverse_norms)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  sizes = sorted(sizes)
  inv_a = contrastive_tiled.inverse_norms(a, sizes)
  inv_b = contrastive_tiled.inverse_norms(b, sizes)
  out, dots, start = {}, 0.0, 0
  for k, m in enumerate(sizes):
    dots = dots + a[:, start:m] @ b[:, start:m].T
    out[m] = dots * inv_a[k][:, None] * inv_b[k][None, :]
    start = m
  return out


def info_nce(logits: jax.Array, *, symmetric: bool = False,
             label_smoothing: float = 0.0) -> jax.Array:
  """Per-row InfoNCE of a square [B, B] logit matrix whose diagonal holds the positives:
  CE(row i, i), or with `symmetric` the mean of the row and the column losses. [B].

  With smoothed targets t = (1 - eps) I + eps / B the cross-entropy is
  lse_i - (1 - eps) l_ii - eps * mean_j l_ij (optax.smooth_labels' targets, without forming
  them); the column side reduces over axis 0 instead of transposing, which on CPU halves the
  cost of each size's softmax (benchmarks/contrastive_loss.py)."""
  diagonal = jnp.diagonal(logits)

  def cross_entropy(axis):
    lse = jax.nn.logsumexp(logits, axis=axis)
    if not label_smoothing:
      return lse - diagonal
    return lse - (1.0 - label_smoothing) * diagonal - label_smoothing * jnp.mean(logits, axis)

  rows = cross_entropy(1)
  if not symmetric:
    return rows
  return 0.5 * (rows + cross_entropy(0))


def sigmoid_pairs(logits: jax.Array) -> jax.Array:
  """SigLIP (Zhai et al. 2023; big_vision's sigmoid loss): every pair is a binary problem,
  label +1 on the diagonal and -1 elsewhere; -sum_j log sigmoid(label_ij * logit_ij) per row
  [B] (its mean over rows is big_vision's loss)."""
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1)


LOSSES = ("softmax", "sigmoid")


def matryoshka_contrastive_loss(a: jax.Array, b: jax.Array, sizes: Sequence[int],
                                weights, *, scale=20.0, bias=None, loss: str = "softmax",
                                symmetric: bool = False, label_smoothing: float = 0.0,
                                tile_rows: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_m w_m * mean_i loss_i(scale_m * cos_m + bias_m) over the nested cosines of a and b.

  `loss`: "softmax" (InfoNCE, one or both directions, label smoothing) or "sigmoid" (SigLIP).
  `scale`, `bias`: one value for every size, or one per size ([S], sizes ascending).
  Metrics: `loss@m` and `acc@m` (in-batch top-1: the positive's logit is the row's largest;
  ties count as hits: a variadic argmax over B x B costs XLA:CPU 5x a log-sum-exp).
  `tile_rows` > 0: row tiles of at most that many rows (module docstring)."""
  sizes = sorted(sizes)
  if tile_rows > 0:
    return contrastive_tiled.matryoshka_contrastive_loss(
        a, b, sizes, weights, scale, bias, loss=loss, symmetric=symmetric,
        label_smoothing=label_smoothing, tile_rows=tile_rows)
  total, metrics = jnp.zeros((), jnp.float32), {}
  per_size = lambda x, i: x if jnp.ndim(x) == 0 else x[i if x.shape[0] > 1 else 0]
  for i, (m, cos) in enumerate(nested_cosines(a, b, sizes).items()):
    logits = per_size(scale, i) * cos
    if bias is not None:
      logits = logits + per_size(bias, i)
    if loss == "sigmoid":
      value = sigmoid_pairs(logits).mean()
    else:
      value = info_nce(logits, symmetric=symmetric, label_smoothing=label_smoothing).mean()
    total = total + weights[i] * value
    metrics[f"loss@{m}"] = value
    metrics[f"acc@{m}"] = jnp.mean(
        (jnp.diagonal(logits) >= jnp.max(logits, -1)).astype(jnp.float32))
  return total, metrics


def kl_to_last_layer(last: jax.Array, layer: jax.Array, temperature: float) -> jax.Array:
  """KL(softmax(last / T) || softmax(layer / T)) summed over dims, mean over rows (torch's
  kl_div(..., reduction="batchmean")); `last` carries no gradient."""
  p = jax.nn.softmax(jax.lax.stop_gradient(last) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(layer / temperature, axis=-1)
  return jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-30)) - log_q)) / last.shape[0]


def matryoshka_2d_loss(layers_a: jax.Array, layers_b: jax.Array, sizes: Sequence[int],
                       last_weights, prior_weights, layer_mask: jax.Array, *,
                       scale: float = 20.0, symmetric: bool = False,
                       last_layer_weight: float = 1.0, prior_layers_weight: float = 1.0,
                       kl_div_weight: float = 1.0, kl_temperature: float = 0.3,
                       tile_rows: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """2D Matryoshka (module docstring). layers_*: [L + 1, B, d] pooled embeddings of every layer
  (the last is z); last_weights [S]: the last layer's size weights; prior_weights [L, S]: each
  earlier layer's; layer_mask [L]: 1 for the sampled earlier layers."""
  loss, metrics = matryoshka_contrastive_loss(layers_a[-1], layers_b[-1], sizes, last_weights,
                                              scale=scale, symmetric=symmetric,
                                              tile_rows=tile_rows)
  loss = loss * last_layer_weight
  count = jnp.maximum(layer_mask.sum(), 1.0)
  unit = lambda x: x * contrastive_tiled.inverse_norms(x, (x.shape[-1],))[0][:, None]
  final = unit(jnp.concatenate([layers_a[-1], layers_b[-1]]).astype(jnp.float32))
  for layer in range(layers_a.shape[0] - 1):
    value, _ = matryoshka_contrastive_loss(layers_a[layer], layers_b[layer], sizes,
                                           prior_weights[layer], scale=scale,
                                           symmetric=symmetric, tile_rows=tile_rows)
    loss = loss + layer_mask[layer] * value * prior_layers_weight / count
    metrics[f"loss_layer{layer}"] = value
    if kl_temperature > 0:
      embeddings = unit(jnp.concatenate([layers_a[layer], layers_b[layer]]).astype(jnp.float32))
      kl = kl_to_last_layer(final, embeddings, kl_temperature)
      loss = loss + layer_mask[layer] * kl * kl_temperature * kl_div_weight
  return loss, metrics


def sample_layers(rng: jax.Array, num_layers: int, layers_per_step: int) -> jax.Array:
  """[num_layers] 0/1 mask of the earlier layers trained this step: `layers_per_step` drawn
  uniformly without replacement (<= 0 or >= num_layers: all of them)."""
  if layers_per_step <= 0 or layers_per_step >= num_layers:
    return jnp.ones((num_layers,), jnp.float32)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (num_layers,))))
  return (rank < layers_per_step).astype(jnp.float32)
