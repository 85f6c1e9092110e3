"""Multi-process start-up: when to call `jax.distributed.initialize`, which local devices each
process drives, and one line per process saying what it got.

JAX's cluster auto-detection (`jax/_src/clusters/`) fills in the coordinator address, process
count and index from SLURM, Open MPI, Cloud TPU metadata or Kubernetes. On GPUs it also limits
each process to one GPU, `local_device_ids=[local rank]`, whenever the launcher reports a local
rank ("Defaults to single process per device", `cluster.py`): right for one process per GPU,
wrong for one process per node, which then drives GPU 0 of 8 and nothing reports it. So the
local device ids are decided here, from the launcher's tasks on this node and the GPUs this
process can see, and always passed explicitly (JAX then skips its own choice):

| layout                                                     | local_device_ids           |
|------------------------------------------------------------|----------------------------|
| one process per node (1 task on this node)                 | every visible GPU          |
| the launcher gave this process one GPU (CUDA_VISIBLE_DEVICES lists 1) | [0]         |
| k processes share n visible GPUs (n divisible by k)        | this rank's n / k GPUs     |
| no launcher (explicit flags, forced, Kubernetes)           | every visible GPU          |
| no GPU (CPU, TPU)                                          | JAX's choice (TPU: all)    |

`--local_device_ids` (or JAX's `JAX_LOCAL_DEVICE_IDS`) wins, as do the explicit
`--coordinator_address/--num_processes/--process_id`. After start-up every process prints one
line (index/count, host, local devices and their kind, global devices) and the run stops with
a one-line error if the processes see different numbers of devices, or a GPU process sees
fewer GPUs than it was given.
"""

import collections
import functools
import os
import re
import socket
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from mrl_jax.errors import ConfigError

FORCE_ENV = "MRL_JAX_DISTRIBUTED"  # 1: always initialize (auto-detect); 0: never.
_NVIDIA_PROC = "/proc/driver/nvidia/gpus"


def _expand_slurm_counts(text: str) -> list[int]:
  """SLURM's compressed per-node task counts: '2(x3),1' -> [2, 2, 2, 1]."""
  counts = []
  for item in filter(None, text.split(",")):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
    if not match:
      raise ConfigError(f"cannot parse SLURM tasks per node {text!r}")
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts


def launcher_local_rank(env: Mapping[str, str]) -> tuple[int, int] | None:
  """(local rank, processes on this node) from SLURM or Open MPI, else None."""
  if "SLURM_JOB_ID" in env and "SLURM_LOCALID" in env:
    tasks = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
             or env.get("SLURM_NTASKS_PER_NODE"))
    if tasks is None:
      return None
    counts = _expand_slurm_counts(tasks)
    node = int(env.get("SLURM_NODEID", 0))
    return int(env["SLURM_LOCALID"]), counts[min(node, len(counts) - 1)]
  if "OMPI_COMM_WORLD_LOCAL_RANK" in env and "OMPI_COMM_WORLD_LOCAL_SIZE" in env:
    return int(env["OMPI_COMM_WORLD_LOCAL_RANK"]), int(env["OMPI_COMM_WORLD_LOCAL_SIZE"])
  return None


def cuda_visible_devices(env: Mapping[str, str]) -> list[str] | None:
  """The entries of CUDA_VISIBLE_DEVICES (None if unset; [] if it hides every GPU)."""
  text = env.get("CUDA_VISIBLE_DEVICES")
  if text is None:
    return None
  entries = [e.strip() for e in text.split(",") if e.strip()]
  if any(e in ("NoDevFiles", "-1") for e in entries):
    return []
  return entries


def visible_gpus(env: Mapping[str, str], physical_gpus: int | None = None) -> int:
  """GPUs this process may use: CUDA_VISIBLE_DEVICES's entries, else the NVIDIA driver's list
  (read from /proc, so no CUDA context is created before JAX starts)."""
  listed = cuda_visible_devices(env)
  if listed is not None:
    return len(listed)
  if physical_gpus is None:
    physical_gpus = len(os.listdir(_NVIDIA_PROC)) if os.path.isdir(_NVIDIA_PROC) else 0
  return physical_gpus


def local_device_ids(env: Mapping[str, str], num_gpus: int) -> list[int] | None:
  """The table in the module docstring."""
  if num_gpus == 0:
    return None
  local = launcher_local_rank(env)
  if local is None:
    return list(range(num_gpus))
  rank, size = local
  if size == 1:
    return list(range(num_gpus))
  if num_gpus == 1:
    return [0]
  if num_gpus % size:
    raise ConfigError(f"{size} processes on this node share {num_gpus} visible GPUs, which is "
                      "not divisible; launch one process per node or per GPU, or pass "
                      "--local_device_ids")
  per_process = num_gpus // size
  return list(range(rank * per_process, (rank + 1) * per_process))


