"""End-to-end training on the built-in data: loss goes down, checkpoints, resume, meshes."""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from mrl_jax import train_lib
from mrl_jax import writers
from tests.conftest import checkpointer
from tests.conftest import digits_config
from tests.conftest import stop_at_step


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
def test_training_reduces_loss_checkpoints_and_resumes(data_dir, tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path / "run")
  printed = []  # (step, ETA in seconds, when printing began, when it ended) of each train line
  print_line = train_lib._print_train_line  # pylint: disable=protected-access

  def timed_print(step, total, values, nesting, eta_seconds):
    began = time.perf_counter()
    print_line(step, total, values, nesting, eta_seconds)
    printed.append((step, eta_seconds, began, time.perf_counter()))

  monkeypatch.setattr(train_lib, "_print_train_line", timed_print)
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
  # Throughput leaves out the compiling first step: examples over the seconds of steps 2..40,
  # each logged (log_every_steps 1) with its own step time.
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  step_times = [r["train/step_time"] for r in records if "train/step_time" in r and r["step"] > 1]
  assert len(step_times) == 39
  np.testing.assert_allclose(on_disk["images_per_second"], 39 * 64 / sum(step_times), rtol=1e-6)
  logged = [(r["train/images_per_second"], r["train/step_time"]) for r in records
            if "train/step_time" in r]
  assert len(logged) == 40
  np.testing.assert_allclose([rate * seconds for rate, seconds in logged], 64, rtol=1e-6)
  _check_eta(printed, first=1, last=40)
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
  printed.clear()

  # Same workdir, more steps: resumes from step 40 instead of starting again.
  config = _config(data_dir, 46, **{"input.batch_size": 64, "model.width": 8,
                                    "schedule.base_lr": 0.2, "schedule.warmup_steps": 2,
                                    "keep_checkpoints": 2})
  summary = train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert "Resuming from checkpoint step 40" in capsys.readouterr().out
  assert summary["final_step"] == 46
  _check_eta(printed, first=41, last=46)  # counted from the resumed run's own first step
  steps = sorted(_train_losses(workdir))
  assert steps == list(range(1, 47))  # 41..46 appended, nothing re-run
  assert os.path.getmtime(table) == written
  assert _checkpoint_steps(workdir) == [40, 46]  # the last step is saved off the interval too
  with checkpointer(workdir) as ckpt:
    _, meta = ckpt.read(46)
  assert meta["step"] == meta["data_position"] == 46 and meta["global_batch"] == 64


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [2, 3, None])
def test_a_stop_saves_the_step_it_stops_at_once(data_dir, tmp_path, monkeypatch, stop_at):
  """A SIGTERM noticed at step 3 saves step 3 (off the checkpoint interval of 2). Noticed at
  step 2, whose interval save has just begun (asynchronously), the stop waits for that save and
  does not write step 2 again (orbax refuses a step that exists). The run returns as preempted.
  Stopped or not, its metrics are on disk when it returns, though they are written on a thread
  (here the last one 2.5 s late)."""
  if stop_at:
    stop_at_step(monkeypatch, stop_at)
  last = stop_at or 6
  write = writers.JsonlWriter.write_scalars

  def late_write(self, step, scalars):
    if step == last and (stop_at or "val/top1@2" in scalars):
      time.sleep(2.5)
    write(self, step, scalars)

  monkeypatch.setattr(writers.JsonlWriter, "write_scalars", late_write)
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(_config(data_dir, 6, checkpoint_every_steps=2),
                                         workdir, devices=jax.devices()[:1])
  if stop_at:
    assert summary == {"final_step": stop_at, "preempted": True}
  else:
    assert summary["final_step"] == 6 and "preempted" not in summary
  with checkpointer(workdir) as ckpt:
    assert ckpt.all_steps() == (list(range(2, stop_at + 1)) if stop_at else [2, 4, 6])
    assert ckpt.read(last)[1]["step"] == last
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, last + 1))
  assert [r["step"] for r in records if "val/top1@2" in r] == ([] if stop_at else [6])


def test_the_train_line_shows_the_smallest_and_largest_size_and_the_eta(capsys):
  """A log step's line: loss, the head accuracy at the smallest and largest size (once when
  there is one size), lr, throughput (examples, not images, for text), the input-wait share and
  the ETA in h/m/s; an eval's line lists its accuracies by size."""
  values = {"loss": 1.23456, "top1@8": 0.5, "top1@16": 0.6, "top1@32": 0.75, "lr": 0.1,
            "images_per_second": 1234.4, "input_wait": 0.123}
  train_lib._print_train_line(5, 10, values, (8, 16, 32), 65.4)  # pylint: disable=protected-access
  train_lib._print_train_line(5, 10, {**values, "top1@2048": 0.25}, (2048,), None)  # pylint: disable=protected-access
  text = {"loss": 2.0, "acc@64": 0.9, "mlm_acc@64": 0.3, "lr": 1e-4, "images_per_second": 99.6,
          "input_wait": 0.0}
  train_lib._print_train_line(7, 9, text, (64,), 3725)  # pylint: disable=protected-access
  written = []

  class Recorder:
    def write_scalars(self, step, scalars):
      written.append((step, scalars))

  train_lib._log_eval(4, {"top1@16": 0.5, "top1@8": 0.25, "top5@8": 0.75}, Recorder())  # pylint: disable=protected-access
  assert capsys.readouterr().out.splitlines() == [
      "step 5/10 loss=1.2346 top1@8=0.500 top1@32=0.750 lr=0.1 1234 img/s input-wait 12% eta 1m05s",
      "step 5/10 loss=1.2346 top1@2048=0.250 lr=0.1 1234 img/s input-wait 12% eta --",
      "step 7/9 loss=2.0000 mlm_acc@64=0.300 lr=0.0001 100 ex/s input-wait 0% eta 1h02m",
      "eval step 4: top1@8=0.2500 top1@16=0.5000"]
  assert written == [(4, {"val/top1@16": 0.5, "val/top1@8": 0.25, "val/top5@8": 0.75})]
  # Image-text sets keep their dataset (ALIGN evaluates zero-shot on four); none: no line.
  dual = {"imagenet_v2/zeroshot_top1@8": 0.5, "imagenet2012/zeroshot_top1@8": 0.25,
          "coco/recall@1_t2i@16": 0.125, "coco/recall@5_t2i@16": 0.5}
  train_lib._log_eval(6, dual, Recorder())  # pylint: disable=protected-access
  train_lib._log_eval(8, {}, Recorder())  # pylint: disable=protected-access
  assert capsys.readouterr().out.splitlines() == [
      "eval step 6: imagenet2012/zeroshot_top1@8=0.2500 imagenet_v2/zeroshot_top1@8=0.5000 "
      "coco/recall@1_t2i@16=0.1250"]
  assert written[1] == (6, {f"val/{k}": v for k, v in dual.items()})
  assert [train_lib.format_duration(s) for s in (0, 9.4, 59.5, 60, 3599, 3600, 86399)] == [
      "0s", "9s", "1m00s", "1m00s", "59m59s", "1h00m", "23h59m"]


