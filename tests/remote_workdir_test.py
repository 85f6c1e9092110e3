"""A gs:// workdir end to end against a GCS emulator on localhost: train, SIGTERM, resume, eval.

Everything the project writes (config.json, metrics.jsonl, TensorBoard events, parameters.txt,
summary.json, orbax checkpoints, eval reports and plots) must land in the bucket and nothing on
the local disk, and the workdir-safety rules must hold there too.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.conftest import gcs_files
from tests.conftest import process_env

WORKDIR = "gs://mrl-test/digits_run"


def _cmd(script, data_dir, *extra):
  return [sys.executable, script, "--config=configs/digits_resnet_mrl.py:runlocal",
          f"--workdir={WORKDIR}", f"--config.input.data_dir={data_dir}", *extra]


def _train_flags(total_steps):
  return [f"--config.total_steps={total_steps}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1000", "--config.schedule.name=constant",
          "--config.schedule.warmup_epochs=0.0"]


@pytest.mark.slow
def test_gs_workdir_train_sigterm_resume_eval_on_an_emulator(data_dir, gcs_emulator, tmp_path):
  env = process_env(**gcs_emulator)
  # 1. Train "forever"; SIGTERM once step 2 is logged: a checkpoint is saved and it exits 0.
  proc = subprocess.Popen(_cmd("train.py", data_dir, *_train_flags(10**6)), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("step 2/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stop_step = int(out.split("saved a checkpoint at step ")[1].split()[0])
  assert f"in {WORKDIR}/checkpoints. Rerun the same command" in out

  # 2. The same command with a finite length resumes from the bucket and finishes.
  final = stop_step + 3
  done = subprocess.run(_cmd("train.py", data_dir, *_train_flags(final)), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resuming from checkpoint step {stop_step} in {WORKDIR}/checkpoints" in done.stdout

  # 3. A different config is refused in the remote workdir too, naming it unchanged.
  refused = subprocess.run(_cmd("train.py", data_dir, *_train_flags(final),
                                "--config.model.width=8"),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir {WORKDIR} holds a run with model.width=4 but this config has "
      "model.width=8")

  # 4. eval.py reads the checkpoint from the bucket and writes its reports there.
  evaluated = subprocess.run(_cmd("eval.py", data_dir), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]

  files = gcs_files(gcs_emulator, WORKDIR[len("gs://"):])
  names = set(files)
  assert {"config.json", "metrics.jsonl", "summary.json", "parameters.txt"} <= names
  assert sum(n.startswith("events.out.tfevents.") for n in names) == 2  # one per run
  assert any(n.startswith(f"checkpoints/{final}/") for n in names)
  for report in ("results.json", "results.csv", "accuracy_vs_dim.png",
                 "adaptive_retrieval.csv", "retrieval_vs_mflops.png"):
    assert f"eval/sklearn_digits/{report}" in names
  assert json.loads(files["summary.json"])["final_step"] == final
  assert json.loads(files["config.json"])["total_steps"] == final
  steps = [json.loads(l)["step"] for l in files["metrics.jsonl"].decode().splitlines()
           if "train/loss" in l]
  assert steps == list(range(1, final + 1))  # nothing lost or repeated across the resume
  results = json.loads(files["eval/sklearn_digits/results.json"])
  assert results["checkpoint_step"] == final and "knn1_top1" in results["sizes"]["32"]
  assert files["eval/sklearn_digits/accuracy_vs_dim.png"].startswith(b"\x89PNG")
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # no local copy under the cwd