def _on_cloud_tpu_vm() -> bool:
  """JAX's own finding at import (TPU chips on the PCI bus and libtpu installed)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(env: Mapping[str, str]) -> str | None:
  """Which multi-process launcher this process runs under, or None (a single process)."""
  forced = env.get(FORCE_ENV)
  if forced == "0":
    return None
  if forced == "1":
    return "forced"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  if _on_cloud_tpu_vm() or "MEGASCALE_COORDINATOR_ADDRESS" in env or len(
      env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return "tpu"
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    return "kubernetes"
  return None


def _parse_ids(text: str | None) -> list[int] | None:
  if not text:
    return None
  try:
    return [int(x) for x in text.split(",")]
  except ValueError:
    raise ConfigError(f"--local_device_ids={text!r}; allowed: comma-separated integers, "
                      "e.g. 0,1,2,3") from None


_STARTED: dict = {}  # how initialize() started this process (for start()'s checks)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids_flag: str | None = None,
               env: Mapping[str, str] | None = None,
               physical_gpus: int | None = None) -> bool:
  """Calls jax.distributed.initialize when this is one of several processes.

  Returns whether it did. Must run before anything touches a JAX device.
  """
  env = os.environ if env is None else env
  explicit = bool(coordinator_address or (num_processes and num_processes > 1))
  cluster = "explicit" if explicit else detect_cluster(env)
  if cluster is None:
    return False
  num_gpus = visible_gpus(env, physical_gpus)
  ids = _parse_ids(local_device_ids_flag) or _parse_ids(env.get("JAX_LOCAL_DEVICE_IDS"))
  if ids is None:
    ids = local_device_ids(env, num_gpus)
  _STARTED.update(cluster=cluster, local_device_ids=ids, visible_gpus=num_gpus)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=ids)
  except ValueError as e:  # JAX could not find the coordinator/process count/index
    raise ConfigError(
        f"multi-process start under {cluster} failed ({e}); pass --coordinator_address, "
        "--num_processes and --process_id (Kubernetes: install jax[k8s]), or set "
        f"{FORCE_ENV}=0 for a single process") from None
  return True


def _host() -> str:
  return socket.gethostname()


def process_line(info: dict) -> str:
  return (f"process {info['process_index']}/{info['process_count']} on {info['host']}: "
          f"{info['local_devices']} local {info['platform']} devices ({info['device_kind']}), "
          f"{info['global_devices']} global devices")


@functools.cache
def process_table() -> tuple[dict, ...]:
  """One dict per process (index, host, local devices and kind), the same on every process.

  Local device counts come from the global device list (no collective); host names are
  all-gathered when the counts agree (the all-gather needs equal counts), else only this
  process's is known. With several processes every process must call this at the same point
  (start-up does).
  """
  local = jax.local_devices()
  counts = collections.Counter(d.process_index for d in jax.devices())
  n = jax.process_count()
  hosts = [""] * n
  hosts[jax.process_index()] = _host()
  if n > 1 and len(set(counts.values())) == 1:
    mine = np.frombuffer(_host().encode()[:64].ljust(64, b"\0"), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(mine)).reshape(n, -1)
    hosts = [bytes(h).rstrip(b"\0").decode() for h in gathered]
  return tuple({"process_index": i, "process_count": n, "host": hosts[i],
                "local_devices": counts[i], "platform": local[0].platform,
                "device_kind": local[0].device_kind, "global_devices": jax.device_count()}
               for i in range(n))


def check_devices(table: Sequence[dict], expected_local: int | None) -> None:
  """One-line errors for the silent failures of a multi-process start."""
  me = table[jax.process_index()] if len(table) > 1 else table[0]
  if expected_local is not None and me["platform"] == "gpu" and (
      me["local_devices"] < expected_local):
    raise ConfigError(
        f"process {me['process_index']} on {me['host']} sees {me['local_devices']} GPUs but "
        f"was given {expected_local} (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); check the launcher's GPU "
        "binding (e.g. SLURM --gpus-per-node / --gpu-bind)")
  counts = {p["local_devices"] for p in table}
  if len(counts) > 1:
    listing = ", ".join(f"process {p['process_index']}"
                        + (f" on {p['host']}" if p["host"] else "") + f": {p['local_devices']}"
                        for p in table)
    raise ConfigError(f"processes see different numbers of local devices ({listing}); every "
                      "process must drive the same number of devices")


def start(coordinator_address=None, num_processes=None, process_id=None,
          local_device_ids_flag=None) -> tuple[dict, ...]:
  """initialize() if needed, then the start line of this process and the device checks."""
  initialize(coordinator_address, num_processes, process_id, local_device_ids_flag)
  table = process_table()
  me = table[jax.process_index()]
  print(process_line(me), flush=True)
  ids = _STARTED.get("local_device_ids")
  expected = len(ids) if ids else (visible_gpus(os.environ) or None)
  check_devices(table, expected)
  return table
