"""Linear ("head") metrics per nesting size, from extracted features: the one head path.

As the official code: argmax of each head's logits on z[:, :m] (MRL-E: first m rows of the tied
kernel plus the full bias). Optional flip test-time augmentation adds the logits of the
horizontally flipped image (the official `--tta`). Restricting the logits to a class subset
(ImageNet-A/-R's 200 classes) happens before the argmax. Single-label data: top-1 / top-5
accuracy. Multi-label data (padded label lists, metrics.label_lists): `prec@1`, the top-1 class
is one of the labels (ImageNet-ReaL accuracy), and `class_map`, class-mean average precision.
The same functions serve eval.py, the in-training evaluation and the adaptive classification.
"""

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluation import metrics


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] 1.0 where the label (multi-hot [B, C]: any true label) is among the k largest logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  if labels.ndim == 2:
    return jnp.any(jnp.take_along_axis(labels, top, axis=-1) > 0, axis=-1).astype(jnp.float32)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@functools.cache
def _logits_fn(model):
  """jit: (params, batch_stats, z, z_flipped or None, class_mask or None) -> {m: logits};
  one per model, so repeated evaluations (every eval step of a run) compile once."""

  def logits(params, batch_stats, z, z_flipped, class_mask):
    heads = model.heads(params, batch_stats)
    out = heads(z)
    if z_flipped is not None:
      out = {m: out[m] + heads(z_flipped)[m] for m in out}
    if class_mask is not None:
      out = {m: jnp.where(class_mask, l.astype(jnp.float32), -jnp.inf) for m, l in out.items()}
    return out

  return jax.jit(logits)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadLogits:
  """Every head's logits from stored features z (and the flipped images' for TTA), blocked."""
  model: object  # state.Model
  params: object
  batch_stats: object
  mesh: jax.sharding.Mesh
  block: int = 4096

  def blocks(self, z: np.ndarray, z_flipped: np.ndarray | None = None,
             class_mask: np.ndarray | None = None) -> Iterator[tuple[int, dict]]:
    """(rows, {m: logits [block, C]}) per block of queries; the last block is zero-padded."""
    with jax.set_mesh(self.mesh):
      for i in range(0, len(z), self.block):
        rows = min(self.block, len(z) - i)
        pad = lambda x: np.pad(np.asarray(x[i:i + rows], np.float32),
                               [(0, self.block - rows), (0, 0)])
        yield rows, _logits_fn(self.model)(
            self.params, self.batch_stats, pad(z), None if z_flipped is None else pad(z_flipped),
            None if class_mask is None else jnp.asarray(class_mask))

  def full_classifier(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(kernel [d, C], bias [C]) of the head reading all d features, or None (FF-m, m < d)."""
    head = self.model.heads(self.params, self.batch_stats).full_classifier()
    return None if head is None else tuple(np.asarray(x) for x in head)


def accuracy_sums(logits_by_size: dict[int, jax.Array], labels, mask,
                  ks: Sequence[int] = (1, 5)) -> dict[str, jax.Array]:
  """Masked counts of correct predictions: {'top{k}@{m}': sum} plus 'count'; multi-hot labels
  [B, C] give {'prec1@{m}'} over the examples that have a label."""
  labels, mask = jnp.asarray(labels), jnp.asarray(mask)
  if labels.ndim == 2:
    mask = mask * (labels.sum(-1) > 0)
    ks = (1,)
  out = {"count": mask.sum()}
  for m, logits in logits_by_size.items():
    for k in ks:
      name = "prec1" if labels.ndim == 2 else f"top{k}"
      out[f"{name}@{m}"] = (topk_correct(logits.astype(jnp.float32), labels, k) * mask).sum()
  return out


_accuracy_sums = jax.jit(accuracy_sums, static_argnames="ks")


def metrics_by_size(heads: HeadLogits, z, labels, z_flipped=None, class_mask=None,
                    budget_bytes: int = 2**30) -> dict[int, dict[str, float]]:
  """{m: {linear_top1, linear_top5}} (single-label labels [N]) or {m: {prec@1, class_map}}
  (multi-label lists [N, L]); [N, C] scores are kept for as many sizes as fit in
  budget_bytes, in passes over the features."""
  if np.asarray(labels).ndim == 1:
    total = None
    for i, (rows, logits) in enumerate(heads.blocks(z, z_flipped, class_mask)):
      start = i * heads.block
      block_labels = np.pad(labels[start:start + rows], (0, heads.block - rows))
      mask = np.pad(np.ones(rows, np.float32), (0, heads.block - rows))
      sums = _accuracy_sums(logits, block_labels, mask)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    count = max(float(total.pop("count")), 1.0)
    out = {}
    for key, value in total.items():
      name, m = key.split("@")
      out.setdefault(int(m), {})[f"linear_{name}"] = float(value) / count
    return out
  return _multilabel(heads, z, labels, z_flipped, class_mask, budget_bytes)


def _multilabel(heads, z, labels, z_flipped, class_mask, budget_bytes):
  out, remaining, per_pass = {}, None, 1
  while remaining is None or remaining:
    scores, row = {}, 0
    for rows, logits in heads.blocks(z, z_flipped, class_mask):
      if remaining is None:
        remaining = sorted(logits)
        num_classes = logits[remaining[0]].shape[-1]
        per_pass = max(1, budget_bytes // (4 * len(z) * num_classes))
      if not scores:
        scores = {m: np.empty((len(z), num_classes), np.float32) for m in remaining[:per_pass]}
      for m, s in scores.items():
        s[row:row + rows] = np.asarray(logits[m])[:rows]
      row += rows
    for m, s in scores.items():
      top = s.argmax(-1)[:, None]
      out[m] = {"prec@1": float(np.mean(metrics.relevance(top, labels)[:, 0])),
                "class_map": metrics.class_mean_average_precision(s, labels)}
      remaining.remove(m)
  return out


def predictions(heads: HeadLogits, z, z_flipped=None) -> tuple[np.ndarray, np.ndarray]:
  """(confidence [S, N] = max softmax, prediction [S, N]) of every head, sizes ascending."""
  conf, pred = [], []
  for rows, logits in heads.blocks(z, z_flipped):
    probs = jnp.stack([jax.nn.softmax(logits[m].astype(jnp.float32)) for m in sorted(logits)])
    conf.append(np.asarray(probs.max(-1))[:, :rows])
    pred.append(np.asarray(probs.argmax(-1))[:, :rows])
  return np.concatenate(conf, 1), np.concatenate(pred, 1)
