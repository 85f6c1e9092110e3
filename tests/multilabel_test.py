"""The built-in multi-label (JFT-style) job end to end: sigmoid Matryoshka loss, 1 vs 8 devices,
then eval.py's multi-label metrics."""

import json
import os

import jax
import numpy as np
import pytest

from mrl_jax import train_lib
from mrl_jax.evaluation import evaluate
from tests.conftest import load_config


def _config(data_dir, steps):
  config = load_config("configs/mnist_pairs_multilabel.py:runlocal")
  config.input.data_dir = data_dir
  config.update(total_steps=steps, log_every_steps=1, checkpoint_every_steps=100)
  return config


def _first_losses(workdir):
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    if record["step"] == 1 and "train/loss" in record:
      return record


@pytest.mark.slow
def test_multilabel_job_on_1_and_8_devices_then_eval(data_dir, tmp_path):
  one, many = str(tmp_path / "one"), str(tmp_path / "many")
  train_lib.train_and_evaluate(_config(data_dir, 4), one, devices=jax.devices()[:1])
  summary = train_lib.train_and_evaluate(_config(data_dir, 4), many, devices=jax.devices()[:8])
  a, b = _first_losses(one), _first_losses(many)
  sizes = [2, 4, 8, 16, 32]
  for key in ["train/loss"] + [f"train/loss@{m}" for m in sizes]:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5)
  # Heads start at log(p / (1 - p)) for p = 0.175: the first sigmoid loss per size is near the
  # entropy of that prior, 10 * H(0.175) = 4.64 nats, plus what random features add.
  assert 4.0 < a["train/loss@2"] < 8.0 and "train/prec1@2" in a
  assert set(summary["eval"]["32"]) == {"prec1"}

  config = _config(data_dir, 4)
  config.eval.update(extra_sizes=(3,), knn_k=(1, 5), retrieval_k=(10,))
  results = evaluate.evaluate_checkpoint(config, many, devices=jax.devices()[:8])["mnist_pairs"]
  assert results["multi_label"] and results["num_queries"] == 1000
  assert results["num_unlabelled_excluded"] == 0
  for m in ("2", "32"):
    metrics = results["sizes"][m]
    assert {"prec@1", "class_map", "knn1_top1", "knn5_top1", "map@10"} <= set(metrics)
    assert metrics["prec@1"] == pytest.approx(summary["eval"][m]["prec1"], abs=1e-6)
  assert "prec@1" not in results["sizes"]["3"]  # interpolated size: no head
  assert results["adaptive_retrieval"] and not results["adaptive_classification"]
