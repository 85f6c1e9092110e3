"""End-to-end training on the built-in data: loss goes down, checkpoints, resume, meshes."""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from mrl_jax import train_lib
from tests.conftest import checkpointer
from tests.conftest import digits_config


def _config(data_dir, steps, arg="runlocal", **overrides):
  return digits_config(data_dir, steps, arg, **{"checkpoint_every_steps": 10, **overrides})


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_epochs_become_steps_from_the_dataset_size(data_dir):
  """steps_per_epoch = floor(train examples / global batch), at least 1, and *_epochs times it:
  the 1,438 digits at batch 64 are 22 steps an epoch, so 40 epochs are 880 steps; a batch larger
  than the split is still 1 step an epoch; total_steps, when set, wins."""
  from mrl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, None, **{"input.batch_size": 64, "total_epochs": 40.0})
  source = pipeline.open_source(config.input)
  assert train_lib.run_info(config, source) == train_lib.RunInfo(1438, 22, 880)
  config.input.batch_size = 2048
  assert train_lib.run_info(config, source) == train_lib.RunInfo(1438, 1, 40)
  config.total_epochs = 0.01  # rounds to 0 steps: a run is at least 1 step
  assert train_lib.run_info(config, source).total_steps == 1
  config.total_steps = 7
  assert train_lib.run_info(config, source).total_steps == 7


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_single_process_run_at_the_next_step(sig):
  """In one process the train loop's stop check reports a SIGTERM / SIGINT at the very next
  step, log step or not (the end-to-end preemption tests run train.py in a subprocess, which
  coverage does not follow); the previous handlers are back afterwards."""
  import signal  # pylint: disable=g-import-not-at-top
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with train_lib._StopSignal() as stop:  # pylint: disable=protected-access
    assert stop.stop_reason(3, log_step=False) is None
    os.kill(os.getpid(), getattr(signal, sig))
    time.sleep(0.01)  # the handler runs between bytecodes of this thread
    assert stop.stop_reason(4, log_step=False) == sig
    assert stop.stop_reason(5, log_step=True) == sig
  assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_training_reduces_loss_checkpoints_and_resumes(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = _config(data_dir, 40, **{"input.batch_size": 64, "model.width": 8,
                                    "schedule.base_lr": 0.2, "schedule.warmup_steps": 2,
                                    "keep_checkpoints": 2})
  summary = train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  losses = _train_losses(workdir)
  assert sorted(losses) == list(range(1, 41))
  # Sum over 6 sizes of the CE starts at ~6 ln(10) = 13.8; sizes 2 and 4 stay hard.
  assert np.mean([losses[s] for s in range(36, 41)]) < 0.85 * np.mean(
      [losses[s] for s in range(1, 6)])
  assert _checkpoint_steps(workdir) == [30, 40]  # every 10, keep the last 2
  on_disk = json.loads(open(os.path.join(workdir, "summary.json")).read())
  assert on_disk["final_step"] == 40 and on_disk["num_devices"] == 1
  assert on_disk["num_processes"] == 1 and on_disk["images_per_second"] > 0
  assert set(on_disk["eval"]) == {"2", "4", "8", "16", "32", "64"}
  assert all(0.0 <= v["top1"] <= 1.0 for v in on_disk["eval"].values())
  assert on_disk["eval"]["64"]["top1"] > 0.3  # 10 classes: chance is 0.1
  assert summary["final_step"] == 40
  saved_config = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert saved_config["total_steps"] == 40 and saved_config["mrl.nesting"] == "halving:2"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # TensorBoard's hparams: the run's config, written once, when the run starts.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  events.Reload()
  hparams = plugin_data_pb2.HParamsPluginData.FromString(events.SummaryMetadata(
      "_hparams_/session_start_info").plugin_data.content).session_start_info.hparams
  assert hparams["schedule.base_lr"].number_value == 0.2
  assert hparams["optim.name"].string_value == "sgd"
  table = os.path.join(workdir, "parameters.txt")  # written once, when a run starts
  assert "| encoder/blocks/0/conv1/bn/scale" in open(table).read()
  written = os.path.getmtime(table)
  capsys.readouterr()

  # Same workdir, more steps: resumes from step 40 instead of starting again.
  config = _config(data_dir, 46, **{"input.batch_size": 64, "model.width": 8,
                                    "schedule.base_lr": 0.2, "schedule.warmup_steps": 2,
                                    "keep_checkpoints": 2})
  summary = train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert "Resuming from checkpoint step 40" in capsys.readouterr().out
  assert summary["final_step"] == 46
  steps = sorted(_train_losses(workdir))
  assert steps == list(range(1, 47))  # 41..46 appended, nothing re-run
  assert os.path.getmtime(table) == written
  assert _checkpoint_steps(workdir) == [40, 46]  # the last step is saved off the interval too
  with checkpointer(workdir) as ckpt:
    _, meta = ckpt.read(46)
  assert meta["step"] == meta["data_position"] == 46 and meta["global_batch"] == 64


MESHES = [
    ({"data": 8, "fsdp": 1}, "replicate"),
    ({"data": 4, "fsdp": 2}, "fsdp"),
    ({"data": 2, "fsdp": 4}, "fsdp"),
]


@pytest.fixture(scope="module")
def one_device_losses(data_dir, tmp_path_factory):
  config = _config(data_dir, 6, **{"input.batch_size": 32, "checkpoint_every_steps": 100})
  workdir = str(tmp_path_factory.mktemp("one_device"))
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return _train_losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("mesh, strategy", MESHES, ids=["data8", "data4xfsdp2", "data2xfsdp4"])
def test_loss_curve_on_8_devices_equals_1_device(data_dir, tmp_path, one_device_losses, mesh,
                                                 strategy):
  config = _config(data_dir, 6, **{"input.batch_size": 32, "checkpoint_every_steps": 100,
                                   "sharding.strategy": strategy,
                                   "sharding.fsdp_min_size_mb": 0.0})
  config.mesh.update(mesh)
  workdir = str(tmp_path / "many")
  train_lib.train_and_evaluate(config, workdir)
  ref, got = one_device_losses, _train_losses(workdir)
  assert sorted(ref) == sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                             rtol=2e-4)


