"""Linear ("head") accuracy per nesting size: top-1 / top-5 of each trained Matryoshka head.

As the official code: argmax of each head's logits on z[:, :m] (MRL-E: first m rows of the tied
kernel plus the full bias). Optional flip test-time augmentation adds the logits of the
horizontally flipped image (the official `--tta`). Restricting the logits to a class subset
(ImageNet-A/-R's 200 classes) happens before the argmax.
"""

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] 1.0 where the label (multi-hot [B, C]: any true label) is among the k largest logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  if labels.ndim == 2:
    return jnp.any(jnp.take_along_axis(labels, top, axis=-1) > 0, axis=-1).astype(jnp.float32)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def accuracy_sums(logits_by_size: dict[int, jax.Array], labels: jax.Array, mask: jax.Array,
                  class_mask: jax.Array | None = None,
                  ks: Sequence[int] = (1, 5)) -> dict[str, jax.Array]:
  """Masked counts of correct predictions: {'top{k}@{m}': sum}, plus 'count'.

  Multi-hot labels [B, C] give {'prec1@{m}'} (top-1 among the true labels) instead, over the
  examples that have a label (an unlabelled one, e.g. in ImageNet-ReaL, is left out).
  """
  if labels.ndim == 2:
    mask = mask * (labels.sum(-1) > 0)
    ks = (1,)
  out = {"count": mask.sum()}
  for m, logits in logits_by_size.items():
    logits = logits.astype(jnp.float32)
    if class_mask is not None:
      logits = jnp.where(class_mask, logits, -jnp.inf)
    for k in ks:
      name = "prec1" if labels.ndim == 2 else f"top{k}"
      out[f"{name}@{m}"] = (topk_correct(logits, labels, k) * mask).sum()
  return out


def head_accuracy(sums_fn, batches: Iterable[dict]) -> dict[str, float]:
  """Runs a jitted `sums_fn(batch) -> accuracy_sums` over batches; returns fractions in [0, 1].

  Sums stay on device and are fetched once at the end.
  """
  total = None
  for batch in batches:
    sums = sums_fn(batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    return {}
  total = jax.device_get(total)
  count = max(float(total.pop("count")), 1.0)
  return {k: float(np.asarray(v)) / count for k, v in total.items()}
