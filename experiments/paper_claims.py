r"""Reproduces the MRL paper's claims at small scale on the built-in offline data.

  python experiments/paper_claims.py                    # MNIST subset, 3 seeds: ~30 min, 2 cores
  python experiments/paper_claims.py --dataset=digits   # scikit-learn's 8x8 digits
  python experiments/paper_claims.py --quick            # smoke run (CI): digits, 1 seed, tiny

For every seed it trains, with one recipe (configs/<dataset>_resnet_mrl.py: ResNet-18, small
stem, width 8 so d = 64, nesting 2, 4, ..., 64): an MRL model, an MRL-E model and one FF-m model
per nesting size (FF-64 is the standard model). Each is evaluated by eval.py's code: linear (head)
top-1, 1-NN top-1 and mAP@10 at every size, interpolated sizes 3, 6, ..., 48 for the
Matryoshka models, SVD / PCA / random-feature baselines from the standard model's features,
adaptive retrieval and adaptive classification of the MRL model.

Writes to --out: `<metric>.csv` (long: size, method, mean, std, per-seed values) and `.md`
(size x method, mean ± std over seeds) for linear_top1, knn1_top1 and map10;
adaptive_retrieval.{csv,md}; adaptive_classification.{csv,md}; claims.md (the numbers behind
the paper's claims (a)-(f), computed, not interpreted); summary.json; paper_claims.png.
Runs live in --workdir and are reused, so an interrupted script resumes where it stopped.
"""

import dataclasses
import importlib
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

METRICS = {"linear_top1": "Linear (head) top-1 (%)", "knn1_top1": "1-NN top-1 (%)",
           "map@10": "mAP@10 (%, the paper's convention)"}
FILE_NAMES = {"linear_top1": "linear_top1", "knn1_top1": "knn1_top1", "map@10": "map10"}
BASELINES = {"svd": "SVD", "pca": "PCA", "random_projection": "Rand. proj.",
             "random_subset": "Rand. subset"}
METHODS = ("MRL", "MRL-E", "FF", "Std. z[:m]", *BASELINES.values())
DATASETS = {"mnist": "mnist_resnet_mrl", "digits": "digits_resnet_mrl"}


@dataclasses.dataclass(frozen=True)
class Setup:
  """One experiment: the dataset, the model family and how long each model trains."""
  dataset: str = "mnist"
  seeds: int = 3
  width: int = 8  # feature dim d = 8 * width
  nesting: str = "halving:2"
  epochs: float = 6.0
  total_steps: int = 0  # > 0 overrides epochs
  probe_steps: int = 200
  ac_seeds: int = 30
  data_dir: str | None = None

  @property
  def feature_dim(self) -> int:
    return 8 * self.width


QUICK = dict(dataset="digits", seeds=1, width=1, total_steps=10, probe_steps=20, ac_seeds=3)


@dataclasses.dataclass(frozen=True)
class Run:
  method: str  # mrl | mrle | ff
  seed: int
  size: int = 0  # FF-m: m

  @property
  def name(self) -> str:
    return f"{self.method}{self.size or ''}_seed{self.seed}"


def nesting_sizes(setup: Setup) -> tuple[int, ...]:
  from mrl_jax import nesting  # pylint: disable=g-import-not-at-top
  return nesting.parse(setup.nesting, setup.feature_dim)


def runs(setup: Setup) -> list[Run]:
  out = []
  for seed in range(setup.seeds):
    out += [Run("mrl", seed), Run("mrle", seed)]
    out += [Run("ff", seed, m) for m in reversed(nesting_sizes(setup))]  # standard (FF-d) first
  return out


