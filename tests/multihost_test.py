"""Multi-host on one machine: two jax.distributed processes (CPU collectives over gloo)."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mrl_jax import train_lib
from tests.conftest import REPO
from tests.conftest import checkpointer
from tests.conftest import load_config
from tests.conftest import process_env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_PORT_TAKEN = ("Address already in use", "Failed to bind", "failed to bind")


def run_processes(commands, envs, attempts: int = 3, timeout: int = 600):
  """Starts one process per command (`commands(port)` -> argv lists) and waits for all; a port
  taken by someone else between choosing and binding it (the coordinator fails to bind) is
  retried with another port. Returns [(process, stdout, stderr)]."""
  for attempt in range(attempts):
    port = free_port()
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for argv, env in zip(commands(port), envs)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    if attempt + 1 < attempts and any(m in err for _, err in outs for m in _PORT_TAKEN):
      continue
    return [(p, out, err) for p, (out, err) in zip(procs, outs)]


def _cmd(data_dir, workdir, *extra):
  return [sys.executable, "train.py", "--config=configs/digits_resnet_mrl.py:runlocal",
          f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
          "--config.total_steps=8", "--config.checkpoint_every_steps=4",
          "--config.log_every_steps=1", "--config.schedule.warmup_epochs=0.1", *extra]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l)["train/loss"] for l in f if "train/loss" in l]


def _state(workdir, step):
  with checkpointer(workdir) as ckpt:
    return ckpt.read(step)[0]


@pytest.mark.slow
def test_two_processes_train_to_the_same_parameters_as_one_process(data_dir, tmp_path):
  """Same global batch (32) and devices (2): 1 process x 2 devices (this one) vs 2 processes x 1
  device."""
  one = str(tmp_path / "one")
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  config.input.data_dir = data_dir
  config.update(total_steps=8, checkpoint_every_steps=4, log_every_steps=1)
  config.schedule.warmup_epochs = 0.1
  train_lib.train_and_evaluate(config, one, devices=jax.devices()[:2])

  two = str(tmp_path / "two")
  done = run_processes(
      lambda port: [_cmd(data_dir, two, f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={i}") for i in range(2)],
      [process_env()] * 2)
  outs = [(out, err) for _, out, err in done]
  for p, out, err in done:
    assert p.returncode == 0, err[-3000:]
  assert "step 8/8" in outs[0][0] and "step 8/8" not in outs[1][0]  # console: process 0 only

  summary = json.load(open(os.path.join(two, "summary.json")))
  assert summary["num_processes"] == 2 and summary["num_devices"] == 2
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  a, b = _state(one, 8), _state(two, 8)
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  # Every array is replicated and under 2 x MIN_SLICE_BYTES: one replica, process 0's, writes
  # it whole (orbax OCDBT, one folder per writing process); process 1 only takes part in the
  # commit, and the checkpoint read above is complete.
  state_dir = os.path.join(two, "checkpoints", "8", "state")
  written = {name for name in os.listdir(state_dir) if name.startswith("ocdbt.process_")}
  assert written == {"ocdbt.process_0"}


@pytest.mark.slow
@pytest.mark.parametrize("sig, reason", [("SIGTERM", "a preemption notice (SIGTERM)"),
                                         ("SIGINT", "SIGINT on another process")])
def test_a_signal_on_one_host_stops_every_host_at_one_step_with_a_checkpoint(
    data_dir, tmp_path, sig, reason):
  """A signal reaches one host of two (no race with the processes' speed: they run a constant
  learning rate for 10^6 steps and process 1 gets it once process 0 logged step 3): for SIGTERM
  JAX's preemption service agrees on a step, a SIGINT (Ctrl-C) is shared at the next log step;
  every process saves there and exits 0, the checkpoint is complete and (SIGTERM) a rerun
  resumes from it."""
  workdir = str(tmp_path / "run")
  constant = ["--config.schedule.name=constant", "--config.schedule.warmup_epochs=0"]

  def cmd(port, i, steps):
    return _cmd(data_dir, workdir, f"--config.total_steps={steps}", *constant,
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}")

  port = free_port()
  procs = [subprocess.Popen(cmd(port, i, 10**6), cwd=REPO, env=process_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for line in procs[0].stdout:
    if line.startswith("step 3/"):
      procs[1].send_signal(getattr(signal, sig))
      break
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  saved = [l for l in outs[0][0].splitlines() if l.startswith("Received ")]
  assert len(saved) == 1 and saved[0].startswith(
      f"Received {reason}: saved a checkpoint at step "), outs[0][0][-2000:]
  stop = int(saved[0].split("at step ")[1].split()[0])
  assert stop >= 3
  with checkpointer(workdir) as ckpt:
    assert ckpt.complete_steps()[-1] == stop
  if sig == "SIGINT":
    return
  done = run_processes(lambda port: [cmd(port, i, stop + 2) for i in range(2)], [process_env()] * 2)
  for p, out, err in done:
    assert p.returncode == 0, err[-3000:]
  assert f"Resuming from checkpoint step {stop}" in done[0][1]
  assert json.load(open(os.path.join(workdir, "summary.json")))["final_step"] == stop + 2
