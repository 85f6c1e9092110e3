"""The reports: every CSV value is the results.json value it claims to be."""

import csv
import json
import os

import numpy as np
import pytest

from mrl_jax.evaluation import report


def _results():
  rng = np.random.default_rng(0)
  sizes = {str(m): {"linear_top1": float(rng.random()), "knn1_top1": float(rng.random()),
                    "map@10": float(rng.random())} for m in (2, 4, 8, 3)}
  sizes["3"].pop("linear_top1")  # an interpolated size has no head
  rows = [{"name": "8 (single-shot)", "kind": "single_shot", "engine": "exact",
           "shortlist_size": 8, "mflops": 0.5, "seconds": 0.25, "ms_per_query_block": 250.0,
           "map@10": 0.9, "map@10_standard": 0.95, "precision@10": 0.8, "top1": 0.7,
           "shortlist_recall": 1.0, "mflops_speedup_vs_exact": 1.0,
           "wallclock_speedup_vs_exact": 1.0}]
  return {"dataset": "d", "split": "test", "trained_sizes": [2, 4, 8], "sizes": sizes,
          "adaptive_retrieval": rows, "adaptive_classification": [],
          "fewshot": [{"size": 2, "shots": 1, "accuracy": 0.123456789, "accuracy_std": 0.01,
                       "draws": 5}]}


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_csv_values_equal_results_json(tmp_path):
  out = str(tmp_path / "out")
  report.write(out, _results())
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved == _results()
  table = _csv(os.path.join(out, "results.csv"))
  assert [r["size"] for r in table] == ["2", "3", "4", "8"]  # numeric order
  for r in table:
    metrics = saved["sizes"][r["size"]]
    assert r["trained"] == str(int(int(r["size"]) in saved["trained_sizes"]))
    for key in ("linear_top1", "knn1_top1", "map@10"):
      if key in metrics:
        assert float(r[key]) == pytest.approx(metrics[key], abs=5e-7)
      else:
        assert r[key] == ""
  (row,), (want,) = _csv(os.path.join(out, "adaptive_retrieval.csv")), saved[
      "adaptive_retrieval"]
  for key, value in row.items():
    if isinstance(want[key], str):
      assert value == want[key]
    else:
      assert float(value) == pytest.approx(want[key], abs=5e-7), key
  (few,) = _csv(os.path.join(out, "fewshot.csv"))
  assert list(few)[:2] == ["size", "shots"]
  assert float(few["accuracy"]) == pytest.approx(0.123457, abs=1e-9)
  for plot in ("accuracy_vs_dim.png", "retrieval_vs_mflops.png"):
    assert os.path.getsize(os.path.join(out, plot)) > 1000


def test_a_float_column_is_formatted_one_way(tmp_path):
  """Speed-ups of 16 and 2048 (and 0.5) read as fixed point with 6 decimals, not '16.000000'
  beside '2048'."""
  results = _results()
  row = results["adaptive_retrieval"][0]
  results["adaptive_retrieval"] = [dict(row, name=str(v), mflops_speedup_vs_exact=v)
                                   for v in (16.0, 2048.0, 0.5)]
  out = str(tmp_path / "out")
  report.write(out, results)
  column = [r["mflops_speedup_vs_exact"] for r in _csv(os.path.join(out,
                                                                     "adaptive_retrieval.csv"))]
  assert column == ["16.000000", "2048.000000", "0.500000"]


def test_a_results_file_without_accuracies_plots_without_a_legend_warning(tmp_path):
  """Text evaluation (Spearman only) has no line to label: matplotlib's 'No artists with labels
  found to put in legend' is not printed."""
  import warnings  # pylint: disable=g-import-not-at-top
  results = {"dataset": "lee_similarity", "split": "test", "trained_sizes": [8],
             "sizes": {"8": {"spearman": 0.4}, "16": {"spearman": 0.5}}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    report.write(str(tmp_path), results)
  assert os.path.getsize(tmp_path / "accuracy_vs_dim.png") > 0
