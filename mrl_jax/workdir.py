"""Workdir safety: a run directory belongs to one config; nothing is overwritten silently.

The resolved config is saved as `<workdir>/config.json` once a run is sure to start (its
config and any checkpoint in the workdir checked). A later run in the
same workdir must have the same config, except for fields that only change how long or how
verbosely it runs, or how the state is laid out over devices (ALLOWED_CHANGES: resuming with
more steps, on another mesh, device count or sharding strategy). Anything else changes the
training trajectory and is refused with the first differing field and how to start a new run
without touching this one; `--overwrite` (and only it) deletes the old checkpoints, metrics and
summaries and starts from scratch.
"""

import fnmatch
import json

import jax
from jax.experimental import multihost_utils

from mrl_jax import paths
from mrl_jax import utils
from mrl_jax.errors import ConfigError

ALLOWED_CHANGES = (
    "total_steps", "total_epochs", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "on_nonfinite", "input.data_dir",
    "input.num_workers", "input.prefetch", "input.eval_batch_size", "eval.*",
    # Layout only: the mesh and the partition rules change where the state lives, not its
    # values; checkpoints restore into any target sharding (checkpoint.py).
    "mesh.*", "sharding.*",
)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "config.json", "parameters.txt",
               "model_summary.json", "eval")


def config_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(field, old, new) for every differing field that is not an allowed change."""
  diffs = []
  for key in sorted(set(old) | set(new)):
    if any(fnmatch.fnmatch(key, pattern) for pattern in ALLOWED_CHANGES):
      continue
    if old.get(key) != new.get(key):
      diffs.append((key, old.get(key, "<absent>"), new.get(key, "<absent>")))
  return diffs


def check(workdir, config, *, overwrite: bool = False) -> None:
  """Refuses a workdir whose saved config differs (unless overwrite: then deletes that run)."""
  path = paths.join(workdir, "config.json")
  new = _as_saved(config)
  if path.exists():
    old = paths.read_json(path)
    diffs = config_differences(old, new)
    if diffs and not overwrite:
      key, was, now = diffs[0]
      more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
      raise ConfigError(
          f"workdir {workdir} holds a run with {key}={was!r} but this config has {key}={now!r}"
          f"{more}, which changes the training trajectory; to resume, keep {key}={was!r}; to "
          f"start a new run, keep this one and give another --workdir (add "
          f"--config.init_from={workdir} to start from its weights)")
    if diffs and overwrite and utils.is_main_process():
      _delete_run(workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mrl_jax.workdir.check")


def record(workdir, config) -> None:
  """Saves the resolved config as <workdir>/config.json (once the run is sure to start)."""
  utils.write_json(paths.join(workdir, "config.json"), _as_saved(config))


def _as_saved(config) -> dict:
  return json.loads(json.dumps(utils.flatten_config(config)))  # the types a reloaded file has


def _delete_run(workdir) -> None:
  for name in RUN_OUTPUTS:
    paths.remove(paths.join(workdir, name))
  for child in paths.path(workdir).iterdir():
    if child.name.startswith("events.out.tfevents"):
      paths.remove(child)
