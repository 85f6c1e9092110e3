"""Side-effect helpers at the edges: metric writers and progress, JSON files, host agreement.

clu use goes through here and `writers.py`, so the clu release can be swapped in one place.
Only process 0 writes summaries and files; every file goes through `paths.py`.
"""

from collections.abc import Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np
from clu import parameter_overview
from flax import traverse_util

from mrl_jax import paths
from mrl_jax import writers


def is_main_process() -> bool:
  return jax.process_index() == 0


def console(message: str) -> None:
  """A progress line on the console of process 0 (every process logs warnings itself)."""
  if is_main_process():
    print(message, flush=True)


def warn(message: str) -> None:
  """One warning line on the console of process 0 (not also through absl logging, which would
  print it a second time on stderr)."""
  console(f"WARNING: {message}")


def metric_writer(workdir, resume_step: int | None = None):
  """TensorBoard + metrics.jsonl + log writer on process 0, a logging-only writer elsewhere."""
  return writers.create(workdir, main_process=is_main_process(), resume_step=resume_step)


def parameter_table(params) -> str:
  """clu's parameter overview of an (abstract) params tree; nnx.State -> pure dict first."""
  tree = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
  tree = jax.tree.map(lambda x: np.zeros((), np.float32) if x is None else x, tree)
  return parameter_overview.get_parameter_overview(tree, include_stats=False)


def count_params(tree) -> int:
  """clu's parameter count of an (abstract) params tree."""
  tree = tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree
  return int(parameter_overview.count_parameters(tree))


def to_python(value):
  """JSON-friendly scalars from numpy / jax values."""
  if isinstance(value, Mapping):
    return {str(k): to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def write_json(path, data, *, all_processes: bool = False) -> None:
  """Writes JSON atomically (paths.write_json), from process 0 only unless asked."""
  if all_processes or is_main_process():
    paths.write_json(path, to_python(data))


def multihost_any(flag: bool) -> bool:
  """True on every process if `flag` is True on any (e.g. one host got SIGTERM)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())


def flatten_config(config) -> dict:
  """{'optim.name': 'sgd', ...} from a ConfigDict (or nested dict); tuples become lists."""
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in traverse_util.flatten_dict(tree, sep=".").items()}
