"""n-shot nearest-class-mean classification per size (paper Sec. 4.2.2, few-shot and long-tail).

For each draw, n training examples per class are sampled; their prefixes z[:m] are
L2-normalised and averaged into one mean per class (normalised again); each query takes the class
of the most cosine-similar mean. Reported overall and, when the training split is imbalanced
(largest class > 1.5x the smallest), on the rarest 10% of classes (at least one): MRL's
long-tail claim is about those. Classes with fewer than n training examples use all they have.
"""

from collections.abc import Sequence

import numpy as np

IMBALANCE = 1.5


def _normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_means(features, labels, m: int, shots: int, num_classes: int, rng) -> np.ndarray:
  means = np.zeros((num_classes, m), np.float64)
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) == 0:
      continue
    pick = rng.choice(idx, min(shots, len(idx)), replace=False)
    means[c] = _normalize(np.asarray(features[pick, :m], np.float64)).mean(0)
  return _normalize(means)


def rare_classes(train_labels: np.ndarray, num_classes: int) -> np.ndarray | None:
  """The rarest 10% of classes if the training split is imbalanced, else None."""
  counts = np.bincount(train_labels, minlength=num_classes)
  present = counts[counts > 0]
  if present.max() <= IMBALANCE * present.min():
    return None
  k = max(1, num_classes // 10)
  return np.argsort(counts, kind="stable")[:k]


def evaluate(database_z, database_y, queries_z, queries_y, sizes: Sequence[int],
             shots: Sequence[int], *, draws: int = 5, seed: int = 0,
             num_classes: int | None = None) -> list[dict]:
  num_classes = num_classes or int(max(database_y.max(), queries_y.max()) + 1)
  rare = rare_classes(database_y, num_classes)
  rows = []
  for m in sizes:
    q = _normalize(np.asarray(queries_z[:, :m], np.float64))
    for n in shots:
      acc, acc_rare = [], []
      for draw in range(draws):
        means = class_means(database_z, database_y, m, n, num_classes,
                            np.random.default_rng([seed, m, n, draw]))
        pred = np.argmax(q @ means.T, axis=1)
        acc.append(np.mean(pred == queries_y))
        in_rare = np.isin(queries_y, rare) if rare is not None else None
        if in_rare is not None and in_rare.any():
          acc_rare.append(np.mean(pred[in_rare] == queries_y[in_rare]))
      row = {"size": m, "shots": n, "accuracy": float(np.mean(acc)),
             "accuracy_std": float(np.std(acc)), "draws": draws}
      if rare is not None:
        row["rare_classes"] = len(rare)
        if acc_rare:
          row["rare_accuracy"] = float(np.mean(acc_rare))
      rows.append(row)
  return rows
