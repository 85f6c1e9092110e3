"""Checkpoints with orbax's CheckpointManager: the only module that imports orbax.

A checkpoint holds the whole train state (step, params, optimizer state, BatchNorm statistics,
RNG) and a JSON record with the data position and the model signature (encoder, head, nesting,
classes). Saves are asynchronous; every process takes part (orbax writes sharded arrays
cooperatively). Orbax writes into a temporary directory and renames it when complete, so a save
cut short never shows up as a step. A step that is on disk but fails to restore (corrupted
files) is reported and the previous one is tried. Restores target the abstract state with its
shardings, so a checkpoint restores onto any mesh.
"""

import logging as py_logging
import re

import jax
from absl import logging
import orbax.checkpoint as ocp

from mrl_jax import paths
from mrl_jax import utils
from mrl_jax.errors import CheckpointError
from mrl_jax.errors import ConfigError


# Orbax's default off GPU ("replica-parallel") splits every replicated array between its
# replicas, each writing a slice: for a small array, many writes of a few KiB (object stores
# throttle them; google/orbax#2165) and, in each process, a compiled slice program per shape
# (~3.4 s for a fresh process saving a ResNet-18 on 8 devices). Only arrays whose slice per
# replica is at least this size are split; the others are written whole by one replica.
MIN_SLICE_BYTES = 1 << 20
# Every leaf of the state is a jax array (its RNG is uint32 key data: no PRNG key metadata).
_HANDLERS = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES)))


def _restore_args(target) -> ocp.args.PyTreeRestore:
  """Restores onto `target`'s shapes, dtypes and shardings (what orbax's StandardRestore does)."""
  return ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))


