"""Checkpointer: restore onto another mesh and sharding, step choice, corrupt steps and metadata."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import sharding
from mrl_jax.errors import CheckpointError
from mrl_jax.errors import ConfigError
from tests.conftest import process_env

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


def test_replicated_arrays_are_split_between_replicas_only_from_1_mib_per_slice(tmp_path):
  """On 8 data replicas, an array whose eighth is at least MIN_SLICE_BYTES (1 MiB) is written in
  8 slices, one per replica; a smaller one whole, by one replica (orbax's default would split
  every array). The chunk shapes on disk say which, and every array restores exactly."""
  assert checkpoint_lib.MIN_SLICE_BYTES == 2 ** 20
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1})
  rows = {"at": 8 * 256, "under": 8 * 255, "small": 64}  # x 1024 float32: 1 MiB = 256 rows
  values = {k: np.arange(n * 1024, dtype=np.float32).reshape(n, 1024) for k, n in rows.items()}
  placed = jax.device_put(values, jax.sharding.NamedSharding(mesh, jax.P()))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  ckpt.save(1, placed, {"step": 1})
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  try:
    chunks = {k: m.storage.chunk_shape
              for k, m in ckpt.manager.metadata(1).item_metadata["state"].items()}
    restored, _, _ = ckpt.restore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed))
  finally:
    ckpt.close()
  assert chunks == {"at": (256, 1024), "under": (8 * 255, 1024), "small": (64, 1024)}
  for key, want in values.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), want)


def test_a_checkpoint_of_orbaxs_standard_handler_restores(tmp_path):
  """Checkpoints written before the state had its own array handler (orbax's StandardSave, the
  same format) restore and read as before."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1})
  state, _ = _placed(_values(4), mesh, REPLICATE)
  manager = ocp.CheckpointManager(str(tmp_path), item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({"step": 4})))
  manager.wait_until_finished()
  manager.close()
  restored, meta, step = _restore(str(tmp_path), sharding.make_mesh({"data": 4, "fsdp": 2}),
                                  FSDP)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  try:
    read, _ = ckpt.read(4)
  finally:
    ckpt.close()
  assert (step, meta) == (4, {"step": 4})
  for key, want in _values(4).items():
    np.testing.assert_array_equal(np.asarray(restored[key]), want)
    np.testing.assert_array_equal(read[key], want)


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


def _one_device_state(step):
  return jax.tree.map(jax.numpy.asarray, _values(step))


@pytest.mark.parametrize("every, keep, saved, kept", [
    (3, 2, [3, 6, 7], [6, 7]),  # every 3rd step, 7 forced; the last 2 kept
    (0, 0, [1, 2, 3, 4, 5, 6, 7], [7]),  # 0 means every step and keep 1
])
def test_saves_every_n_steps_or_when_forced_and_keeps_the_last_k(tmp_path, every, keep, saved,
                                                                 kept):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), every_steps=every, keep=keep,
                                     async_save=False)
  got = [s for s in range(1, 8)
         if ckpt.save(s, _one_device_state(s), {"step": s}, force=s == 7)]
  ckpt.close()
  assert got == saved
  assert ckpt.all_steps() == kept == ckpt.complete_steps()


def test_an_interrupted_save_is_reported_and_not_a_step(tmp_path, capsys):
  directory = tmp_path / "c"
  _save(str(directory), [4], sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]),
        REPLICATE)
  os.makedirs(directory / "8.orbax-checkpoint-tmp-1234")
  capsys.readouterr()
  ckpt = checkpoint_lib.Checkpointer(str(directory), every_steps=1, keep=10)
  out = capsys.readouterr().out
  assert ckpt.all_steps() == [4] == ckpt.complete_steps()
  ckpt.close()
  assert out.count("incomplete checkpoint 8.orbax-checkpoint-tmp-1234") == 1


