"""Checkpointer: restore onto another mesh and sharding, step choice, corrupt steps and metadata."""

import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import sharding
from mrl_jax.errors import CheckpointError
from mrl_jax.errors import ConfigError

FSDP = ConfigDict(dict(strategy="fsdp", fsdp_min_size_mb=0.0))
REPLICATE = ConfigDict(dict(strategy="replicate", fsdp_min_size_mb=0.0))


def _values(step: int):
  rng = np.random.default_rng(step)
  return {"w": rng.normal(size=(16, 8)).astype(np.float32),
          "b": rng.normal(size=(8,)).astype(np.float32), "step": np.int32(step)}


def _placed(values, mesh, rule):
  shardings = sharding.state_sharding(values, mesh, rule)
  return jax.tree.map(jax.device_put, values, shardings), shardings


def _abstract(mesh, rule):
  values = _values(0)
  shardings = sharding.state_sharding(values, mesh, rule)
  return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values,
                      shardings)


def _save(directory, steps, mesh, rule):
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=10)
  for step in steps:
    state, _ = _placed(_values(step), mesh, rule)
    ckpt.save(step, state, {"signature": {"head": "mrl"}, "step": step})
  ckpt.close()


def _restore(directory, mesh, rule, **kwargs):
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=10)
  try:
    return ckpt.restore(_abstract(mesh, rule), **kwargs)
  finally:
    ckpt.close()


@pytest.mark.parametrize("saved_on, restored_on", [
    ((8, 1, REPLICATE), (2, 2, FSDP)),  # a pod job resumed on half the slice, sharded
    ((2, 2, FSDP), (8, 1, REPLICATE)),  # and back
    ((4, 2, FSDP), (1, 1, REPLICATE)),  # onto one device
], ids=["8rep-to-4fsdp", "4fsdp-to-8rep", "8fsdp-to-1"])
def test_restore_onto_another_mesh_and_sharding_strategy(tmp_path, saved_on, restored_on):
  data, fsdp, rule = saved_on
  _save(str(tmp_path), [3], sharding.make_mesh({"data": data, "fsdp": fsdp},
                                               jax.devices()[:data * fsdp]), rule)
  data, fsdp, rule = restored_on
  mesh = sharding.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[:data * fsdp])
  state, meta, step = _restore(str(tmp_path), mesh, rule)
  assert step == 3 and meta["step"] == 3
  for key, want in _values(3).items():
    np.testing.assert_array_equal(np.asarray(state[key]), want)
  expected = sharding.state_sharding(_values(0), mesh, rule)
  for key in state:
    assert state[key].sharding == expected[key], key
  w_shard = state["w"].addressable_shards[0].data.shape
  assert w_shard == ((8, 8) if rule is FSDP and fsdp == 2 else (16, 8))


def test_a_chosen_step_restores_that_step_and_a_missing_one_is_a_one_line_error(tmp_path):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  _save(str(tmp_path), [2, 4, 6], mesh, REPLICATE)
  state, _, step = _restore(str(tmp_path), mesh, REPLICATE, step=4)
  assert step == 4 and int(state["step"]) == 4
  with pytest.raises(ConfigError, match=r"no checkpoint at step 5 in .*; available: \[2, 4, 6\]"):
    _restore(str(tmp_path), mesh, REPLICATE, step=5)


def _corrupt(directory, step, item):
  for root, _, files in os.walk(os.path.join(directory, str(step), item)):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.write(b"\x00garbage" * max(1, os.path.getsize(path) // 8))


def test_corrupt_latest_arrays_or_metadata_fall_back_to_the_previous_step(tmp_path, capsys):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  _save(str(tmp_path), [2, 4, 6], mesh, REPLICATE)
  _corrupt(str(tmp_path), 6, "meta")  # the JSON record
  _corrupt(str(tmp_path), 4, "state")  # the arrays
  state, _, step = _restore(str(tmp_path), mesh, REPLICATE)
  assert step == 2 and int(state["step"]) == 2
  assert "checkpoint step 4" in capsys.readouterr().out


def test_every_checkpoint_corrupt_is_one_line_naming_them(tmp_path):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  _save(str(tmp_path), [2, 4], mesh, REPLICATE)
  for step in (2, 4):
    _corrupt(str(tmp_path), step, "state")
  with pytest.raises(CheckpointError) as e:
    _restore(str(tmp_path), mesh, REPLICATE)
  message = str(e.value)
  assert "\n" not in message and "none of the checkpoints [2, 4]" in message
  assert "move the directory away to start from scratch" in message


def test_a_checkpoint_of_another_signature_is_refused_before_reading_arrays(tmp_path):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  _save(str(tmp_path), [2], mesh, REPLICATE)
  with pytest.raises(ConfigError, match=r"checkpoint step 2 in .* was written for head='mrl' but "
                     r"the config has head='mrle'"):
    _restore(str(tmp_path), mesh, REPLICATE, expected_signature={"head": "mrle"})
