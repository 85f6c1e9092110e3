"""Every neighbour-based metric formula, in one place, as the official MRL code defines it.

Labels are integer class ids [N] (single-label data) or, for multi-label data (JFT-style,
ImageNet-ReaL), padded id lists [N, L] with -1 for "no label" (`label_lists`). Inputs are the
labels of each query's ranked neighbours, `neighbor_labels` [Q, K] or [Q, K, L] (nearest first),
the query labels [Q] or [Q, L], and for recall the number of database items relevant to each
query. A neighbour is relevant when it shares at least one label with the query (single-label:
the same class).

- 1-NN / k-NN accuracy: the label voted by the k nearest (each neighbour votes for each of its
  labels; ties between classes go to the class whose first vote ranks highest, i.e. the
  nearest) is one of the query's labels. For k = 1 with multi-label neighbours: the nearest
  neighbour is relevant.
- For query q with relevance rel_i and P@i = (sum_{j<=i} rel_j) / i:
  - `map@k` (the paper's convention, official `compute_mAP_recall_at_k`):
    AP@k = (sum_{i<=k} rel_i * P@i) / k.
  - `map@k_standard`: the same sum divided by the number of relevant items retrieved in the top k
    (0 when none), the usual information-retrieval normalisation.
  - `precision@k` = (sum_{i<=k} rel_i) / k.
  - `recall@k` = (sum_{i<=k} rel_i) / (number of relevant database items). The official code
    divides by a constant 1300 (ImageNet's approximate images per class); we use the true counts.
  - `topk_hit@k` = 1[any rel_i = 1 for i <= k].
All are averaged over queries and returned as fractions in [0, 1]. Multi-label queries without
any label are left out before these functions (as ImageNet-ReaL's evaluation does).
"""

from collections.abc import Sequence

import numpy as np


def label_lists(multi_hot: np.ndarray) -> np.ndarray:
  """Multi-hot [N, C] -> padded class-id lists int32 [N, L] (-1 = none), L = max labels."""
  multi_hot = np.asarray(multi_hot) > 0
  width = max(int(multi_hot.sum(-1).max(initial=0)), 1)
  out = np.full((multi_hot.shape[0], width), -1, np.int32)
  rows, cols = np.nonzero(multi_hot)
  slot = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within each row
  out[rows, slot] = cols
  return out


def has_label(labels: np.ndarray) -> np.ndarray:
  """[N] bool: the example has at least one label (always, for single-label data)."""
  labels = np.asarray(labels)
  return (labels >= 0).any(-1) if labels.ndim == 2 else np.ones(len(labels), bool)