def test_write_error_names_the_step_the_cause_and_the_last_complete_checkpoint(tmp_path):
  directory = tmp_path / "c"
  ckpt = checkpoint_lib.Checkpointer(str(directory), every_steps=1, keep=10)
  for step in ("2", "4", "6.orbax-checkpoint-tmp-9"):
    os.makedirs(directory / step)
  disk_full = OSError(28, "No space left on device")
  message = str(ckpt._write_error(4, disk_full))
  assert message == (f"checkpoint step 4 could not be written to {directory}/4: No space left "
                     f"on device; the last complete checkpoint is step 2 ({directory}/2); free the"
                     " space or fix the cause and rerun the same command to resume from it")
  ckpt._writing = 2  # an asynchronous save of step 2 failed, reported at a later call
  assert str(ckpt._write_error(9, disk_full)).endswith(
      f"{directory}/2: No space left on device; the last complete checkpoint is step 4 "
      f"({directory}/4); free the space or fix the cause and rerun the same command to resume "
      "from it")
  empty = checkpoint_lib.Checkpointer(str(tmp_path / "d"), every_steps=1, keep=10)
  assert str(empty._write_error(1, disk_full)).endswith("; no complete checkpoint yet")
  ckpt.close()
  empty.close()


def test_write_cause_finds_the_os_error_in_the_chain_or_says_the_last_line():
  try:
    try:
      raise OSError(122, "Disk quota exceeded")
    except OSError as e:
      raise RuntimeError("tensorstore: write failed") from e
  except RuntimeError as e:
    chained = e
  assert checkpoint_lib.write_cause(chained) == "Disk quota exceeded"
  assert checkpoint_lib.write_cause(ValueError("INTERNAL: Read-only file system [x]")) == (
      "Read-only file system")
  assert checkpoint_lib.write_cause(ValueError("Traceback\n  at a\n\n  last   words  \n")) == (
      "ValueError: last words")
  assert checkpoint_lib.write_cause(KeyError()) == "KeyError: KeyError"
  assert len(checkpoint_lib.write_cause(ValueError("x" * 1000))) == 300
  only_cause = RuntimeError("wrapped")  # `raise ... from` outside an except: no __context__
  only_cause.__cause__ = OSError(28, "No space left on device")
  assert checkpoint_lib.write_cause(only_cause) == "No space left on device"
  try:
    try:
      raise OSError(13, "Permission denied")
    except OSError:
      raise RuntimeError("implicit")  # pylint: disable=raise-missing-from  # only __context__
  except RuntimeError as e:
    assert checkpoint_lib.write_cause(e) == "Permission denied"
  loop = ValueError("a")
  loop.__context__ = ValueError("b")
  loop.__context__.__context__ = loop  # a cycle ends the walk
  assert checkpoint_lib.write_cause(loop) == "ValueError: a"


def test_orbax_error_records_are_dropped_and_everything_else_kept():
  keep = checkpoint_lib._OrbaxWriteErrors().filter

  def record(level, pathname, name="absl", msg="m"):
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)

  assert not keep(record(logging.ERROR, "/site-packages/orbax/checkpoint/async.py"))
  assert not keep(record(logging.ERROR, "/x/asyncio/base.py", "asyncio",
                         "Task exception was never retrieved: orbax ..."))
  assert keep(record(logging.WARNING, "/site-packages/orbax/checkpoint/async.py"))
  assert keep(record(logging.ERROR, "/x/asyncio/base.py", "asyncio", "other task failed"))
  assert keep(record(logging.ERROR, "/work/mrl_jax/train_lib.py"))


def test_signature_check_names_the_first_differing_field_in_sorted_order():
  with pytest.raises(ConfigError) as e:
    checkpoint_lib.check_signature({"b": 1, "c": 2}, {"a": 0, "b": 1, "c": 3}, "/w", 5)
  assert str(e.value).startswith("checkpoint step 5 in /w was written for a=None but the config "
                                 "has a=0;")
  checkpoint_lib.check_signature({"a": 1}, {"a": 1}, "/w", 5)  # equal: nothing raised


def test_a_synchronous_save_is_complete_when_save_returns(tmp_path):
  """async_save=False (what init_from's reader asks for): the step is on disk at return, not
  later on orbax's thread. A state of 32 MB makes an asynchronous write still running then."""
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), every_steps=1, keep=1,
                                     async_save=False)
  big = {"w": jax.numpy.ones((2048, 4096), jax.numpy.float32)}
  assert ckpt.save(1, big, {"step": 1})
  assert ckpt.complete_steps() == [1]
  ckpt.close()


