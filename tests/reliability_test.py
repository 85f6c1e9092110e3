"""Reliability: preemption, checkpoint faults, workdir safety, input validation, non-finite loss.

Every fault is provoked for real: SIGTERM to a real training process, corrupted checkpoint
files on disk, bad configs and arrays.
"""

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mrl_jax import cli
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax.errors import ConfigError
from tests.conftest import REPO
from tests.conftest import checkpointer
from tests.conftest import digits_config
from tests.conftest import load_config
from tests.conftest import process_env
from tests.conftest import stop_at_step


def _final_state(workdir, step):
  with checkpointer(workdir) as ckpt:
    return ckpt.read(step)[0]


def _run_cli(fn):
  """cli.run(fn) -> (exit code, stdout, stderr), as train.py would end."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.run(fn)
  return code, out.getvalue(), err.getvalue()


# --- 1. preemption ----------------------------------------------------------------------------

def _train_cmd(data_dir, workdir, steps):
  return [sys.executable, "train.py", "--config=configs/digits_resnet_mrl.py:runlocal",
          f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
          f"--config.total_steps={steps}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1000", "--config.schedule.warmup_epochs=0.2"]


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resume_equals_uninterrupted(data_dir, tmp_path):
  """No race with the child's speed: it runs a constant learning rate for 10^6 steps (it can
  never finish first), gets SIGTERM once it logged step 8, saves at whatever step S it reached
  and exits 0; resumed to S + 4, it equals an uninterrupted run of S + 4 steps bitwise."""
  env = process_env()
  constant = ["--config.schedule.name=constant", "--config.schedule.warmup_epochs=0"]
  interrupted = str(tmp_path / "interrupted")
  proc = subprocess.Popen(_train_cmd(data_dir, interrupted, 10**6) + constant, cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 8/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  lines += out.splitlines(keepends=True)
  assert proc.returncode == 0, err[-3000:]
  saved = [l for l in lines if l.startswith("Received SIGTERM: saved a checkpoint at step")]
  assert saved and "Rerun the same command to resume." in saved[0]
  stop_step = int(saved[0].split("at step ")[1].split()[0])
  assert stop_step >= 8
  assert not os.path.exists(os.path.join(interrupted, "summary.json"))

  steps = stop_step + 4
  resumed = subprocess.run(_train_cmd(data_dir, interrupted, steps) + constant, cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from checkpoint step {stop_step}" in resumed.stdout
  straight = str(tmp_path / "straight")
  done = subprocess.run(_train_cmd(data_dir, straight, steps) + constant, cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  a, b = _final_state(straight, steps), _final_state(interrupted, steps)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise, data order included


# --- 2. checkpoint faults ---------------------------------------------------------------------

@pytest.mark.slow
def test_corrupted_latest_and_half_written_checkpoints(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = digits_config(data_dir, 12, checkpoint_every_steps=4, keep_checkpoints=3)
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["12", "4", "8"]
  # A save cut short: orbax's temporary directory with part of a checkpoint in it.
  shutil.copytree(os.path.join(ckpt_dir, "12"), os.path.join(ckpt_dir,
                                                             "16.orbax-checkpoint-tmp-17"))
  # Corrupt the latest complete checkpoint's array data on disk.
  for root, _, files in os.walk(os.path.join(ckpt_dir, "12", "state")):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.write(os.urandom(max(os.path.getsize(path), 16)))
  capsys.readouterr()
  config = digits_config(data_dir, 14, checkpoint_every_steps=4, keep_checkpoints=3)
  summary = train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert "incomplete checkpoint 16.orbax-checkpoint-tmp-17" in out
  assert "checkpoint step 12" in out and "corrupted" in out
  assert "Resuming from checkpoint step 8" in out
  assert summary["final_step"] == 14
  assert not any("tmp" in d for d in os.listdir(ckpt_dir))


def test_checkpoint_of_another_model_is_refused_naming_the_difference(data_dir, tmp_path):
  source = str(tmp_path / "source")
  train_lib.train_and_evaluate(digits_config(data_dir, 2, checkpoint_every_steps=2), source,
                               devices=jax.devices()[:1])
  target = str(tmp_path / "target")  # checkpoints only: the config.json check cannot catch it
  shutil.copytree(os.path.join(source, "checkpoints"), os.path.join(target, "checkpoints"))
  config = digits_config(data_dir, 4, checkpoint_every_steps=2, **{"mrl.nesting": "4,8,32"})
  with pytest.raises(ConfigError, match=r"checkpoint step 2 in .* was written for "
                     r"nesting=\[2, 4, 8, 16, 32\] but the config has nesting=\[4, 8, 32\]"):
    train_lib.train_and_evaluate(config, target, devices=jax.devices()[:1])
  assert os.listdir(target) == ["checkpoints"]  # the refused config was not recorded
  with pytest.raises(ConfigError, match=r"was written for head='mrl' but the config has "
                     r"head='mrle'"):
    train_lib.train_and_evaluate(digits_config(data_dir, 4, **{"mrl.head": "mrle"}), target,
                                 devices=jax.devices()[:1])


# --- 3. workdir safety ------------------------------------------------------------------------

def test_different_config_in_a_used_workdir_is_refused_unless_overwrite(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(digits_config(data_dir, 2, checkpoint_every_steps=2), workdir,
                               devices=jax.devices()[:1])
  before = {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)}
  saved_config = open(os.path.join(workdir, "config.json")).read()
  other = digits_config(data_dir, 2, **{"model.width": 8})
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(other, workdir,
                                                               devices=jax.devices()[:1]))
  assert code == 2
  assert err.strip() == (f"error: workdir {workdir} holds a run with model.width=4 but this "
                         "config has model.width=8, which changes the training trajectory; to "
                         "resume, keep model.width=4; to start a new run, keep this one and give"
                         f" another --workdir (add --config.init_from={workdir} to start from "
                         "its weights)")
  assert "delete" not in err
  assert open(os.path.join(workdir, "config.json")).read() == saved_config
  assert {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)} == before
  summary = train_lib.train_and_evaluate(other, workdir, overwrite=True,
                                         devices=jax.devices()[:1])
  assert summary["final_step"] == 2
  assert json.load(open(os.path.join(workdir, "config.json")))["model.width"] == 8


# --- 4. input validation before any compilation -------------------------------------------------

BAD_CONFIGS = [
    ({"model_name": "resnett"}, "unknown encoder 'resnett' (config.model_name); allowed: "
     "['bert', 'resnet', 'vit', 'two_towers']"),
    ({"input.dataset": "digitz"}, "unknown dataset 'digitz' (config.input.dataset)"),
    ({"optim.name": "adam"}, "unknown optimizer 'adam' (config.optim.name); allowed: "
     "['sgd', 'adamw', 'lars', 'lamb']"),
    ({"mrl.nesting": "2,4,64"}, "nesting size 64 exceeds feature_dim 32 (config.mrl.nesting); "
     "allowed: 1 <= m <= 32"),
    ({"mrl.nesting": "4,2,8"}, "nesting size 2 follows 4 (config.mrl.nesting); sizes must be "
     "sorted ascending"),
    ({"input.batch_size": 36}, "config.input.batch_size=36 is not divisible by the 8 batch "
     "shards (mesh data=8 x fsdp=1) x grad_accum_steps=1; allowed: multiples of 8"),
    ({"input.batch_size": 0}, "config.input.batch_size=0; allowed: a positive multiple of 8 "
     "(batch shards x grad_accum_steps)"),
    ({"mesh.data": 3}, "config.mesh={'data': 3, 'fsdp': 1} has 3 devices but 8 are available"),
    ({"input.data_dir": "EMPTY", "input.dataset": "cifar10", "num_classes": 10},
     "dataset 'cifar10' is not prepared in"),
    ({"num_classes": 12}, "config.num_classes=12 but dataset 'sklearn_digits' has 10 classes"),
    ({"input.dataset": "wiki_passages"}, "dataset 'wiki_passages' has no image feature 'image' "
     "(config.input.image_key); a classifier needs images"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS,
                         ids=[m.split(" ")[0] + "-" + list(o)[0] for o, m in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2_before_compiling(data_dir, tmp_path, monkeypatch,
                                                        overrides, message):
  overrides = {k: (str(tmp_path / "empty") if v == "EMPTY" else v) for k, v in overrides.items()}
  config = digits_config(data_dir, 2, **overrides)

  def must_not_compile(*a, **k):
    raise AssertionError("compiled before validating")

  monkeypatch.setattr(state_lib, "create_train_state", must_not_compile)
  monkeypatch.setattr(train_lib, "make_train_step", must_not_compile)
  workdir = str(tmp_path / "run")
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(config, workdir))
  assert code == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err
  assert "Traceback" not in err
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_vit_image_size_not_divisible_by_patch(data_dir, tmp_path):
  config = load_config("configs/vit_b16_imagenet21k.py:mrl,runlocal")
  config.model.image_size = config.input.image_size = 30
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(config, str(tmp_path)))
  assert code == 2 and ("config.model.image_size=30 is not divisible by the ViT patch size 16"
                        in err)
  del data_dir


def test_train_py_config_error_is_one_line_exit_2_traceback_only_with_verbose(tmp_path):
  args = [sys.executable, "train.py", "--config=configs/resnet50_imagenet.py:mrl",
          f"--workdir={tmp_path}", "--dry_run", "--config.mrl.nesting=8,4096"]
  quiet = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  loud = subprocess.run(args + ["--verbose"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert quiet.returncode == loud.returncode == 2
  assert quiet.stderr.strip() == ("error: nesting size 4096 exceeds feature_dim 2048 "
                                  "(config.mrl.nesting); allowed: 1 <= m <= 2048")
  assert "Traceback" in loud.stderr
  assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()
  assert not os.path.exists(tmp_path / "model_summary.json")


def test_override_typo_is_one_line_exit_2(tmp_path):
  out = subprocess.run(
      [sys.executable, "train.py", "--config=configs/digits_resnet_mrl.py",
       f"--workdir={tmp_path}", "--config.optim.nam=sgd"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip() == ("error: unknown config field in --config.optim.nam; did you mean "
                                "'name'?; only fields that exist in the config can be set")


# --- 5. non-finite loss -----------------------------------------------------------------------

def _exploding(data_dir, steps, policy):
  return digits_config(data_dir, steps, on_nonfinite=policy, checkpoint_every_steps=1,
                       **{"schedule.name": "constant", "schedule.base_lr": 1e30,
                          "schedule.warmup_epochs": 0.0})


@pytest.mark.parametrize("log_every, stop_at", [(1, None), (100, None), (100, 2)])
def test_nonfinite_loss_stops_with_step_and_per_size_losses_keeping_good_checkpoints(
    data_dir, tmp_path, monkeypatch, log_every, stop_at):
  """At lr 1e30 the first update makes step 2 non-finite. Each step's finiteness is checked one
  step late (the device never waits for the host) or at once on a log step, where the values
  are fetched anyway: with every step logged the run stops before it logs or saves step 2; with
  step 2 not a log step it stops after step 3 ran, having saved step 2's state (the update was
  not applied: its parameters are step 1's). A preemption noticed at step 2 still checks it
  before its final save."""
  workdir = str(tmp_path / "run")
  config = _exploding(data_dir, 6, "stop")
  config.log_every_steps = log_every
  if stop_at:
    stop_at_step(monkeypatch, stop_at)
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(
      config, workdir, devices=jax.devices()[:1]))
  assert code == cli.EXIT_NONFINITE, err
  assert "error: non-finite loss or gradient at step 2 " in err
  assert "loss@2=" in err and "loss@32=" in err and "the last good checkpoint is kept" in err
  with checkpointer(workdir) as ckpt:
    steps = ckpt.all_steps()
  assert steps == ([1] if log_every == 1 else [1, 2])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
  assert list(losses) == [1] and np.isfinite(losses[1])
  for step in steps:  # every checkpoint on disk holds finite parameters
    state = _final_state(workdir, step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_nonfinite_steps_are_skipped_when_asked(data_dir, tmp_path, capsys):
  summary = train_lib.train_and_evaluate(_exploding(data_dir, 5, "skip"), str(tmp_path / "run"),
                                         devices=jax.devices()[:1])
  assert summary["final_step"] == 5
  assert "continuing (config.on_nonfinite='skip')" in capsys.readouterr().out
  state = _final_state(str(tmp_path / "run"), 5)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# --- 6. failed checkpoint writes ----------------------------------------------------------------

# train.py with the rename that completes the save of step 4 failing as a full disk would
# (orbax's asynchronous finalize, the last step of every save).
_FAIL_STEP_4 = """
import errno, runpy, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def failing(self, *args, **kwargs):
  if self._final_path.name == "4":
    raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp_path))
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = failing
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def _check_failed_save(result, workdir, step, last, cause):
  assert result.returncode == cli.EXIT_CHECKPOINT, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  ckpts = os.path.join(workdir, "checkpoints")
  assert lines == [f"error: checkpoint step {step} could not be written to {ckpts}/{step}: "
                   f"{cause}; the last complete checkpoint is step {last} ({ckpts}/{last}); "
                   "free the space or fix the cause and rerun the same command to resume "
                   "from it"], result.stderr[-3000:]


