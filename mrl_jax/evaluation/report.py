"""results.json, results.csv (one row per size) and accuracy_vs_dim.png, in one output folder."""

import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from mrl_jax import utils  # pylint: disable=wrong-import-position

# Column order of the CSV: the most read metrics first.
_FIRST = ("linear_top1", "linear_top5", "knn1_top1")


def _metric_columns(sizes: dict) -> list[str]:
  keys = {k for metrics in sizes.values() for k in metrics}
  return [k for k in _FIRST if k in keys] + sorted(keys - set(_FIRST))


def write(outdir: str, results: dict) -> None:
  """Writes the three reports (process 0 only)."""
  if not utils.is_main_process():
    return
  os.makedirs(outdir, exist_ok=True)
  utils.write_json(os.path.join(outdir, "results.json"), results)
  sizes = results["sizes"]
  columns = _metric_columns(sizes)
  trained = set(map(str, results.get("trained_sizes", [])))
  with open(os.path.join(outdir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["size", "trained", *columns])
    for size in sorted(sizes, key=int):
      w.writerow([size, int(size in trained),
                  *[_fmt(sizes[size].get(c)) for c in columns]])
  plot_accuracy_vs_dim(os.path.join(outdir, "accuracy_vs_dim.png"), results)


def _fmt(value):
  return "" if value is None else f"{value:.6f}"


def plot_accuracy_vs_dim(path: str, results: dict) -> None:
  """Linear and 1-NN accuracy against the size (log2 axis); untrained sizes hollow."""
  sizes = results["sizes"]
  trained = set(map(str, results.get("trained_sizes", sizes)))
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, color in (("linear_top1", "linear (head)", "C0"),
                            ("knn1_top1", "1-NN", "C1")):
    points = sorted((int(s), m[key]) for s, m in sizes.items() if m.get(key) is not None)
    if not points:
      continue
    xs, ys = zip(*points)
    ax.plot(xs, [100 * y for y in ys], "-", color=color, label=label)
    for x, y in points:
      filled = str(x) in trained
      ax.plot([x], [100 * y], "o", color=color, markerfacecolor=color if filled else "white")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("representation size m (hollow: not trained, interpolated)")
  ax.set_ylabel("top-1 accuracy (%)")
  title = f"{results.get('dataset', '')} {results.get('split', '')}".strip()
  ax.set_title(title or "accuracy vs size")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