def test_save_without_force_follows_the_interval(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), every_steps=2, keep=3,
                                     async_save=False)
  assert [ckpt.save(s, _one_device_state(s), {"step": s}) for s in (1, 2, 3)] == [
      False, True, False]
  ckpt.close()


def test_a_failed_asynchronous_write_is_raised_by_wait_and_close(tmp_path, monkeypatch):
  """orbax reports an asynchronous write's failure from wait_until_finished: wait() and close()
  turn it into the one-line CheckpointError naming the step being written."""
  for finish in ("wait", "close"):
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / finish), every_steps=1, keep=2)
    assert ckpt.save(3, _one_device_state(3), {"step": 3})
    ckpt.manager.wait_until_finished()
    def failed():
      raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", failed)
    with pytest.raises(CheckpointError, match=r"^checkpoint step 3 could not be written to .*"
                                              r"/3: No space left on device; "):
      getattr(ckpt, finish)()
    monkeypatch.undo()
    ckpt.close()


def test_a_finished_save_is_not_blamed_for_a_later_failure(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), every_steps=1, keep=2)
  ckpt.save(2, _one_device_state(2), {"step": 2})
  ckpt.wait()
  message = str(ckpt._write_error(4, OSError(28, "No space left on device")))
  assert message.startswith("checkpoint step 4 could not be written"), message
  ckpt.close()


def test_complete_steps_of_a_removed_directory_is_empty(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), every_steps=1, keep=2)
  os.rmdir(tmp_path / "c")
  assert ckpt.complete_steps() == []
  ckpt.close()


def test_read_in_a_fresh_process_with_one_device_of_a_checkpoint_saved_on_eight(tmp_path):
  """`read` needs no model, mesh or earlier restore: a new process with one device reads a
  checkpoint written FSDP-sharded on 8 devices (init_from and export do this)."""
  directory = str(tmp_path / "c")
  _save(directory, [5], sharding.make_mesh({"data": 4, "fsdp": 2}), FSDP)
  code = ("import json, sys; from mrl_jax import checkpoint as c; "
          f"state, meta = c.Checkpointer({directory!r}, every_steps=1, keep=1, "
          "async_save=False).read(5); "
          "print(json.dumps({k: v.tolist() for k, v in state.items()}), json.dumps(meta), sep=chr(10))")
  env = process_env(JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  state, meta = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
  want = _values(5)
  for key in want:
    np.testing.assert_array_equal(np.asarray(state[key]), want[key])
  assert meta == {"signature": {"head": "mrl"}, "step": 5}


@pytest.mark.parametrize("finish", ["close", "abort"])
def test_close_and_abort_stop_every_thread_orbax_started(tmp_path, finish):
  import threading  # pylint: disable=g-import-not-at-top
  before = set(threading.enumerate())
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), every_steps=1, keep=2)
  ckpt.save(1, _one_device_state(1), {"step": 1})
  assert set(threading.enumerate()) - before  # orbax's save and metadata threads
  getattr(ckpt, finish)()
  started = set(threading.enumerate()) - before
  for thread in started:  # one may still be on its way out
    thread.join(timeout=5)
  assert not [t.name for t in started if t.is_alive()]


def test_the_orbax_log_filter_is_installed_once(tmp_path):
  for name in ("a", "b"):
    checkpoint_lib.Checkpointer(str(tmp_path / name), every_steps=1, keep=1).close()
  for logger in ("absl", "asyncio"):
    filters = logging.getLogger(logger).filters
    assert sum(isinstance(f, checkpoint_lib._OrbaxWriteErrors) for f in filters) == 1


def test_abort_logs_a_failed_write_as_the_one_line_error_and_raises_nothing(tmp_path,
                                                                           monkeypatch, caplog):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "c"), every_steps=1, keep=2)
  ckpt.save(3, _one_device_state(3), {"step": 3})
  ckpt.manager.wait_until_finished()
  def failed():
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(ckpt.manager, "wait_until_finished", failed)
  with caplog.at_level(logging.WARNING):
    ckpt.abort()
  assert any(r.getMessage().startswith("checkpoint step 3 could not be written to ")
             for r in caplog.records), [r.getMessage() for r in caplog.records]