class Checkpointer:
  """Save every `every_steps` (and when forced), keep the last `keep`, restore the newest good."""

  def __init__(self, directory: paths.PathLike, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = paths.path(directory)  # local (absolute) or remote (gs://...)
    self._writing = None  # the step an asynchronous save is writing
    _report_write_failures_once()
    self._report_incomplete()
    policies = [ocp.checkpoint_managers.FixedIntervalPolicy(max(every_steps, 1))]
    self.manager = ocp.CheckpointManager(
        self.directory,
        # Known up front, so that metadata (and `read`) work before any save or restore.
        item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_HANDLERS),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
            preservation_policy=ocp.checkpoint_managers.LatestN(max(keep, 1)),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

  def _report_incomplete(self) -> None:
    """A save cut short (preemption, kill) leaves `<step>.orbax-checkpoint-tmp-*`; orbax never
    lists it as a step and deletes it on start-up (cleanup_tmp_directories). Say so."""
    if not self.directory.is_dir():
      return
    for name in sorted(p.name for p in self.directory.iterdir()):
      if ".orbax-checkpoint-tmp" in name:
        utils.warn(f"incomplete checkpoint {name} in {self.directory} (a save was "
                   "interrupted); it is ignored and removed")

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Saves when the interval policy says so, or always with force. Returns whether it did.

    A failed write (this save, or the previous asynchronous one) is a CheckpointError."""
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if saved:
      self._writing = step
    return saved

  def complete_steps(self) -> list[int]:
    """Steps whose directories are complete on disk (orbax renames them when done)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

  def _write_error(self, step, error: BaseException) -> CheckpointError:
    """One line: the step and path that failed, the cause, the last complete checkpoint."""
    step = step if self._writing is None else self._writing
    complete = [s for s in self.complete_steps() if s != step]
    last = (f"the last complete checkpoint is step {complete[-1]} "
            f"({self.directory / str(complete[-1])}); free the space or fix the cause and "
            "rerun the same command to resume from it") if complete else (
                "no complete checkpoint yet")
    return CheckpointError(f"checkpoint step {step} could not be written to "
                           f"{self.directory / str(step)}: {write_cause(error)}; {last}")

  def restore(self, abstract_state, expected_signature: dict | None = None,
              step: int | None = None):
    """(state, meta, step) of `step`, or of the newest checkpoint that restores; None if there
    is no checkpoint at all.

    `expected_signature` is compared with the saved model signature first; a difference is a
    ConfigError naming the field (restoring would otherwise fail with a shape error or, worse,
    succeed on a different model).
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise ConfigError(f"no checkpoint at step {step} in {self.directory}; available: "
                          f"{steps}")
      steps = [step]
    for step in reversed(steps):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(meta["meta"])
      except Exception as e:  # pylint: disable=broad-except  # Corrupt metadata: try older.
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous "
                        "one", step, self.directory, type(e).__name__, e)
        continue
      if expected_signature is not None:
        check_signature(meta.get("signature", {}), expected_signature, self.directory, step)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_restore_args(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except  # Corrupt arrays: try older.
        cause = str(e).splitlines()[0] if str(e) else ""
        utils.warn(f"checkpoint step {step} in {self.directory} is corrupted "
                   f"({type(e).__name__}: {cause[:200]}); falling back to the previous one")
        continue
      return restored["state"], meta, step
    if steps:
      raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} could be "
                            "restored; move the directory away to start from scratch")
    return None

  def read(self, step: int) -> tuple[dict, dict]:
    """(state as nested dicts of numpy arrays, meta) of `step`, whatever mesh wrote it.

    No model or config needed: the target is built from the checkpoint's own metadata and placed
    on one local device (for inspection, export and tests; training restores sharded).
    """
    metadata = self.manager.metadata(step).item_metadata["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=_restore_args(target), meta=ocp.args.JsonRestore()))
    return jax.device_get(restored["state"]), dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until the asynchronous save is done; its failure is a CheckpointError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(None, e) from e
    self._writing = None

  def close(self) -> None:
    """Waits for the last save and stops orbax's threads, whether or not the save failed."""
    try:
      self.wait()
    finally:
      self._close_manager()

  def abort(self) -> None:
    """On an error path: finish what can finish, stop the threads, raise nothing (the error
    being handled is the one to report)."""
    try:
      self.wait()
    except CheckpointError as e:
      logging.warning("%s", e)
    self._close_manager()

  def _close_manager(self) -> None:
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except  # already reported by wait()
      logging.warning("closing the checkpoint manager: %s: %s", type(e).__name__, e)


class _OrbaxWriteErrors(py_logging.Filter):
  """Drops orbax's own ERROR records (with tracebacks, from its save threads) and asyncio's
  "exception never retrieved" records of orbax tasks: a failed write reaches the user as one
  CheckpointError line (`Checkpointer._write_error`) instead of hundreds of lines."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR:
      return True
    if "/orbax/" in (record.pathname or ""):
      return False
    return not (record.name == "asyncio" and "orbax" in record.getMessage())


def _report_write_failures_once() -> None:
  """Installs the filter above on the loggers orbax and asyncio write to."""
  if getattr(_report_write_failures_once, "done", False):
    return
  _report_write_failures_once.done = True
  for name in ("absl", "asyncio"):
    py_logging.getLogger(name).addFilter(_OrbaxWriteErrors())


_OS_CAUSES = ("No space left on device", "Disk quota exceeded", "Permission denied",
              "Read-only file system", "File too large", "Input/output error")


def write_cause(error: BaseException) -> str:
  """The reason a write failed, in a few words: the OS error when one is in the chain (orbax
  and TensorStore wrap it in their own messages, often with a traceback), else the last line."""
  seen, e = [], error
  while e is not None and e not in seen:
    seen.append(e)
    if isinstance(e, OSError) and e.strerror:
      return e.strerror
    for cause in _OS_CAUSES:
      if cause in str(e):
        return cause
    e = e.__cause__ or e.__context__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[-1] if lines else type(error).__name__
  return re.sub(r"\s+", " ", f"{type(error).__name__}: {text}")[:300]


def check_signature(saved: dict, expected: dict, directory: str, step: int) -> None:
  """Refuses a checkpoint of a different model: one line naming the first differing field."""
  for key in sorted(set(saved) | set(expected)):
    if saved.get(key) != expected.get(key):
      raise ConfigError(
          f"checkpoint step {step} in {directory} was written for {key}={saved.get(key)!r} but "
          f"the config has {key}={expected.get(key)!r}; use another --workdir or match the "
          "config")