def _check_eta(printed, first, last):
  """The ETA printed at step s is the wall time per step since the first (compiling) step
  ended, times the steps left: (now - first_done) / (s - first) * (last - s), with now between
  the end of the previous line and the start of this one, first_done just before line `first`."""
  assert [p[0] for p in printed] == list(range(first, last + 1)) and printed[0][1] is None
  first_done = printed[0][2]
  for (_, _, _, previous_end), (step, eta, began, _) in zip(printed, printed[1:-1]):
    since_first = eta * (step - first) / (last - step)
    assert previous_end - first_done <= since_first <= began - first_done + 0.02, step
  assert printed[-1][1] == 0.0


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


def test_input_warnings_fire_once_each_above_the_threshold_naming_the_step(capsys):
  """The input watch the loop calls at log steps (and once more after the final eval): a wait
  share exactly at the threshold does not warn, above it warns once; the first skipped image
  warns once, at the step it is first seen, whatever comes later."""
  watch = train_lib._InputWatch()  # pylint: disable=protected-access
  share = train_lib.INPUT_WAIT_WARN
  for step, wait, skipped in [(2, share, 0), (3, 0.1, 0), (4, 0.1, 2), (5, 0.9, 3), (6, 0.9, 4)]:
    watch.check(step, wait, skipped)
  watch.check_skipped(7, 5)
  out = capsys.readouterr().out.splitlines()
  want = ["WARNING: skipped 2 unreadable image(s) (corrupt files) by step 4, counted in ",
          "WARNING: input-bound: the train loop waited for input 90% of the time before step 5 "
          "(warning above 20%)"]
  assert [l[:len(w)] for l, w in zip(out, want)] == want and len(out) == 2, out


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


def _late_batches(monkeypatch, delay):
  """The train loop's batches, the i-th `delay(i)` seconds late; returns the seconds each next()
  took, timed in the generator. The loop's stream is the run's first (evals make their own)."""
  global_batches = train_lib.pipeline.global_batches
  seconds_in_next, streams = [], []

  def late(batches):
    asked = time.perf_counter()
    for i, batch in enumerate(batches):
      time.sleep(delay(i))
      seconds_in_next.append(time.perf_counter() - asked)
      yield batch
      asked = time.perf_counter()

  def late_batches(*args, **kwargs):
    streams.append(global_batches(*args, **kwargs))
    return late(streams[0]) if len(streams) == 1 else streams[-1]

  monkeypatch.setattr(train_lib.pipeline, "global_batches", late_batches)
  return seconds_in_next


@pytest.mark.slow
def test_a_slow_input_pipeline_is_reported_and_warned_once(data_dir, tmp_path, capsys,
                                                           monkeypatch):
  """Each batch after the first reaches the loop 0.3 s late: the loop's measured wait share
  (train line, metrics.jsonl, summary.json) is above the 20 % limit and the input-bound warning
  prints once, at step 2. The first step waits for the pipeline's start-up (here 3 s) and its
  wall time is mostly compiling: it is left out of the warning. Each logged share is the time
  the loop spent in next() since the last log (timed in the generator) over that interval's
  wall time (its step time x steps); the eval at step 2 starts the next interval afresh."""
  seconds_in_next = _late_batches(monkeypatch, lambda i: 3.0 if i == 0 else 0.3)
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(
      _config(data_dir, 4, log_every_steps=2, eval_every_steps=2), workdir,
      devices=jax.devices()[:1])
  out = capsys.readouterr().out
  warned = [l for l in out.splitlines() if "WARNING: input-bound" in l]
  assert len(warned) == 1 and "of the time before step 2 (" in warned[0], warned
  assert "input-wait" in out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "train/input_wait" in r]
  assert [r["step"] for r in logged] == [1, 2, 4]  # the first step, every 2nd, the last
  waits = [r["train/input_wait"] for r in logged]
  assert min(waits[1:]) > 0.2  # step 1 includes compiling
  expected, last = [], 0
  for r in logged:
    steps = r["step"] - last
    expected.append(sum(seconds_in_next[last:r["step"]]) / (r["train/step_time"] * steps))
    last = r["step"]
  # The loop's timed interval holds the generator's: they differ by scheduling, a few ms.
  np.testing.assert_allclose(waits, expected, atol=0.01)
  assert summary["input_wait"] == waits[-1]
