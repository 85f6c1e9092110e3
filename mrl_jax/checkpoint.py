"""Checkpoints with orbax's CheckpointManager: the only module that imports orbax.

A checkpoint holds the whole train state (step, params, optimizer state, BatchNorm statistics,
RNG) and a JSON record with the data position and the model signature (encoder, head, nesting,
classes). Saves are asynchronous; every process takes part (orbax writes sharded arrays
cooperatively). Orbax writes into a temporary directory and renames it when complete, so a save
cut short never shows up as a step. A step that is on disk but fails to restore (corrupted
files) is reported and the previous one is tried. Restores target the abstract state with its
shardings, so a checkpoint restores onto any mesh.
"""

import jax
from absl import logging
import orbax.checkpoint as ocp

from mrl_jax import paths
from mrl_jax.errors import CheckpointError
from mrl_jax.errors import ConfigError


class Checkpointer:
  """Save every `every_steps` (and when forced), keep the last `keep`, restore the newest good."""

  def __init__(self, directory: paths.PathLike, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = paths.path(directory)  # local (absolute) or remote (gs://...)
    self._report_incomplete()
    policies = [ocp.checkpoint_managers.FixedIntervalPolicy(max(every_steps, 1))]
    self.manager = ocp.CheckpointManager(
        self.directory,
        # Known up front, so that metadata (and `read`) work before any save or restore.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
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
        message = (f"incomplete checkpoint {name} in {self.directory} (a save was interrupted);"
                   " it is ignored and removed")
        logging.warning(message)
        print(f"WARNING: {message}", flush=True)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Saves when the interval policy says so, or always with force. Returns whether it did."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

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
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except  # Corrupt arrays: try older.
        logging.warning("checkpoint step %d in %s failed to restore (%s: %s); trying the "
                        "previous one", step, self.directory, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
        print(f"WARNING: checkpoint step {step} in {self.directory} is corrupted "
              f"({type(e).__name__}); falling back to the previous checkpoint", flush=True)
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
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return jax.device_get(restored["state"]), dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_signature(saved: dict, expected: dict, directory: str, step: int) -> None:
  """Refuses a checkpoint of a different model: one line naming the first differing field."""
  for key in sorted(set(saved) | set(expected)):
    if saved.get(key) != expected.get(key):
      raise ConfigError(
          f"checkpoint step {step} in {directory} was written for {key}={saved.get(key)!r} but "
          f"the config has {key}={expected.get(key)!r}; use another --workdir or match the "
          "config")