@pytest.mark.slow
def test_periodic_eval_and_metrics_after_a_resume_from_an_older_checkpoint(data_dir, tmp_path):
  """eval_every_steps=2 logs val/ records at steps 2 and 4 (and the final eval at 6). Resuming
  from step 2 after the later checkpoints are lost (e.g. a crash before they reached storage)
  re-runs steps 3-6: metrics.jsonl then holds every step once, with the values an
  uninterrupted run logs (same device, same data order)."""
  workdir = str(tmp_path / "run")
  config = _config(data_dir, 6, checkpoint_every_steps=2, eval_every_steps=2,
                   keep_checkpoints=5)
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  def records():
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]

  first = records()
  train_steps = [r["step"] for r in first if "train/loss" in r]
  eval_steps = [r["step"] for r in first if "val/top1@2" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6] and eval_steps == [2, 4, 6]
  for step in (4, 6):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  second = records()
  assert [r["step"] for r in second if "train/loss" in r] == train_steps
  assert [r["step"] for r in second if "val/top1@2" in r] == eval_steps
  drop = ("train/images_per_second", "train/step_time", "train/input_wait")  # wall-clock
  strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
  assert strip(second) == strip(first)


@pytest.mark.slow
def test_a_slow_input_pipeline_is_reported_and_warned_once(data_dir, tmp_path, capsys,
                                                           monkeypatch):
  """Each batch reaches the loop 0.3 s late: the loop's measured wait share (train line,
  metrics.jsonl, summary.json) is above the 20 % limit and the input-bound warning prints
  exactly once."""
  global_batches = train_lib.pipeline.global_batches

  def slow_batches(*args, **kwargs):
    for batch in global_batches(*args, **kwargs):
      time.sleep(0.3)
      yield batch

  monkeypatch.setattr(train_lib.pipeline, "global_batches", slow_batches)
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(_config(data_dir, 4, log_every_steps=2), workdir,
                                         devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert out.count("WARNING: input-bound") == 1 and "input-wait" in out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    waits = [r["train/input_wait"] for r in map(json.loads, f) if "train/input_wait" in r]
  assert len(waits) >= 2 and min(waits[1:]) > 0.2  # step 1 includes compiling
  assert summary["input_wait"] > 0.2
