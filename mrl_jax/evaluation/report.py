"""results.json, results.csv (one row per size) and accuracy_vs_dim.png, in one output folder.

`python -m mrl_jax.evaluation.report --results=A/results.json --baseline=standard:B/results.json
--out=fig.png` draws one run's per-size metrics beside another's (MRL against the standard
model truncated: the paper's figures).
"""

import csv
import io
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from mrl_jax import paths  # pylint: disable=wrong-import-position
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
  outdir = paths.makedirs(outdir)
  utils.write_json(outdir / "results.json", results)
  sizes = results["sizes"]
  columns = _metric_columns(sizes)
  trained = set(map(str, results.get("trained_sizes", [])))
  _write_csv(outdir / "results.csv", ["size", "trained", *columns],
             [[size, int(size in trained), *[_fmt(sizes[size].get(c)) for c in columns]]
              for size in sorted(sizes, key=int)])
  plot_accuracy_vs_dim(outdir / "accuracy_vs_dim.png", results)
  if results.get("adaptive_retrieval"):
    rows = results["adaptive_retrieval"]
    _write_rows(outdir / "adaptive_retrieval.csv", rows,
                ["name", "kind", "engine", "shortlist_size", "mflops", "seconds",
                 "ms_per_query_block", "map@10", "map@10_standard", "precision@10", "top1",
                 "shortlist_recall", "mflops_speedup_vs_exact", "wallclock_speedup_vs_exact"])
    plot_retrieval_vs_mflops(outdir / "retrieval_vs_mflops.png", rows)
  if results.get("adaptive_classification"):
    _write_rows(outdir / "adaptive_classification.csv",
                results["adaptive_classification"],
                ["kind", "cap", "accuracy", "accuracy_std", "expected_size",
                 "fixed_size_accuracy"])
    plot_adaptive_classification(outdir / "adaptive_classification.png", results)
  if results.get("baselines"):
    rows = [dict(baseline=kind, size=int(size), **metrics)
            for kind, by_size in results["baselines"].items()
            for size, metrics in by_size.items()]
    _write_rows(outdir / "baselines.csv", rows,
                ["baseline", "size", *sorted({k for r in rows for k in r} - {"baseline",
                                                                             "size"})])
  if results.get("fewshot"):
    rows = results["fewshot"]
    _write_rows(outdir / "fewshot.csv", rows,
                sorted({k for r in rows for k in r},
                       key=lambda k: ({"size": 0, "shots": 1}.get(k, 2), k)))


def _write_rows(path, rows: list[dict], columns: list[str]) -> None:
  _write_csv(path, columns, [[_fmt(r.get(c)) if isinstance(r.get(c), float) else r.get(c, "")
                              for c in columns] for r in rows])


def _write_csv(path, header: list, rows: list[list]) -> None:
  text = io.StringIO(newline="")
  w = csv.writer(text)
  w.writerow(header)
  w.writerows(rows)
  paths.write_text(path, text.getvalue())


def _fmt(value):
  """Every float the same way (fixed point, 6 decimals), so a column reads one way."""
  return "" if value is None else f"{value:.6f}"


# The per-size metrics each family's plot draws (those present in a results file), as
# (key, label). Values in [0, 1] are drawn x 100.
CURVES = (("linear_top1", "linear (head) top-1"), ("knn1_top1", "1-NN top-1"),
          ("prec@1", "precision@1"), ("zeroshot_top1", "zero-shot top-1"),
          ("recall@1_i2t", "image->text R@1"), ("recall@5_i2t", "image->text R@5"),
          ("recall@1_t2i", "text->image R@1"), ("recall@5_t2i", "text->image R@5"),
          ("spearman", "Spearman"), ("ndcg@10", "nDCG@10"), ("mlm_acc", "masked-token top-1"))
_ACCURACIES = {"linear_top1", "knn1_top1", "zeroshot_top1", "mlm_acc"}


def plot_accuracy_vs_dim(path, results: dict, baselines: dict | None = None) -> list:
  """Each metric of CURVES in the results against the size (log2 axis), untrained sizes
  hollow; `baselines` ({label: results of another run on the same set}, e.g. the standard
  model truncated) drawn dashed beside it. Returns the lines drawn: [(label, xs, ys)]."""
  runs = [("", results, "-")] + [(f" ({label})", other, "--")
                                 for label, other in (baselines or {}).items()]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  drawn, keys = [], set()
  for i, (key, label) in enumerate(CURVES):
    for suffix, run, style in runs:
      trained = set(map(str, run.get("trained_sizes", run["sizes"])))
      points = sorted((int(s), m[key]) for s, m in run["sizes"].items()
                      if m.get(key) is not None)
      if not points:
        continue
      keys.add(key)
      xs, ys = zip(*points)
      ys = [100 * y for y in ys]
      color = f"C{i % 10}"
      ax.plot(xs, ys, style, color=color, label=label + suffix)
      drawn.append((label + suffix, list(xs), ys))
      for x, y in zip(xs, ys):
        filled = str(x) in trained
        ax.plot([x], [y], "o", color=color, markerfacecolor=color if filled else "white")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("representation size m (hollow: not trained, interpolated)")
  ax.set_ylabel("top-1 accuracy (%)" if keys <= _ACCURACIES else "metric x 100")
  title = f"{results.get('dataset', '')} {results.get('split', '')}".strip()
  ax.set_title(title or "metrics vs size")
  _finish(fig, ax, path, legend_fontsize=7)
  return drawn