def make_config(setup: Setup, run: Run):
  """The dataset's config with this run's head; only the MRL and standard runs do the extras."""
  module = importlib.import_module(f"configs.{DATASETS[setup.dataset]}")
  head = f"ff={run.size}" if run.method == "ff" else run.method
  config = module.get_config(f"{head},seed={run.seed},width={setup.width},"
                             f"epochs={setup.epochs},nesting={setup.nesting}")
  if setup.total_steps:
    config.total_steps = setup.total_steps
  config.input.data_dir = setup.data_dir
  config.update(eval_every_steps=0, checkpoint_every_steps=10**9, keep_checkpoints=1,
                log_every_steps=10**9)
  ev = config.eval
  sizes = nesting_sizes(setup)
  # Shortlist at the (up to 3) smallest sizes, rerank at d; one funnel of >= 2 stages through
  # every larger size, from the second-smallest size when there are enough sizes.
  start = 1 if len(sizes) >= 4 else 0
  stages = sizes[start + 1:]
  ev.update(adaptive_retrieval=run.method == "mrl", adaptive_classification=run.method == "mrl",
            shortlist_sizes=tuple(m for m in sizes[:3] if m < sizes[-1]),
            rerank_sizes=(sizes[-1],), shortlist_k=(50,),
            funnels=((sizes[start], tuple(stages),
                      tuple(max(10, 400 >> j) for j in range(len(stages)))),),
            baselines=(), fewshot_shots=(), probe_steps=setup.probe_steps,
            ac_seeds=setup.ac_seeds, knn_k=(1,), retrieval_k=(10,))
  if run.method == "ff":
    if run.size == setup.feature_dim:  # the standard model: every prefix and the baselines
      ev.baselines = tuple(BASELINES)
    else:  # FF-m is evaluated at m only
      config.mrl.nesting = str(run.size)
      ev.extra_sizes = ()
  return config


def train_and_evaluate(setup: Setup, run: Run, workdir: str) -> tuple[dict, bool]:
  """(results.json of the run's evaluation, reused?): reused when present for the same config."""
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
  from mrl_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  config = make_config(setup, run)
  workdir_lib.check(workdir, config, overwrite=False)  # another setup's runs are refused
  path = os.path.join(workdir, "eval", config.input.dataset, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), True
  summary = train_lib.train_and_evaluate(config, workdir)
  if summary.get("preempted"):
    raise SystemExit(f"interrupted during {run.name}; rerun the same command to resume")
  return evaluate.evaluate_checkpoint(config, workdir)[config.input.dataset], False


# ---- aggregation --------------------------------------------------------------------------

def per_size_values(setup: Setup, results: dict[Run, dict]) -> dict:
  """{metric: {method: {size: [value per seed]}}}, values in %."""
  d = setup.feature_dim
  table = {metric: {method: {} for method in METHODS} for metric in METRICS}

  def add(method, size, metrics):
    for metric in METRICS:
      if metric in metrics and metrics[metric] is not None:
        table[metric][method].setdefault(int(size), []).append(100 * metrics[metric])

  for run, res in results.items():
    if run.method in ("mrl", "mrle"):
      for size, metrics in res["sizes"].items():
        add("MRL" if run.method == "mrl" else "MRL-E", size, metrics)
    elif run.size != d:
      add("FF", run.size, res["sizes"][str(run.size)])
    else:
      add("FF", d, res["sizes"][str(d)])
      for size, metrics in res["sizes"].items():
        add("Std. z[:m]", size, metrics)
      for kind, by_size in res.get("baselines", {}).items():
        for size, metrics in by_size.items():
          add(BASELINES[kind], size, metrics)
  return table


def adaptive_retrieval_rows(results: dict[Run, dict]) -> list[dict]:
  by_name = {}
  for run, res in results.items():
    for row in res.get("adaptive_retrieval", []):
      by_name.setdefault(row["name"], []).append(row)
  out = []
  for name, rows in by_name.items():
    first = rows[0]
    out.append({"name": name, "kind": first["kind"], "mflops": first["mflops"],
                **_stat("map@10", [100 * r["map@10"] for r in rows]),
                **_stat("precision@10", [100 * r["precision@10"] for r in rows]),
                **_stat("top1", [100 * r["top1"] for r in rows]),
                "ms_per_query_block": float(np.mean([r["ms_per_query_block"] for r in rows])),
                "mflops_speedup": first["mflops_speedup_vs_exact"],
                "wallclock_speedup": float(np.mean([r["wallclock_speedup_vs_exact"]
                                                    for r in rows]))})
  return sorted(out, key=lambda r: (r["kind"] != "single_shot", r["mflops"]))


