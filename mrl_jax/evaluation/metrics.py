"""Every neighbour-based metric formula, in one place, as the official MRL code defines it.

Inputs are the labels of each query's ranked neighbours, `neighbor_labels` [Q, K] (nearest
first), the query labels [Q], and for recall the number of database items of each class.

- 1-NN / k-NN accuracy: the label of the nearest neighbour / the majority label of the k nearest
  (ties between classes go to the class whose first neighbour ranks highest, i.e. the nearest).
- For query q with relevance rel_i = 1[label_i == y_q] and P@i = (sum_{j<=i} rel_j) / i:
  - `map@k` (the paper's convention, official `compute_mAP_recall_at_k`):
    AP@k = (sum_{i<=k} rel_i * P@i) / k.
  - `map@k_standard`: the same sum divided by the number of relevant items retrieved in the top k
    (0 when none), the usual information-retrieval normalisation.
  - `precision@k` = (sum_{i<=k} rel_i) / k.
  - `recall@k` = (sum_{i<=k} rel_i) / (number of database items of class y_q). The official code
    divides by a constant 1300 (ImageNet's approximate images per class); we use the true counts.
  - `topk_hit@k` = 1[any rel_i = 1 for i <= k].
All are averaged over queries and returned as fractions in [0, 1].
"""

from collections.abc import Sequence

import numpy as np


def knn_predict(neighbor_labels: np.ndarray, k: int) -> np.ndarray:
  """Majority vote over the k nearest labels; ties -> the tied class seen first (nearest)."""
  labels = neighbor_labels[:, :k]
  if k == 1:
    return labels[:, 0].copy()
  q = labels.shape[0]
  # votes[i, j] = how many of the k neighbours share neighbour j's label.
  votes = (labels[:, :, None] == labels[:, None, :]).sum(-1)
  best = votes.max(1, keepdims=True)
  first_best = np.argmax(votes == best, axis=1)  # earliest (nearest) neighbour of a top class
  return labels[np.arange(q), first_best]


def knn_accuracy(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  return float(np.mean(knn_predict(neighbor_labels, k) == query_labels))


def retrieval_metrics(neighbor_labels: np.ndarray, query_labels: np.ndarray,
                      database_class_counts: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """map@k, map@k_standard, precision@k, recall@k, topk_hit@k for each k in ks."""
  out = {}
  max_k = max(ks) if ks else 0
  if max_k > neighbor_labels.shape[1]:
    raise ValueError(f"retrieval k={max_k} exceeds the {neighbor_labels.shape[1]} neighbours "
                     "searched")
  rel = (neighbor_labels[:, :max_k] == query_labels[:, None]).astype(np.float64)
  hits = np.cumsum(rel, axis=1)  # [Q, K]: relevant items among the first i
  precision_at_i = hits / np.arange(1, max_k + 1)
  counts = np.maximum(database_class_counts[query_labels], 1).astype(np.float64)
  for k in ks:
    ap_sum = (rel[:, :k] * precision_at_i[:, :k]).sum(1)
    retrieved = hits[:, k - 1]
    out[f"map@{k}"] = float(np.mean(ap_sum / k))
    out[f"map@{k}_standard"] = float(np.mean(np.where(retrieved > 0, ap_sum / np.maximum(
        retrieved, 1), 0.0)))
    out[f"precision@{k}"] = float(np.mean(retrieved / k))
    out[f"recall@{k}"] = float(np.mean(retrieved / counts))
    out[f"topk_hit@{k}"] = float(np.mean(retrieved > 0))
  return out


def neighbor_metrics(neighbor_labels: np.ndarray, query_labels: np.ndarray,
                     database_class_counts: np.ndarray, knn_ks: Sequence[int],
                     retrieval_ks: Sequence[int]) -> dict[str, float]:
  """The per-size neighbour metrics of results.json: knn<k>_top1 and the retrieval metrics."""
  out = {f"knn{k}_top1": knn_accuracy(neighbor_labels, query_labels, k) for k in knn_ks}
  out.update(retrieval_metrics(neighbor_labels, query_labels, database_class_counts,
                               retrieval_ks))
  return out
