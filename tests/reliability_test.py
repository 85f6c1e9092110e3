"""Reliability: preemption, checkpoint faults, workdir safety, input validation, non-finite loss.

Every fault is provoked for real: SIGTERM to a real training process, corrupted checkpoint
files on disk, bad configs and arrays.
"""

import contextlib
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

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import cli
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax.errors import ConfigError
from tests.conftest import REPO
from tests.conftest import digits_config
from tests.conftest import load_config


def _final_state(workdir, step):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=9)
  try:
    state, _ = ckpt.read(step)
  finally:
    ckpt.close()
  return state


def _run_cli(fn):
  """cli.run(fn) -> (exit code, stdout, stderr), as train.py would end."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.run(fn)
  return code, out.getvalue(), err.getvalue()


# --- 1. preemption ----------------------------------------------------------------------------

def _subprocess_env(tmp_path):
  """1 CPU device and a compilation cache shared by the test's training processes."""
  env = dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return env


def _train_cmd(data_dir, workdir, steps):
  return [sys.executable, "train.py", "--config=configs/digits_resnet_mrl.py:runlocal",
          f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
          f"--config.total_steps={steps}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1000", "--config.schedule.warmup_epochs=0.2"]


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resume_equals_uninterrupted(data_dir, tmp_path):
  steps = 30
  straight = str(tmp_path / "straight")
  env = _subprocess_env(tmp_path)
  done = subprocess.run(_train_cmd(data_dir, straight, steps), cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False, env=env)
  assert done.returncode == 0, done.stderr[-3000:]

  interrupted = str(tmp_path / "interrupted")
  proc = subprocess.Popen(_train_cmd(data_dir, interrupted, steps), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stdout:  # SIGTERM once training is under way (cosine schedule mid-run)
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
  assert 8 <= stop_step < steps
  assert not os.path.exists(os.path.join(interrupted, "summary.json"))

  resumed = subprocess.run(_train_cmd(data_dir, interrupted, steps), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from checkpoint step {stop_step}" in resumed.stdout
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
                         "config has model.width=8; use another --workdir, or pass --overwrite "
                         "to delete that run and start from scratch")
  assert open(os.path.join(workdir, "config.json")).read() == saved_config
  assert {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)} == before
  summary = train_lib.train_and_evaluate(other, workdir, overwrite=True,
                                         devices=jax.devices()[:1])
  assert summary["final_step"] == 2
  assert json.load(open(os.path.join(workdir, "config.json")))["model.width"] == 8


# --- 4. input validation before any compilation -------------------------------------------------

BAD_CONFIGS = [
    ({"model_name": "resnett"}, "unknown encoder 'resnett' (config.model_name); allowed: "
     "['resnet', 'vit']"),
    ({"input.dataset": "digitz"}, "unknown dataset 'digitz' (config.input.dataset)"),
    ({"optim.name": "adam"}, "unknown optimizer 'adam' (config.optim.name); allowed: "
     "['sgd', 'adamw', 'lars']"),
    ({"mrl.nesting": "2,4,64"}, "nesting size 64 exceeds feature_dim 32 (config.mrl.nesting); "
     "allowed: 1 <= m <= 32"),
    ({"mrl.nesting": "4,2,8"}, "nesting size 2 follows 4 (config.mrl.nesting); sizes must be "
     "sorted ascending"),
    ({"input.batch_size": 36}, "config.input.batch_size=36 is not divisible by the 8 batch "
     "shards (mesh data=8 x fsdp=1) x grad_accum_steps=1; allowed: multiples of 8"),
    ({"mesh.data": 3}, "config.mesh={'data': 3, 'fsdp': 1} has 3 devices but 8 are available"),
    ({"input.data_dir": "EMPTY", "input.dataset": "cifar10", "num_classes": 10},
     "dataset 'cifar10' is not prepared in"),
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


def test_nonfinite_loss_stops_with_step_and_per_size_losses_keeping_good_checkpoints(
    data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(
      _exploding(data_dir, 6, "stop"), workdir, devices=jax.devices()[:1]))
  assert code == cli.EXIT_NONFINITE, err
  assert "error: non-finite loss or gradient at step " in err
  assert "loss@2=" in err and "loss@32=" in err and "the last good checkpoint is kept" in err
  steps = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1,
                                      keep=9).all_steps()
  assert steps and max(steps) < 6
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
