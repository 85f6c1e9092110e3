"""Side-effect helpers at the edges: metric writers and progress, JSON files, host agreement.

clu use goes through here and `writers.py`, so the clu release can be swapped in one place.
Only process 0 writes summaries and files; every file goes through `paths.py`.
"""

from collections.abc import Mapping

import jax
import numpy as np
from clu import parameter_overview
from clu import periodic_actions

from mrl_jax import paths
from mrl_jax import writers


def is_main_process() -> bool:
  return jax.process_index() == 0


def console(message: str) -> None:
  """A progress line on the console of process 0 (every process logs warnings itself)."""
  if is_main_process():
    print(message, flush=True)


def metric_writer(workdir, resume_step: int | None = None):
  """TensorBoard + metrics.jsonl + log writer on process 0, a logging-only writer elsewhere."""
  return writers.create(workdir, main_process=is_main_process(), resume_step=resume_step)


def report_progress(total_steps: int, writer, every_steps: int):
  """clu's ReportProgress: steps/s, ETA and uptime in the logs and TensorBoard."""
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                         every_steps=every_steps)


def parameter_table(params) -> str:
  """clu's parameter overview of an (abstract) params tree; nnx.State -> pure dict first."""
  tree = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
  tree = jax.tree.map(lambda x: np.zeros((), np.float32) if x is None else x, tree)
  return parameter_overview.get_parameter_overview(tree, include_stats=False)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


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
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())


def flatten_config(config) -> dict:
  """{'optim.name': 'sgd', ...} from a ConfigDict (or nested dict); tuples become lists."""
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  flat = {}

  def walk(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(f"{prefix}{k}.", v)
    else:
      flat[prefix[:-1]] = list(node) if isinstance(node, tuple) else node

  walk("", tree)
  return flat