def relevance(neighbor_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
  """[Q, K] bool: neighbour shares a label with the query."""
  neighbor_labels, query_labels = np.asarray(neighbor_labels), np.asarray(query_labels)
  if neighbor_labels.ndim == 2 and query_labels.ndim == 1:
    return neighbor_labels == query_labels[:, None]
  nb = neighbor_labels if neighbor_labels.ndim == 3 else neighbor_labels[..., None]
  q = query_labels if query_labels.ndim == 2 else query_labels[:, None]
  same = (nb[:, :, :, None] == q[:, None, None, :]) & (nb[:, :, :, None] >= 0)
  return same.any(axis=(2, 3))


def relevant_counts(database_labels: np.ndarray, query_labels: np.ndarray,
                    num_classes: int | None = None) -> np.ndarray:
  """[Q] number of database items sharing a label with each query (recall's denominator)."""
  database_labels, query_labels = np.asarray(database_labels), np.asarray(query_labels)
  n_classes = int(max(num_classes or 0, database_labels.max(initial=-1) + 1,
                      query_labels.max(initial=-1) + 1))
  if database_labels.ndim == 1:
    counts = np.bincount(database_labels, minlength=n_classes)
    if query_labels.ndim == 1:
      return counts[query_labels]
    return np.where(query_labels >= 0, counts[np.maximum(query_labels, 0)], 0).sum(-1)
  # Multi-label database: |union of the query labels' item sets|, via a sparse class index.
  rows = np.repeat(np.arange(len(database_labels)), database_labels.shape[1])
  cols = database_labels.reshape(-1)
  rows, cols = rows[cols >= 0], cols[cols >= 0]
  order = np.argsort(cols, kind="stable")
  rows, cols = rows[order], cols[order]
  starts = np.searchsorted(cols, np.arange(n_classes + 1))
  queries = query_labels if query_labels.ndim == 2 else query_labels[:, None]
  return np.asarray([len(np.unique(np.concatenate(
      [rows[starts[c]:starts[c + 1]] for c in q if c >= 0] or [np.zeros(0, np.int64)])))
                     for q in queries])


def knn_predict(neighbor_labels: np.ndarray, k: int) -> np.ndarray:
  """Majority vote over the labels of the k nearest; ties -> the tied class seen first."""
  labels = np.asarray(neighbor_labels)[:, :k]
  labels = labels.reshape(labels.shape[0], -1)  # multi-label: every label of each neighbour
  if labels.shape[1] == 1:
    return labels[:, 0].copy()
  q = labels.shape[0]
  # votes[i, j] = how many of the votes equal vote j (padding -1 never wins).
  votes = (labels[:, :, None] == labels[:, None, :]).sum(-1)
  votes = np.where(labels >= 0, votes, -1)
  best = votes.max(1, keepdims=True)
  first_best = np.argmax(votes == best, axis=1)  # earliest (nearest) vote of a top class
  return labels[np.arange(q), first_best]


def knn_accuracy(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  neighbor_labels = np.asarray(neighbor_labels)
  if k == 1 and neighbor_labels.ndim == 3:
    return float(np.mean(relevance(neighbor_labels[:, :1], query_labels)[:, 0]))
  predicted = knn_predict(neighbor_labels, k)
  return float(np.mean(relevance(predicted[:, None], query_labels)[:, 0]))


def retrieval_metrics(neighbor_labels: np.ndarray, query_labels: np.ndarray,
                      relevant: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """map@k, map@k_standard, precision@k, recall@k, topk_hit@k for each k in ks.

  `relevant`: [Q] number of relevant database items per query (`relevant_counts`).
  """
  out = {}
  max_k = max(ks) if ks else 0
  if max_k > np.asarray(neighbor_labels).shape[1]:
    raise ValueError(f"retrieval k={max_k} exceeds the {np.asarray(neighbor_labels).shape[1]} "
                     "neighbours searched")
  rel = relevance(np.asarray(neighbor_labels)[:, :max_k], query_labels).astype(np.float64)
  hits = np.cumsum(rel, axis=1)  # [Q, K]: relevant items among the first i
  precision_at_i = hits / np.arange(1, max_k + 1)
  counts = np.maximum(np.asarray(relevant), 1).astype(np.float64)
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
                     relevant: np.ndarray, knn_ks: Sequence[int],
                     retrieval_ks: Sequence[int]) -> dict[str, float]:
  """The per-size neighbour metrics of results.json: knn<k>_top1 and the retrieval metrics."""
  out = {f"knn{k}_top1": knn_accuracy(neighbor_labels, query_labels, k) for k in knn_ks}
  out.update(retrieval_metrics(neighbor_labels, query_labels, relevant, retrieval_ks))
  return out


def class_mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean over classes with a positive of AP, ranking the examples by the class's score:
  sklearn's average_precision_score per class, ties included: examples with equal scores form
  one threshold, AP = sum over thresholds of (recall gained) x (precision at the threshold),
  so the result does not depend on the order of tied examples. scores [N, C]; labels [N, C]
  multi-hot or [N, L] padded lists. The standard multi-label mAP."""
  scores = np.asarray(scores, np.float64)
  truth = np.asarray(labels)
  if truth.shape != scores.shape:  # padded lists -> multi-hot
    multi = np.zeros(scores.shape, bool)
    rows, cols = np.nonzero(truth >= 0)
    multi[rows, truth[rows, cols]] = True
    truth = multi
  truth = truth > 0
  order = np.argsort(-scores, axis=0, kind="stable")
  ranked = np.take_along_axis(truth, order, axis=0)  # [N, C], best first per class
  ranked_scores = np.take_along_axis(scores, order, axis=0)
  last = np.ones(ranked.shape, bool)  # the last example of each group of tied scores
  last[:-1] = ranked_scores[:-1] != ranked_scores[1:]
  hits = np.cumsum(ranked, axis=0)
  end_hits = np.where(last, hits, 0)
  # hits at the previous group's end (hits never decrease down a column)
  previous = np.maximum.accumulate(np.vstack([np.zeros_like(hits[:1]), end_hits[:-1]]), axis=0)
  precision = hits / np.arange(1, len(scores) + 1)[:, None]
  positives = ranked.sum(0)
  ap = np.where(last, (hits - previous) * precision, 0.0).sum(0) / np.maximum(positives, 1)
  return float(ap[positives > 0].mean()) if (positives > 0).any() else 0.0


# --- text: similarity ratings and query -> document retrieval ----------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  ranks = np.empty(len(x), np.float64)
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = 0.5 * (s + 1 + e)
  return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rank correlation: Pearson's of the average ranks (the STS / Lee benchmark
  score of embedding cosines against human ratings)."""
  rx, ry = average_ranks(x), average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Metrics of queries with one relevant document at 1-based `ranks` [Q] (BEIR's definitions):
  ndcg@10 = 1 / log2(1 + rank) if rank <= 10 (the ideal DCG is 1), mrr@10 = 1 / rank if
  rank <= 10, recall@k = 1[rank <= k]; means over queries."""
  ranks = np.asarray(ranks, np.float64)
  out = {"ndcg@10": float(np.mean(np.where(ranks <= 10, 1.0 / np.log2(1.0 + ranks), 0.0))),
         "mrr@10": float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))}
  for k in ks:
    out[f"recall@{k}"] = float(np.mean(ranks <= k))
  return out
