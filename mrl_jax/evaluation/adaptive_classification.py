"""Adaptive classification (MRL-AC, paper Sec. 5.1) and the oracle, as the official cascades.

Inputs per nesting size i (ascending): the head's prediction pred_i [N] and confidence conf_i [N]
= max softmax probability (of the flip-TTA-summed logits when TTA is on).

- Thresholds: for each consecutive pair (i, i+1), t_i is the smallest t on linspace(0.1, 1, 100)
  that maximises accuracy on a held-out random part of the eval split when predicting with size
  i if conf_i > t and with size i+1 otherwise.
- Cascade with cap c: each remaining example takes the first size i < c whose conf_i > t_i, and
  the cap size otherwise; we report its accuracy and expected size (the mean of the sizes used).
- Averaged over `seeds` random held-out splits (the official code: 10K of 50K, 30 seeds).
- Oracle: each example takes the smallest size whose prediction is correct (the largest if none
  is); its accuracy is the fraction of examples some size gets right.
"""

from collections.abc import Sequence

import numpy as np

GRID = np.linspace(0.1, 1.0, 100)


def fit_threshold(conf_small, pred_small, pred_large, labels, grid=GRID) -> float:
  """Smallest t in grid maximising accuracy of (pred_small if conf_small > t else pred_large)."""
  use_small = conf_small[None, :] > grid[:, None]  # [T, N]
  correct = np.where(use_small, pred_small[None, :] == labels, pred_large[None, :] == labels)
  accuracy = correct.mean(1)
  return float(grid[int(np.argmax(accuracy >= accuracy.max() - 1e-12))])


def cascade(conf: np.ndarray, pred: np.ndarray, sizes: Sequence[int], thresholds, cap: int):
  """(predictions [N], size used [N]) of the cascade over sizes[:cap + 1].

  conf, pred: [S, N] per size (ascending); thresholds: [S - 1].
  """
  n = conf.shape[1]
  chosen = np.full(n, cap)
  undecided = np.ones(n, bool)
  for i in range(cap):
    take = undecided & (conf[i] > thresholds[i])
    chosen[take] = i
    undecided &= ~take
  return pred[chosen, np.arange(n)], np.asarray(sizes)[chosen]


def oracle(pred: np.ndarray, labels: np.ndarray, sizes: Sequence[int]) -> dict:
  """Smallest correct size per example (the largest when no size is correct)."""
  correct = pred == labels[None, :]  # [S, N]
  any_correct = correct.any(0)
  first = np.where(any_correct, np.argmax(correct, axis=0), len(sizes) - 1)
  return {"accuracy": float(any_correct.mean()),
          "expected_size": float(np.asarray(sizes)[first].mean()),
          "solved_at_smallest": float(correct[0].mean())}


def evaluate(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, sizes: Sequence[int], *,
             holdout: float = 0.2, seeds: int = 30, caps: Sequence[int] = ()) -> list[dict]:
  """Rows for results.json (a list): one `kind: cascade` row per cap size
  (default: every size but the smallest), mean over seeds, then one `kind: oracle` row."""
  sizes = list(sizes)
  n = len(labels)
  cap_indices = [sizes.index(c) for c in caps] if caps else list(range(1, len(sizes)))
  per_cap = {c: {"accuracy": [], "expected_size": [], "thresholds": []} for c in cap_indices}
  n_fit = max(1, int(round(holdout * n)))
  for seed in range(seeds):
    perm = np.random.default_rng(seed).permutation(n)
    fit, test = perm[:n_fit], perm[n_fit:]
    thresholds = np.asarray([fit_threshold(conf[i, fit], pred[i, fit], pred[i + 1, fit],
                                           labels[fit]) for i in range(len(sizes) - 1)])
    for c in cap_indices:
      p, used = cascade(conf[:, test], pred[:, test], sizes, thresholds, c)
      per_cap[c]["accuracy"].append(float(np.mean(p == labels[test])))
      per_cap[c]["expected_size"].append(float(np.mean(used)))
      per_cap[c]["thresholds"].append(thresholds[:c])
  rows = []
  for c, r in per_cap.items():
    rows.append({"kind": "cascade", "cap": sizes[c], "accuracy": float(np.mean(r["accuracy"])),
                 "accuracy_std": float(np.std(r["accuracy"])),
                 "expected_size": float(np.mean(r["expected_size"])),
                 "mean_thresholds": np.mean(r["thresholds"], axis=0).tolist(),
                 "fixed_size_accuracy": float(np.mean(pred[c] == labels)),
                 "seeds": seeds, "holdout": holdout})
  return rows + [{"kind": "oracle", "cap": sizes[-1], **oracle(pred, labels, sizes)}]
