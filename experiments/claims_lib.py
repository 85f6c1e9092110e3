"""What the claims experiments share: train and evaluate a run once (reused when rerun), and
per-size tables of mean ± std over seeds."""

import json
import os
import time

import numpy as np


def train_eval(config, workdir, *, train: bool = True) -> tuple[dict, float]:
  """{set: results} of eval.py on the workdir (reused when there), seconds spent."""
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  done = os.path.join(workdir, "claims_run.json")
  if os.path.exists(done):
    with open(done) as f:
      saved = json.load(f)
    return saved["results"], saved["seconds"]
  t0 = time.perf_counter()
  if train:
    train_lib.train_and_evaluate(config, workdir)
  results = evaluate.evaluate_checkpoint(config, workdir)
  seconds = time.perf_counter() - t0
  with open(done, "w") as f:
    json.dump({"results": results, "seconds": seconds}, f)
  return results, seconds


def pm(values) -> str:
  """mean ± std (population std, as numpy's), the mean alone for one value, – for none."""
  v = np.asarray(values, np.float64)
  return "–" if not len(v) else f"{v.mean():.1f}" + (f" ± {v.std():.1f}" if len(v) > 1 else "")


def table(rows: dict[str, dict[int, list[float]]], sizes, scale=100.0) -> str:
  lines = ["| m | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
  for m in sizes:
    cells = []
    for values in rows.values():
      cells.append(pm(np.asarray(values.get(m, []), np.float64) * scale))
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
