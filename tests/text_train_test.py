"""Training text models: the step on 1 vs 8 devices and FSDP, 2 processes, SIGTERM resume, bad
input as one line."""

import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mrl_jax import objectives
from mrl_jax import optim
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax import validation
from mrl_jax.data import builtin
from mrl_jax.data import pipeline
from mrl_jax.data import tokenizers
from tests.conftest import REPO
from tests.conftest import load_config
from tests.conftest import process_env
from tests.multihost_test import run_processes
from tests.reliability_test import _final_state
from tests.reliability_test import _run_cli


@pytest.fixture(scope="module")
def text_dir(data_dir):
  for name in ("wiki_passages", "lee_similarity", "lee_corpus"):
    builtin.prepare(name, data_dir)
  return data_dir


def _config(text_dir, objective, **overrides):
  config = load_config(f"configs/text_wiki.py:{objective},runlocal")
  config.input.data_dir = text_dir
  config.model.update(dropout_rate=0.1, attention_dropout_rate=0.1)
  config.schedule.update(name="constant", warmup_steps=0)
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def _two_steps(config, mesh_cfg, devices):
  """Parameters after two train steps on the first two batches of the real stream."""
  spec = validation.validate(config, devices, 1)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices])
  model, abstract, _ = state_lib.build_model(config, spec)
  schedule = optim.make_schedule(config, 10, 100)
  tx = optim.make_optimizer(config, spec, abstract, schedule)
  state, state_sharding = state_lib.create_train_state(config, spec, tx, mesh)
  step = train_lib.make_train_step(config, model, tx, schedule, mesh, state_sharding)
  source = pipeline.open_source(config.input)
  pp = objectives.create(config, spec).train_preprocess(source, 10)
  stream = pipeline.make_reader(config.input, source).train_batches(
      "train", local_batch=config.input.batch_size, start_batch=0, seed=0, train_preprocess=pp,
      process_index=0, process_count=1, shuffle_buffer=64)
  losses = []
  with jax.set_mesh(mesh):
    for _, batch in zip(range(2), stream):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return jax.tree.map(np.asarray, state.params), losses


@pytest.mark.parametrize("objective, data_only", [("mlm", False), ("contrastive", True),
                                                ("contrastive,two_d", False)])
