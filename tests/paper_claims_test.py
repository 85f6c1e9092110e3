"""experiments/paper_claims.py --quick: every method at every size, finite numbers, all outputs.

Structure only: with 10 training steps the numbers are noise, so no scientific claim is checked.
"""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
  work = tmp_path_factory.mktemp("paper_claims")
  out = work / "results"
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "paper_claims.py"), "--quick",
       f"--data_dir={data_dir}", f"--workdir={work / 'runs'}", f"--out={out}"],
      capture_output=True, text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "summary.json") as f:
    return out, json.load(f), proc.stdout


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_method_at_every_size(quick_run):
  out, summary, _ = quick_run
  d = 8 * summary["setup"]["width"]
  trained = [2 ** k for k in range(1, int(math.log2(d)) + 1)]  # halving:2
  interpolated = [3 * 2 ** k for k in range(8) if 3 * 2 ** k < d]
  assert trained == [2, 4, 8] and interpolated == [3, 6]
  everywhere = ["MRL", "MRL-E", "FF", "SVD", "PCA", "Rand. proj.", "Rand. subset"]
  for name, extra_methods in (("linear_top1", []), ("knn1_top1", ["Std. z[:m]"]),
                              ("map10", ["Std. z[:m]"])):
    rows = _rows(out / f"{name}.csv")
    have = {(int(r["size"]), r["method"]) for r in rows}
    for m in trained:
      for method in everywhere + extra_methods:
        assert (m, method) in have, (name, m, method)
    if name != "linear_top1":  # neighbour metrics at the untrained sizes too
      for m in interpolated:
        assert {(m, "MRL"), (m, "MRL-E")} <= have, (name, m)
    for r in rows:
      assert 0.0 <= float(r["mean"]) <= 100.0 and math.isfinite(float(r["std"])), r
      assert int(r["seeds"]) == 1
    with open(out / f"{name}.md") as f:
      table = f.read()
    assert table.count("\n| ") == len(trained) + len(interpolated) + 1  # header + one per size


@pytest.mark.slow
def test_adaptive_tables_and_claims(quick_run):
  out, summary, stdout = quick_run
  d = 8 * summary["setup"]["width"]
  retrieval = _rows(out / "adaptive_retrieval.csv")
  kinds = {r["kind"] for r in retrieval}
  assert kinds == {"single_shot", "adaptive", "funnel"}
  exact = [r for r in retrieval if r["name"] == f"{d} (single-shot)"]
  assert len(exact) == 1 and float(exact[0]["mflops_speedup"]) == 1.0
  for r in retrieval:
    assert all(math.isfinite(float(r[k])) for k in ("mflops", "map@10", "top1",
                                                     "ms_per_query_block"))
  classification = _rows(out / "adaptive_classification.csv")
  assert [r["name"] for r in classification] == ["cascade, cap 4", "cascade, cap 8", "oracle"]
  for r in classification:
    assert 2.0 <= float(r["expected_size"]) <= d
  assert [c["claim"] for c in summary["claims"]] == list("abcdef")
  for c in summary["claims"]:
    assert isinstance(c["holds"], bool) and c["detail"]
    assert f"({c['claim']})" in stdout
  assert (out / "paper_claims.png").stat().st_size > 10_000
  assert len(summary["seconds_per_run"]) == 2 + 3  # MRL, MRL-E, FF-2/4/8