def map_key(rows: list[dict]) -> str:
  """"map@10", or the largest mAP@k every row has (a funnel that keeps K < 10 has no mAP@10)."""
  common = set.intersection(*({k for k in r if k.startswith("map@") and k[4:].isdigit()}
                              for r in rows))
  return "map@10" if "map@10" in common else max(common, key=lambda k: int(k[4:]),
                                                  default="top1")


def plot_retrieval_vs_mflops(path, rows: list[dict]) -> None:
  """mAP@10 against MFLOPs per query (log axis): exact single-shot sizes vs adaptive/funnels."""
  key = map_key(rows)
  fig, ax = plt.subplots(figsize=(6, 4))
  styles = {"single_shot": ("o", "C0", "exact search at one size"),
            "adaptive": ("s", "C1", "shortlist -> rerank"),
            "funnel": ("^", "C2", "funnel")}
  for kind, (marker, color, label) in styles.items():
    points = [(r["mflops"], 100 * r[key], r["name"]) for r in rows if r["kind"] == kind]
    if not points:
      continue
    xs, ys, names = zip(*sorted(points))
    ax.plot(xs, ys, marker, color=color, label=label, linestyle="-" if kind == "single_shot"
            else "none")
    for x, y, name in zip(xs, ys, names):
      ax.annotate(name.split(" (")[0], (x, y), fontsize=6, xytext=(3, 3),
                  textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("MFLOPs per query (N_db * Ds + sum K_j * Dr_j) / 1e6")
  ax.set_ylabel(f"{key.replace('map', 'mAP')} (%)" if key != "top1" else "top-1 (%)")
  ax.set_title("adaptive retrieval")
  _finish(fig, ax, path, legend_fontsize=8)


def plot_adaptive_classification(path, results: dict) -> None:
  """Cascade accuracy against expected size, next to each fixed-size head and the oracle."""
  ac = results["adaptive_classification"]
  fig, ax = plt.subplots(figsize=(6, 4))
  fixed = sorted((int(s), 100 * m["linear_top1"]) for s, m in results["sizes"].items()
                 if m.get("linear_top1") is not None)
  if fixed:
    ax.plot(*zip(*fixed), "o-", color="C0", label="fixed size (head)")
  cascades = sorted((c["expected_size"], 100 * c["accuracy"]) for c in ac
                    if c["kind"] == "cascade")
  ax.plot(*zip(*cascades), "s-", color="C1", label="adaptive (cascade)")
  o = next(c for c in ac if c["kind"] == "oracle")
  ax.plot([o["expected_size"]], [100 * o["accuracy"]], "*", color="C3", markersize=10,
          label="oracle")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("(expected) representation size")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("adaptive classification")
  _finish(fig, ax, path, legend_fontsize=8)


def _finish(fig, ax, path, legend_fontsize=None) -> None:
  """Grid, legend (when something is labelled), tight layout, save and close: the end of
  every plot here."""
  ax.grid(True, alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=legend_fontsize)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  paths.write_bytes(path, png.getvalue())


# The per-size metrics eval.py prints (print_results).
SHOWN = ("linear_top1", "prec@1", "knn1_top1", "map@10", "spearman", "ndcg@10", "mrr@10",
         "mlm_acc", "recall@1_i2t", "recall@1_t2i", "zeroshot_top1", "cosine_gap")


def print_results(results: dict) -> None:
  """eval.py's summary of one set: each size's headline metrics, the adaptive funnels."""
  if "split" in results:
    print(f"{results['dataset']} ({results['split']}): {results['num_queries']} queries, "
          f"{results['num_database']} database")
  else:  # a text set (evaluation/text.py)
    print(f"{results['dataset']}:")
  for size, m in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
    shown = {k: v for k, v in m.items() if k in SHOWN}
    if shown:  # (a cross-modal-only set has no per-size row)
      print(f"  m={size:>5}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
  rows = results.get("adaptive_retrieval") or ()
  key = map_key(rows) if rows else ""
  for r in rows:
    print(f"  {r['name']:<32} {key}={r[key]:.4f}  MFLOPs={r['mflops']:.2f}  "
          f"speed-up vs exact: {r['mflops_speedup_vs_exact']:.1f}x (MFLOPs), "
          f"{r['wallclock_speedup_vs_exact']:.1f}x (wall-clock)  "
          f"shortlist recall={r['shortlist_recall']:.3f}")


def main(argv=None) -> int:
  """The comparison plot of results files (module docstring)."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  parser.add_argument("--results", required=True, help="a results.json written by eval.py")
  parser.add_argument("--baseline", action="append", default=[],
                      help="label:path of another run's results.json on the same set "
                           "(repeatable)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  args = parser.parse_args(argv)
  def read(path):
    try:
      return json.loads(paths.read_text(paths.expand(path)))
    except FileNotFoundError:
      raise SystemExit(f"error: no results file {path}") from None
  baselines = {}
  for item in args.baseline:
    label, sep, path = item.partition(":")
    if not sep or not label:
      print(f"error: --baseline={item!r}; allowed: label:path/results.json", file=sys.stderr)
      return 2
    baselines[label] = read(path)
  drawn = plot_accuracy_vs_dim(paths.expand(args.out), read(args.results), baselines)
  print(f"wrote {args.out}: {len(drawn)} curves")
  return 0


if __name__ == "__main__":
  sys.exit(main())
