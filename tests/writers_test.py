"""Metric writers on the path layer: TensorBoard reads our event files; metrics.jsonl resumes."""

import json
import os

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from mrl_jax import paths
from mrl_jax import writers


def test_tensorboard_reads_scalars_and_hparams_from_our_event_file(tmp_path):
  writer = writers.EventFileWriter(str(tmp_path))
  writer.write_hparams({"optim.name": "sgd", "schedule.base_lr": 0.1})
  writer.write_scalars(1, {"train/loss": 2.5, "train/top1@8": np.float32(0.25)})
  writer.write_scalars(7, {"train/loss": 1.25})
  writer.close()
  (name,) = os.listdir(tmp_path)
  assert name.startswith("events.out.tfevents.")
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  acc.Reload()
  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
          for e in acc.Tensors("train/loss")]
  assert loss == [(1, 2.5), (7, 1.25)]
  assert acc.Tensors("train/top1@8")[0].step == 1
  assert "_hparams_/session_start_info" in acc.Tags()["tensors"]


def _steps(path):
  return [json.loads(l)["step"] for l in open(path)]


def test_jsonl_resume_drops_the_records_after_the_resumed_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  first = writers.JsonlWriter(path)
  for step in range(1, 11):
    first.write_scalars(step, {"train/loss": float(step)})
  first.close()
  assert _steps(path) == list(range(1, 11))
  resumed = writers.JsonlWriter(path, resume_step=6)  # e.g. the newest checkpoint was corrupt
  assert _steps(path) == list(range(1, 7))
  resumed.write_scalars(7, {"train/loss": 7.0})
  resumed.flush()
  assert _steps(path) == list(range(1, 8))
  assert json.loads(open(path).read().splitlines()[-1]) == {"step": 7, "train/loss": 7.0}
  writers.JsonlWriter(path)  # a run from scratch starts a new file
  assert open(path).read() == ""


def test_remote_paths_pass_through_unchanged_and_local_ones_become_absolute():
  assert str(paths.path("gs://bucket/run")) == "gs://bucket/run"
  assert str(paths.join("gs://bucket/run", "eval", "x.json")) == "gs://bucket/run/eval/x.json"
  assert paths.is_remote("s3://b/x") and not paths.is_remote("runs/x")
  assert str(paths.path("runs/x")) == os.path.join(os.getcwd(), "runs", "x")


def test_local_write_is_atomic_and_append_appends(tmp_path):
  target = tmp_path / "a" / "b.json"
  paths.write_json(target, {"x": 1})
  assert json.loads(target.read_text()) == {"x": 1}
  assert sorted(os.listdir(target.parent)) == ["b.json"]  # no temporary file left behind
  paths.append_text(tmp_path / "log.txt", "one\n")
  paths.append_text(tmp_path / "log.txt", "two\n")
  assert (tmp_path / "log.txt").read_text() == "one\ntwo\n"
