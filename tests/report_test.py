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


def _image_text_results(shift=0.0):
  sizes = {str(m): {"zeroshot_top1": 0.1 * i + shift, "recall@1_i2t": 0.05 * i,
                    "recall@1_t2i": 0.04 * i, "recall@5_t2i": 0.3, "cosine_gap": 0.2}
           for i, m in enumerate((8, 16, 32), 1)}
  return {"dataset": "mnist_captions", "trained_sizes": [8, 16, 32], "sizes": sizes}


def test_each_familys_metrics_are_drawn_per_size_beside_a_baseline(tmp_path):
  """Image-text results draw zero-shot and Recall@k both ways (x 100); a baseline run's
  curves are drawn beside them; classification results still draw linear and 1-NN only."""
  drawn = report.plot_accuracy_vs_dim(str(tmp_path / "a.png"), _image_text_results(),
                                      {"standard": _image_text_results(shift=0.5)})
  got = {label: (xs, [round(y, 9) for y in ys]) for label, xs, ys in drawn}
  assert got == {
      "zero-shot top-1": ([8, 16, 32], [10.0, 20.0, 30.0]),
      "zero-shot top-1 (standard)": ([8, 16, 32], [60.0, 70.0, 80.0]),
      "image->text R@1": ([8, 16, 32], [5.0, 10.0, 15.0]),
      "image->text R@1 (standard)": ([8, 16, 32], [5.0, 10.0, 15.0]),
      "text->image R@1": ([8, 16, 32], [4.0, 8.0, 12.0]),
      "text->image R@1 (standard)": ([8, 16, 32], [4.0, 8.0, 12.0]),
      "text->image R@5": ([8, 16, 32], [30.0, 30.0, 30.0]),
      "text->image R@5 (standard)": ([8, 16, 32], [30.0, 30.0, 30.0])}
  drawn = report.plot_accuracy_vs_dim(str(tmp_path / "b.png"), _results())
  assert [label for label, _, _ in drawn] == ["linear (head) top-1", "1-NN top-1"]
  assert drawn[0][1] == [2, 4, 8]  # no head at the interpolated size 3
  text = {"dataset": "lee", "sizes": {"8": {"spearman": 0.25, "ndcg@10": 0.5}}}
  assert [(l, ys) for l, _, ys in report.plot_accuracy_vs_dim(str(tmp_path / "c.png"), text)
          ] == [("Spearman", [25.0]), ("nDCG@10", [50.0])]


def test_the_comparison_command(tmp_path, capsys):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(_image_text_results()))
  b.write_text(json.dumps(_image_text_results(shift=0.5)))
  out = tmp_path / "fig.png"
  assert report.main([f"--results={a}", f"--baseline=standard:{b}", f"--out={out}"]) == 0
  assert "8 curves" in capsys.readouterr().out and out.read_bytes().startswith(b"\x89PNG")
  assert report.main([f"--results={a}", f"--baseline={b}", f"--out={out}"]) == 2
  assert "--baseline=" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="no results file"):
    report.main([f"--results={tmp_path / 'missing.json'}", f"--out={out}"])


def test_a_funnel_that_keeps_fewer_than_10_is_plotted_at_its_largest_map(tmp_path):
  """A funnel whose last stage keeps K = 8 has mAP@1 and @5, not @10: the plot and eval.py's
  lines use the largest mAP@k every row has (they raised KeyError 'map@10')."""
  rows = [dict(_results()["adaptive_retrieval"][0])]
  rows.append({**rows[0], "name": "8 -> 32 (K=8)", "kind": "adaptive"})
  del rows[1]["map@10"]
  for r in rows:
    r.update({"map@1": 0.5, "map@5": 0.25})
  assert report.map_key(rows) == "map@5"
  assert report.map_key(rows[:1]) == "map@10"
  report.plot_retrieval_vs_mflops(str(tmp_path / "r.png"), rows)
  assert os.path.getsize(tmp_path / "r.png") > 1000