def adaptive_classification_rows(results: dict[Run, dict]) -> list[dict]:
  by_cap, oracle = {}, []
  for run, res in results.items():
    ac = res.get("adaptive_classification")
    if not ac:
      continue
    for row in ac:
      if row["kind"] == "oracle":
        oracle.append(row)
      else:
        by_cap.setdefault(row["cap"], []).append(row)
  out = [{"name": f"cascade, cap {cap}", "cap": cap,
          **_stat("accuracy", [100 * r["accuracy"] for r in rows]),
          **_stat("expected_size", [r["expected_size"] for r in rows]),
          **_stat("fixed_size_accuracy", [100 * r["fixed_size_accuracy"] for r in rows])}
         for cap, rows in sorted(by_cap.items())]
  if oracle:
    out.append({"name": "oracle", "cap": max(by_cap),
                **_stat("accuracy", [100 * o["accuracy"] for o in oracle]),
                **_stat("expected_size", [o["expected_size"] for o in oracle])})
  return out


def _stat(key: str, values) -> dict:
  return {key: float(np.mean(values)), f"{key}_std": float(np.std(values))}


def mean(table, metric, method, size) -> float:
  values = table[metric][method].get(size)
  return float(np.mean(values)) if values else math.nan


def claims(setup: Setup, table, retrieval, classification) -> list[dict]:
  """The measured quantity behind each of the paper's claims (a)-(f), with the test applied."""
  sizes = nesting_sizes(setup)
  d, smallest = setup.feature_dim, sizes[0]
  lin = lambda method, m: mean(table, "linear_top1", method, m)
  nn1 = lambda method, m: mean(table, "knn1_top1", method, m)
  out = []

  gaps = {m: lin("MRL", m) - lin("FF", m) for m in sizes}
  worst = min(gaps, key=gaps.get)
  out.append(dict(claim="a", text="MRL within about 1 point of FF-m at every size (linear)",
                  holds=all(g >= -1.0 for g in gaps.values()),
                  detail="MRL - FF per size: " + ", ".join(f"{m}: {g:+.2f}" for m, g in
                                                            gaps.items())
                  + f"; worst {gaps[worst]:+.2f} at m = {worst}"))

  best = max(lin(b, smallest) for b in BASELINES.values())
  best_nn = max(nn1(b, smallest) for b in BASELINES.values())
  out.append(dict(claim="b", text=f"MRL far above SVD/PCA/random at the smallest size "
                                  f"(m = {smallest})",
                  holds=lin("MRL", smallest) - best >= 5.0,
                  detail=f"linear: MRL {lin('MRL', smallest):.1f} vs best baseline {best:.1f} "
                         f"({lin('MRL', smallest) - best:+.1f}); 1-NN: MRL "
                         f"{nn1('MRL', smallest):.1f} vs {best_nn:.1f} "
                         f"({nn1('MRL', smallest) - best_nn:+.1f}); "
                         + ", ".join(f"{b} {lin(b, smallest):.1f}" for b in BASELINES.values())))

  e_gaps = {m: lin("MRL-E", m) - lin("MRL", m) for m in sizes}
  rest = [abs(g) for m, g in e_gaps.items() if m != smallest]
  out.append(dict(claim="c", text="MRL-E close to MRL except at the smallest size (linear)",
                  holds=max(rest) <= 1.0,
                  detail="MRL-E - MRL per size: " + ", ".join(
                      f"{m}: {g:+.2f}" for m, g in e_gaps.items())))

  interpolated = sorted(m for m in table["knn1_top1"]["MRL"] if m not in sizes)
  rows = []
  for m in interpolated:
    lower = max(s for s in sizes if s < m)
    upper = min(s for s in sizes if s > m)
    value, lo, hi = nn1("MRL", m), nn1("MRL", lower), nn1("MRL", upper)
    rows.append((m, lo <= value <= hi or hi <= value <= lo, f"{m}: {lo:.1f} <= {value:.1f} <= "
                                                          f"{hi:.1f}"))
  out.append(dict(claim="d", text="interpolated (untrained) sizes fall between their neighbours "
                                  "(MRL, 1-NN)",
                  holds=bool(rows) and all(r[1] for r in rows),
                  detail="; ".join(r[2] + ("" if r[1] else " (not between)") for r in rows)))

  exact = next((r for r in retrieval if r["name"] == f"{d} (single-shot)"), None)
  adaptive = [r for r in retrieval if r["kind"] != "single_shot"]
  if exact and adaptive:
    matching = [r for r in adaptive if r["map@10"] >= exact["map@10"] - 0.5]
    cheapest = min(matching, key=lambda r: r["mflops"]) if matching else None
    detail = f"exact at d = {d}: mAP@10 {exact['map@10']:.2f}, {exact['mflops']:.3f} MFLOPs; " + (
        f"cheapest within 0.5 points: {cheapest['name']} mAP@10 {cheapest['map@10']:.2f}, "
        f"{cheapest['mflops']:.3f} MFLOPs ({cheapest['mflops_speedup']:.1f}x fewer, "
        f"{cheapest['wallclock_speedup']:.1f}x wall-clock)" if cheapest else
        "no adaptive configuration within 0.5 points")
    out.append(dict(claim="e", text="adaptive retrieval at a small Ds matches full-size mAP@10 "
                                    "at a fraction of the MFLOPs", holds=cheapest is not None
                    and cheapest["mflops_speedup"] >= 2, detail=detail))

  cascades = [r for r in classification if r["name"].startswith("cascade")]
  if cascades:
    full = next(r for r in cascades if r["cap"] == d)
    out.append(dict(claim="f", text="adaptive classification reaches full-size accuracy at a "
                                    "much smaller expected size",
                    holds=full["accuracy"] >= full["fixed_size_accuracy"] - 0.5
                    and full["expected_size"] <= d / 4,
                    detail=f"cascade up to {d}: {full['accuracy']:.2f}% at expected size "
                           f"{full['expected_size']:.1f} vs fixed {d}: "
                           f"{full['fixed_size_accuracy']:.2f}% "
                           f"({d / full['expected_size']:.1f}x smaller)"))
  return out


