"""The device mesh and the partition rules: one place for each (multi-host start: distributed.py).

Mesh axes are ('data', 'fsdp'). The batch is split over both (every device sees a different part
of the batch); parameters and optimizer state are replicated, or, with strategy 'fsdp', each
array of at least `fsdp_min_size_mb` is split over 'fsdp' along its largest divisible dimension
(ZeRO-3 style, as big_vision's `fsdp` rule); XLA inserts the all-gathers and reduce-scatters.
Model files never name mesh axes.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mrl_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("replicate", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """Resolves config.mesh (one axis may be -1: all remaining devices) for num_devices."""
  sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in AXES}
  unknown = [a for a in mesh_cfg.keys() if a not in AXES]
  if unknown:
    raise ConfigError(f"unknown mesh axis {unknown[0]!r} (config.mesh); allowed: {list(AXES)}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh={dict(sizes)} has more than one -1 axis; allowed: one")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"config.mesh={dict(sizes)} has a size < 1; allowed: positive or -1")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      raise ConfigError(f"config.mesh={dict(sizes)}: {num_devices} devices are not divisible by "
                        f"the fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ConfigError(f"config.mesh={dict(sizes)} has {int(np.prod(list(sizes.values())))} "
                      f"devices but {num_devices} are available; allowed: a product of "
                      f"{num_devices} (use -1 for 'the rest')")
  return sizes["data"], sizes["fsdp"]


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The run's one mesh. Auto axes: GSPMD propagates shardings (jax 0.10 defaults to Explicit)."""
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def _leaf_spec(shape, itemsize: int, strategy: str, fsdp_size: int, min_size_mb: float) -> P:
  if strategy == "replicate" or fsdp_size == 1:
    return P()
  if np.prod(shape, dtype=np.int64) * itemsize < min_size_mb * 2**20:
    return P()
  # Largest dimension divisible by the fsdp axis size (ties: the last one, usually the output).
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda i: (shape[i], i))
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return P(*spec)


def state_sharding(abstract_tree, mesh: Mesh, sharding_cfg):
  """A NamedSharding for every leaf of an abstract pytree (params, optimizer state, ...)."""
  strategy = sharding_cfg.strategy
  if strategy not in STRATEGIES:
    raise ConfigError(f"unknown sharding strategy {strategy!r} (config.sharding.strategy); "
                      f"allowed: {list(STRATEGIES)}")
  fsdp_size = mesh.shape["fsdp"]

  def leaf(x):
    shape = getattr(x, "shape", ())
    itemsize = np.dtype(getattr(x, "dtype", np.float32)).itemsize
    return NamedSharding(mesh, _leaf_spec(shape, itemsize, strategy, fsdp_size,
                                          sharding_cfg.fsdp_min_size_mb))

  return jax.tree.map(leaf, abstract_tree)