def test_text_step_on_8_devices_and_fsdp_equals_1_device(text_dir, objective, data_only,
                                                         traced_tile_rows):
  """The same global batch on 1 device and 4 x 2 (data x fsdp: the batch split 8 ways, every
  parameter sharded), and for one objective on 8 (data, parameters replicated: a path the
  objectives share): equal losses and parameters (dropout included: the step's RNG does not
  depend on the layout). For the contrastive loss this is the check that the negatives are the
  global batch: per-device negatives would change the loss. The contrastive loss runs in row
  tiles of 4 (config.contrastive.tile_rows; the step's trace records it)."""
  config = _config(text_dir, objective, **{"sharding.fsdp_min_size_mb": 0.0,
                                           "contrastive.tile_rows": 4})
  one, loss_one = _two_steps(config, {"data": 1, "fsdp": 1}, 1)
  runs = [_two_steps(config, {"data": 8, "fsdp": 1}, 8)] if data_only else []
  config.sharding.strategy = "fsdp"
  runs.append(_two_steps(config, {"data": 4, "fsdp": 2}, 8))
  assert set(traced_tile_rows) == (set() if objective == "mlm" else {4})
  for many, loss_many in runs:
    np.testing.assert_allclose(loss_many, loss_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
      # AdamW normalises each update, so a last-bit gradient difference on a rarely used
      # embedding row moves it by ~1e-6 (measured 1.2e-6 of 3.9M values): atol 1e-5 = 1 % of lr.
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  assert loss_one[0] != loss_one[1]


def _train_cmd(text_dir, workdir, steps, *extra):
  return [sys.executable, "train.py", "--config=configs/text_wiki.py:contrastive,runlocal",
          f"--workdir={workdir}", f"--config.input.data_dir={text_dir}",
          f"--config.total_steps={steps}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1000", "--config.schedule.name=constant",
          "--config.schedule.warmup_steps=0", *extra]


@pytest.mark.slow
def test_two_processes_train_the_text_model_as_one(text_dir, tmp_path):
  one = str(tmp_path / "one")
  config = _config(text_dir, "contrastive", total_steps=4, checkpoint_every_steps=4)
  train_lib.train_and_evaluate(config, one, devices=jax.devices()[:2])
  two = str(tmp_path / "two")
  done = run_processes(
      lambda port: [_train_cmd(text_dir, two, 4, "--config.checkpoint_every_steps=4",
                               "--config.model.dropout_rate=0.1",
                               "--config.model.attention_dropout_rate=0.1",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}") for i in range(2)],
      [process_env()] * 2)
  for p, _, err in done:
    assert p.returncode == 0, err[-3000:]
  a, b = _final_state(one, 4), _final_state(two, 4)
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigterm_and_resume_of_the_text_job_are_bitwise(text_dir, tmp_path):
  env = process_env()
  interrupted = str(tmp_path / "interrupted")
  proc = subprocess.Popen(_train_cmd(text_dir, interrupted, 10**6), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  lines += out.splitlines(keepends=True)
  assert proc.returncode == 0, err[-3000:]
  saved = [l for l in lines if l.startswith("Received SIGTERM: saved a checkpoint at step")]
  stop = int(saved[0].split("at step ")[1].split()[0])
  steps = stop + 3
  for workdir in (interrupted, str(tmp_path / "straight")):
    done = subprocess.run(_train_cmd(text_dir, workdir, steps), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
  a, b = _final_state(str(tmp_path / "straight"), steps), _final_state(interrupted, steps)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class TextWithAnEmptyOne(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Four texts, the third empty."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    for i, t in enumerate(["a real text", "another one", "   ", "the last"]):
      yield i, {"text": t}


def _one_line(code, err, start):
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert lines[0].startswith(f"error: {start}"), lines[0]


def test_bad_text_input_is_one_line_exit_2(text_dir, tmp_path):
  """A missing vocabulary, sequences longer than the position table, a tokenizer that does not
  match the checkpoint, an empty text: one line on stderr, exit code 2."""
  run = lambda config, workdir: _run_cli(lambda: train_lib.train_and_evaluate(
      config, str(tmp_path / workdir), devices=jax.devices()[:1]))
  code, _, err = run(_config(text_dir, "contrastive",
                             **{"text.vocab": str(tmp_path / "nope.txt")}), "a")
  _one_line(code, err, f"vocabulary {tmp_path / 'nope.txt'} not found (config.text.vocab)")
  code, _, err = run(_config(text_dir, "mlm", **{"text.max_length": 600}), "b")
  _one_line(code, err, "config.text.max_length=600 is longer than the position table "
                       "config.model.max_len=512")
  code, _, err = run(_config(text_dir, "mlm", **{"input.dataset": "sklearn_digits"}), "b2")
  _one_line(code, err, "dataset 'sklearn_digits' has no text feature 'text' "
                       "(config.text.features); available: []")
  # The same vocabulary size, two tokens swapped: another tokenizer for the same checkpoint.
  trained = _config(text_dir, "contrastive")
  assert run(trained, "c")[0]["final_step"] == 4
  swapped = str(tmp_path / "vocab.txt")
  lines = open(tokenizers.builtin_vocab()).read().splitlines()
  lines[2000], lines[2001] = lines[2001], lines[2000]
  open(swapped, "w").write("\n".join(lines) + "\n")
  other = _config(text_dir, "contrastive", total_steps=8, **{"text.vocab": swapped})
  code, _, err = run(other, "c")
  _one_line(code, err, "workdir")
  assert "text.vocab" in err
  other.total_steps = 4
  code, _, err = _run_cli(lambda: state_lib.restore(
      other, validation.validate_model(other), str(tmp_path / "c"),
      sharding.make_mesh({"data": 1}, jax.devices()[:1])))
  _one_line(code, err, "checkpoint step 4 in")
  assert "tokenizer='wordpiece:" in err
  # A dataset with an empty text.
  empty_dir = str(tmp_path / "tfds")
  builtin.prepare_both_formats(TextWithAnEmptyOne, empty_dir)
  config = _config(text_dir, "mlm", **{"input.dataset": "text_with_an_empty_one",
                                       "input.data_dir": empty_dir, "input.batch_size": 4,
                                       "schedule.lr_batch_size": 4, "eval.text_sets": (),
                                       "text.tokenizer": "wordpiece",
                                       "text.vocab": tokenizers.builtin_vocab(),
                                       "model.vocab_size": 30522})
  code, _, err = run(config, "d")
  _one_line(code, err, "empty text in feature 'text'")
  shutil.rmtree(empty_dir, ignore_errors=True)