# ---- outputs --------------------------------------------------------------------------------

def _pm(values) -> str:
  if not values:
    return "–"
  return f"{np.mean(values):.1f}" if len(values) == 1 else (
      f"{np.mean(values):.1f} ± {np.std(values):.1f}")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _write_csv(path: str, rows: list[dict]) -> None:
  import csv  # pylint: disable=g-import-not-at-top
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def write_outputs(setup: Setup, out: str, table, retrieval, classification, claim_rows,
                  meta: dict) -> None:
  os.makedirs(out, exist_ok=True)
  trained = set(nesting_sizes(setup))
  all_sizes = sorted({m for metric in table.values() for by in metric.values() for m in by})
  for metric, title in METRICS.items():
    methods = [mt for mt in METHODS if table[metric][mt]]
    long = [{"size": m, "interpolated": m not in trained, "method": mt,
             "mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v),
             "values": " ".join(f"{x:.2f}" for x in v)}
            for m in all_sizes for mt in methods if (v := table[metric][mt].get(m))]
    _write_csv(os.path.join(out, f"{FILE_NAMES[metric]}.csv"), long)
    md = _markdown(["m", *methods], [[f"{m}" if m in trained else f"{m}*",
                                      *(_pm(table[metric][mt].get(m)) for mt in methods)]
                                     for m in all_sizes])
    with open(os.path.join(out, f"{FILE_NAMES[metric]}.md"), "w") as f:
      f.write(f"{title}, mean ± std over {setup.seeds} seed(s); * = interpolated size "
              "(not trained)\n\n" + md)
  _write_csv(os.path.join(out, "adaptive_retrieval.csv"), retrieval)
  with open(os.path.join(out, "adaptive_retrieval.md"), "w") as f:
    f.write(_markdown(["retrieval (MRL)", "MFLOPs/query", "mAP@10", "P@10", "top-1",
                       "ms/query block", "speed-up (MFLOPs / wall)"],
                      [[r["name"], f"{r['mflops']:.3f}", _pm_stat(r, "map@10"),
                        _pm_stat(r, "precision@10"), _pm_stat(r, "top1"),
                        f"{r['ms_per_query_block']:.1f}",
                        f"{r['mflops_speedup']:.1f}x / {r['wallclock_speedup']:.1f}x"]
                       for r in retrieval]))
  _write_csv(os.path.join(out, "adaptive_classification.csv"), classification)
  with open(os.path.join(out, "adaptive_classification.md"), "w") as f:
    f.write(_markdown(["classification (MRL)", "accuracy", "expected size",
                       "fixed-size accuracy at the cap"],
                      [[r["name"], _pm_stat(r, "accuracy"), _pm_stat(r, "expected_size"),
                        _pm_stat(r, "fixed_size_accuracy") if "fixed_size_accuracy" in r
                        else "–"] for r in classification]))
  with open(os.path.join(out, "claims.md"), "w") as f:
    f.write(_markdown(["claim", "holds here", "measured"],
                      [[f"({c['claim']}) {c['text']}", "yes" if c["holds"] else "**no**",
                        c["detail"]] for c in claim_rows]))
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"setup": dataclasses.asdict(setup), **meta, "claims": claim_rows,
               "tables": {metric: {mt: {str(m): v for m, v in by.items()}
                                   for mt, by in methods.items() if by}
                          for metric, methods in table.items()},
               "adaptive_retrieval": retrieval, "adaptive_classification": classification},
              f, indent=1)
  plot(os.path.join(out, "paper_claims.png"), setup, table, retrieval, classification)