@pytest.mark.slow
def test_failed_save_is_one_line_exit_4_and_the_rerun_resumes(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  env = process_env()
  cmd = _train_cmd(data_dir, workdir, 6)[2:] + ["--config.checkpoint_every_steps=2"]
  failed = subprocess.run([sys.executable, "-c", _FAIL_STEP_4, *cmd], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  _check_failed_save(failed, workdir, 4, 2, "No space left on device")
  with checkpointer(workdir) as ckpt:
    assert ckpt.complete_steps() == [2]
  resumed = subprocess.run(_train_cmd(data_dir, workdir, 6), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from checkpoint step 2" in resumed.stdout
  assert "Traceback" not in resumed.stderr + failed.stderr


def test_a_failed_last_save_is_reported_before_the_final_eval(data_dir, tmp_path, monkeypatch):
  """The last step's save (asynchronous, like every save) fails: the run waits for it after
  the loop and stops there, exit 4, before the final eval (minutes at ImageNet scale) runs."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def failing(self, *args, **kwargs):
    if self._final_path.name == "2":  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp_path))  # pylint: disable=protected-access
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", failing)
  evals = []
  monkeypatch.setattr(train_lib, "_log_eval", lambda *args: evals.append(args))
  workdir = str(tmp_path / "run")
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(
      digits_config(data_dir, 2), workdir, devices=jax.devices()[:1]))
  assert code == cli.EXIT_CHECKPOINT, err
  assert err.startswith("error: checkpoint step 2 could not be written") and not evals, err


@pytest.mark.slow
def test_full_file_system_during_a_save(data_dir, tmp_path):
  """checkpoints/ on a real tmpfs with room for one checkpoint and a half: the second save
  fails with ENOSPC from the kernel; skipped where mounting is not permitted."""
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"
  ckpts.mkdir(parents=True)
  env = process_env()
  probe = tmp_path / "probe"  # the size of one checkpoint of this config (1 device, in-process)
  train_lib.train_and_evaluate(
      digits_config(data_dir, 2, checkpoint_every_steps=1000, **{"schedule.warmup_epochs": 0.2}),
      str(probe), devices=jax.devices()[:1])
  one = sum(f.stat().st_size for f in (probe / "checkpoints" / "2").rglob("*") if f.is_file())
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.5) + 65536}",
                            "tmpfs", str(ckpts)], capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    cmd = _train_cmd(data_dir, str(workdir), 6) + ["--config.checkpoint_every_steps=2",
                                                   "--config.keep_checkpoints=3"]
    failed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    _check_failed_save(failed, str(workdir), 4, 2, "No space left on device")
    resumed = subprocess.run(cmd[:-1] + ["--config.keep_checkpoints=1"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
    # keep 1: each save replaces the last, but needs room for both while it is written
    assert "Resuming from checkpoint step 2" in resumed.stdout, resumed.stderr[-3000:]
  finally:
    subprocess.run(["umount", str(ckpts)], check=False)


# --- 7. resuming on another topology ------------------------------------------------------------

def test_resume_across_device_count_and_sharding_strategy(data_dir, tmp_path):
  """8 devices replicated -> 4 devices FSDP (2 x 2) -> 1 device: the final parameters equal an
  uninterrupted 1-device run's within atol 1e-4 / rtol 1e-3. The global batch is the same, but
  its gradient and BatchNorm statistics are reduced over 8, 4 or 1 devices in different orders
  (float32), and 6 steps at lr 0.1 with momentum amplify those last bits (measured: up to
  1.6e-5 absolute, on a BatchNorm scale; with a schedule that depended on each run's length
  the same chain differed by 3.4e-3)."""
  # A constant learning rate: the schedule must not depend on each run's total_steps.
  constant = {"schedule.name": "constant", "schedule.warmup_epochs": 0.0}
  straight = str(tmp_path / "straight")
  train_lib.train_and_evaluate(digits_config(data_dir, 6, **constant), straight,
                               devices=jax.devices()[:1])
  moved = str(tmp_path / "moved")
  train_lib.train_and_evaluate(digits_config(data_dir, 2, **{"mesh.data": 8}, **constant),
                               moved, devices=jax.devices()[:8])
  fsdp = {"mesh.data": 2, "mesh.fsdp": 2, "sharding.strategy": "fsdp",
          "sharding.fsdp_min_size_mb": 0.0}
  train_lib.train_and_evaluate(digits_config(data_dir, 4, **fsdp, **constant), moved,
                               devices=jax.devices()[:4])
  summary = train_lib.train_and_evaluate(digits_config(data_dir, 6, **constant), moved,
                                         devices=jax.devices()[:1])
  assert summary["final_step"] == 6
  a, b = _final_state(straight, 6), _final_state(moved, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)


def test_a_different_global_batch_is_refused_without_suggesting_deletion(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(digits_config(data_dir, 1), workdir, devices=jax.devices()[:1])
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(
      digits_config(data_dir, 2, **{"input.batch_size": 16}), workdir,
      devices=jax.devices()[:1]))
  assert code == 2 and "input.batch_size" in err and "changes the training trajectory" in err
  assert "another --workdir" in err and "delete" not in err