def _pm_stat(row, key) -> str:
  return f"{row[key]:.1f} ± {row[key + '_std']:.1f}"


def plot(path, setup, table, retrieval, classification) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 3, figsize=(16, 9))
  trained = set(nesting_sizes(setup))
  for ax, (metric, title) in zip(axes[0], METRICS.items()):
    for method in METHODS:
      by = table[metric][method]
      sizes = sorted(m for m in by if m in trained or method in ("MRL", "MRL-E"))
      if not sizes:
        continue
      ys = [np.mean(by[m]) for m in sizes]
      errs = [np.std(by[m]) for m in sizes]
      ax.errorbar(sizes, ys, yerr=errs, marker="o", ms=3, capsize=2, label=method,
                  ls="-" if method in ("MRL", "MRL-E", "FF") else "--")
    ax.set(xscale="log", title=title, xlabel="representation size m")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  ax = axes[1][0]
  for kind, marker in (("single_shot", "s"), ("adaptive", "o"), ("funnel", "^")):
    rows = [r for r in retrieval if r["kind"] == kind]
    if rows:
      ax.scatter([r["mflops"] for r in rows], [r["map@10"] for r in rows], marker=marker,
                 label=kind.replace("_", "-"))
  ax.set(xscale="log", xlabel="MFLOPs per query", ylabel="mAP@10 (%)",
         title="Adaptive retrieval (MRL)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  ax = axes[1][1]
  cascades = [r for r in classification if r["name"].startswith("cascade")]
  if cascades:
    ax.plot([r["expected_size"] for r in cascades], [r["accuracy"] for r in cascades], "o-",
            label="MRL-AC cascade")
    by = table["linear_top1"]["MRL"]
    fixed = sorted(m for m in by if m in trained)
    ax.plot(fixed, [np.mean(by[m]) for m in fixed], "s--", label="MRL, fixed size")
    oracle = [r for r in classification if r["name"] == "oracle"]
    if oracle:
      ax.scatter([oracle[0]["expected_size"]], [oracle[0]["accuracy"]], marker="*", s=120,
                 label="oracle")
  ax.set_xscale("log", base=2)
  ax.set(xlabel="expected size", ylabel="top-1 (%)", title="Adaptive classification (MRL)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  axes[1][2].axis("off")
  fig.suptitle(f"MRL claims on {setup.dataset} (ResNet-18, d = {setup.feature_dim}, "
               f"{setup.seeds} seed(s))")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- main ---------------------------------------------------------------------------------

def _earlier_seconds(out: str) -> dict[str, float]:
  """Per-run seconds of a previous summary.json in `out` (for runs this invocation reuses)."""
  try:
    with open(os.path.join(out, "summary.json")) as f:
      return json.load(f).get("seconds_per_run", {})
  except FileNotFoundError:
    return {}


FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "smoke run: " + json.dumps(QUICK))
flags.DEFINE_enum("dataset", None, sorted(DATASETS), "the built-in dataset (default mnist)")
flags.DEFINE_integer("seeds", None, "seeds per method")
flags.DEFINE_integer("width", None, "feature dim d = 8 * width")
flags.DEFINE_float("epochs", None, "epochs per run")
flags.DEFINE_integer("total_steps", None, "steps per run (overrides epochs)")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's)")
flags.DEFINE_string("workdir", None, "runs (default runs/paper_claims/<setup>)")
flags.DEFINE_string("out", None, "results (default docs/paper_claims/<setup>; --quick: "
                    "<workdir>/results)")


def main(argv) -> int:
  values = dict(QUICK) if FLAGS.quick else {}
  for key in ("dataset", "seeds", "width", "epochs", "total_steps"):
    if FLAGS[key].value is not None:
      values[key] = FLAGS[key].value
  setup = Setup(data_dir=FLAGS.data_dir, **values)
  tag = f"{setup.dataset}_d{setup.feature_dim}" + ("_quick" if FLAGS.quick else "")
  workdir = FLAGS.workdir or os.path.join(REPO, "runs", "paper_claims", tag)
  out = FLAGS.out or (os.path.join(workdir, "results") if FLAGS.quick else
                      os.path.join(REPO, "docs", "paper_claims", tag))

  import jax  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  # Runs share compiled functions (every seed's train step; every run's encoder and searches).
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

  todo = runs(setup)
  results, seconds, reused = {}, {}, []
  earlier = _earlier_seconds(out)
  start = time.perf_counter()
  for i, run in enumerate(todo):
    t0 = time.perf_counter()
    results[run], was_reused = train_and_evaluate(setup, run, os.path.join(workdir, run.name))
    if was_reused:
      reused.append(run.name)
      if run.name in earlier:  # keep the time measured when the run was made
        seconds[run.name] = earlier[run.name]
    else:
      seconds[run.name] = time.perf_counter() - t0
    print(f"[{i + 1}/{len(todo)}] {run.name}: "
          + ("reused" if was_reused else f"{seconds[run.name]:.0f} s")
          + f" (total {time.perf_counter() - start:.0f} s)", flush=True)
  table = per_size_values(setup, results)
  retrieval = adaptive_retrieval_rows(results)
  classification = adaptive_classification_rows(results)
  claim_rows = claims(setup, table, retrieval, classification)
  command = "python experiments/paper_claims.py " + " ".join(argv[1:])
  meta = {"command": command.strip(), "seconds_per_run": seconds, "reused_runs": reused,
          "total_seconds": sum(seconds.values()), "workdir": workdir,
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count()}
  write_outputs(setup, out, table, retrieval, classification, claim_rows, meta)
  for c in claim_rows:
    print(f"({c['claim']}) {'holds' if c['holds'] else 'does NOT hold'}: {c['detail']}")
  print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  app.run(main)
