"""Which devices each process drives under each launcher, as JAX itself would decide it.

`jax.distributed.initialize` is replaced by a recorder that runs JAX's real `State.initialize`
(its cluster auto-detection and its choice of `jax_cuda_visible_devices`) with only the network
client/service stubbed out. The environments are what the launchers of docs/scaling.md set:
SLURM one process per node and one per GPU, Open MPI, a Cloud TPU VM (its metadata server
served on localhost). The effective GPUs are `jax_cuda_visible_devices` (what JAX hands the CUDA
plugin) applied to CUDA_VISIBLE_DEVICES.
"""

import http.server
import os
import sys
import threading
import types

import jax
import pytest
from jax._src import distributed as jax_distributed
from jax._src import xla_bridge

from mrl_jax import distributed
from mrl_jax.errors import ConfigError
from tests.conftest import process_env
from tests.multihost_test import run_processes

SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]",
             "SLURM_NODELIST": "node[001-002]", "SLURM_STEP_NUM_NODES": "2",
             "SLURM_NODEID": "1"}
GPUS8 = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
SLURM_PER_NODE = {**SLURM_JOB, **GPUS8, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                  "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


class _Runtime:
  """Stands for the coordinator service / client / preemption manager (no network)."""

  def __getattr__(self, name):
    return lambda *a, **k: self

  def connect(self):
    pass


@pytest.fixture
def recorder(monkeypatch):
  """Replaces jax.distributed.initialize by JAX's own State.initialize minus the network."""
  calls = []
  monkeypatch.setattr(jax_distributed, "_jax", types.SimpleNamespace(
      get_distributed_runtime_service=lambda *a, **k: _Runtime(),
      get_distributed_runtime_client=lambda *a, **k: _Runtime(),
      create_preemption_sync_manager=lambda *a, **k: _Runtime()))

  def initialize(**kwargs):
    state = jax_distributed.State()
    state.initialize(**kwargs)
    calls.append({"coordinator": state.coordinator_address, "num_processes":
                  state.num_processes, "process_id": state.process_id,
                  "visible": xla_bridge.CUDA_VISIBLE_DEVICES.value})

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_",
                                                     "KUBERNETES_", "JAX_"))]:
    monkeypatch.delenv(key)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  monkeypatch.delenv(distributed.FORCE_ENV, raising=False)
  yield calls
  jax.config.update("jax_cuda_visible_devices", "all")
  jax.config.update("jax_rocm_visible_devices", "all")
  distributed._STARTED.clear()  # pylint: disable=protected-access


def _effective_gpus(visible: str, cuda_visible_devices: str | None, physical: int = 8):
  """The physical GPUs a process ends up with."""
  listed = (cuda_visible_devices.split(",") if cuda_visible_devices is not None
            else [str(i) for i in range(physical)])
  return listed if visible == "all" else [listed[int(i)] for i in visible.split(",")]


def _start(monkeypatch, env, *, physical_gpus=8, **flags):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  return distributed.initialize(physical_gpus=physical_gpus, **flags)


def test_slurm_one_process_per_node_drives_all_8_gpus(recorder, monkeypatch):
  # srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 (docs/scaling.md), the second node.
  env = {**SLURM_PER_NODE, "SLURM_TASKS_PER_NODE": "1(x2)"}
  assert _start(monkeypatch, env)
  (call,) = recorder
  assert call["num_processes"] == 2 and call["process_id"] == 1
  assert call["coordinator"] == f"node001:{4242 % 4096 + 61440}"  # JAX's own SLURM port rule
  assert _effective_gpus(call["visible"], env["CUDA_VISIBLE_DEVICES"]) == list("01234567")


def test_plain_jax_initialize_would_drive_one_gpu_per_node(recorder, monkeypatch):
  """The defect this module exists for: JAX's default under the same environment."""
  env = SLURM_PER_NODE
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  jax.distributed.initialize()
  assert _effective_gpus(recorder[0]["visible"], env["CUDA_VISIBLE_DEVICES"]) == ["0"]


def test_slurm_one_process_per_gpu_drives_its_own_gpu(recorder, monkeypatch):
  # srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8: all tasks see 8 GPUs.
  env = {**SLURM_JOB, **GPUS8, "SLURM_NTASKS": "16", "SLURM_PROCID": "11",
         "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
  assert _start(monkeypatch, env)
  (call,) = recorder
  assert call["num_processes"] == 16 and call["process_id"] == 11
  assert _effective_gpus(call["visible"], env["CUDA_VISIBLE_DEVICES"]) == ["3"]


def test_slurm_gpus_per_task_binding_gives_the_bound_gpu(recorder, monkeypatch):
  # srun --ntasks-per-node=8 --gpus-per-task=1: each task sees only its GPU (here physical 5);
  # JAX's default [SLURM_LOCALID] = [5] would name a device this process does not have.
  env = {**SLURM_JOB, "CUDA_VISIBLE_DEVICES": "5", "SLURM_NTASKS": "16", "SLURM_PROCID": "13",
         "SLURM_LOCALID": "5", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
  assert _start(monkeypatch, env)
  assert _effective_gpus(recorder[0]["visible"], env["CUDA_VISIBLE_DEVICES"]) == ["5"]


def test_slurm_two_processes_per_node_split_the_gpus(recorder, monkeypatch):
  env = {**SLURM_JOB, **GPUS8, "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURM_TASKS_PER_NODE": "2(x2)"}
  assert _start(monkeypatch, env)
  assert _effective_gpus(recorder[0]["visible"], env["CUDA_VISIBLE_DEVICES"]) == list("4567")


@pytest.mark.parametrize("local_size, local_rank, expected", [(8, 6, ["6"]),
                                                              (1, 0, list("01234567"))])
def test_open_mpi_per_gpu_and_per_node(recorder, monkeypatch, local_size, local_rank, expected):
  # mpirun -np 16 --npernode 8 / --npernode 1; no CUDA_VISIBLE_DEVICES: the driver's 8 GPUs.
  env = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
         "OMPI_COMM_WORLD_SIZE": str(2 * local_size), "OMPI_COMM_WORLD_RANK": str(local_rank),
         "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
         "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size)}
  assert _start(monkeypatch, env, physical_gpus=8)
  (call,) = recorder
  assert call["coordinator"].startswith("10.96.0.1:")
  assert _effective_gpus(call["visible"], None) == expected


class _TpuMetadata(http.server.BaseHTTPRequestHandler):
  """The GCE metadata server of worker 1 of a 2-host TPU VM slice."""
  VALUES = {"agent-worker-number": "1", "worker-network-endpoints": "localhost,otherhost",
            "tpu-env": "ACCELERATOR_TYPE: 'v4-16'\n"}

  def do_GET(self):  # pylint: disable=invalid-name
    key = self.path.rsplit("/", 1)[-1]
    body = self.VALUES.get(key)
    self.send_response(200 if body is not None else 404)
    self.end_headers()
    self.wfile.write((body or "").encode())

  def log_message(self, *args):
    pass


def test_cloud_tpu_vm_pod_initializes_and_keeps_every_chip(recorder, monkeypatch):
  # gcloud compute tpus tpu-vm ssh --worker=all (docs/scaling.md): JAX found TPU chips at import.
  from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=import-outside-toplevel
  from jax._src.clusters import cluster  # pylint: disable=import-outside-toplevel
  for module in (cloud_tpu_init, cloud_tpu_cluster, cluster):
    monkeypatch.setattr(module, "running_in_cloud_tpu_vm", True)
  server = http.server.HTTPServer(("127.0.0.1", 0), _TpuMetadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    assert _start(monkeypatch, {"GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"},
                  physical_gpus=0)
  finally:
    server.shutdown()
  (call,) = recorder
  assert call == {"coordinator": "localhost:8482", "num_processes": 2, "process_id": 1,
                  "visible": "all"}


def test_single_process_does_not_initialize(recorder, monkeypatch):
  assert not _start(monkeypatch, GPUS8)
  assert not _start(monkeypatch, {**SLURM_JOB, "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                                  "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1"})
  assert not recorder


@pytest.mark.parametrize("env, flags, visible", [
    (SLURM_PER_NODE, {"local_device_ids_flag": "2,3"}, "2,3"),
    ({**SLURM_PER_NODE, "JAX_LOCAL_DEVICE_IDS": "6"}, {}, "6"),
    ({}, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2},
     "0,1,2,3,4,5,6,7"),
], ids=["flag", "jax_env", "explicit_coordinator"])
def test_explicit_flags_and_jax_local_device_ids_win(recorder, monkeypatch, env, flags, visible):
  assert _start(monkeypatch, env, **flags)
  (call,) = recorder
  assert call["visible"] == visible
  if flags.get("coordinator_address"):
    assert (call["coordinator"], call["num_processes"], call["process_id"]) == (
        "10.0.0.1:1234", 4, 2)


@pytest.mark.filterwarnings("ignore:Kubernetes environment detected")
def test_kubernetes_without_the_client_is_a_one_line_error(recorder, monkeypatch):
  with pytest.raises(ConfigError, match=r"multi-process start under kubernetes failed .*"
                     r"pass --coordinator_address, --num_processes and --process_id"):
    _start(monkeypatch, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "1"})
  assert not recorder


def test_uneven_gpu_split_is_refused():
  with pytest.raises(ConfigError, match="3 processes on this node share 8 visible GPUs"):
    distributed.local_device_ids({**SLURM_JOB, "SLURM_LOCALID": "0",
                                  "SLURM_TASKS_PER_NODE": "3(x2)"}, 8)


def test_slurm_task_counts_expand_per_node():
  assert distributed.launcher_local_rank({**SLURM_JOB, "SLURM_NODEID": "3", "SLURM_LOCALID": "0",
                                          "SLURM_TASKS_PER_NODE": "2(x3),1"}) == (0, 1)


def _table(*counts, platform="gpu"):
  return [{"process_index": i, "host": f"h{i}", "local_devices": c, "platform": platform,
           "device_kind": "x", "process_count": len(counts), "global_devices": sum(counts)}
          for i, c in enumerate(counts)]


def test_a_gpu_process_seeing_fewer_gpus_than_given_is_refused(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
  with pytest.raises(ConfigError, match=r"process 0 on h0 sees 4 GPUs but was given 8 "
                     r"\(CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7\)"):
    distributed.check_devices(_table(4), expected_local=8)
  distributed.check_devices(_table(8), expected_local=8)
  distributed.check_devices(_table(1, platform="cpu"), expected_local=8)


@pytest.mark.slow
def test_processes_with_different_device_counts_stop_with_one_line(data_dir, tmp_path):
  """Two real processes, 1 and 2 CPU devices: both exit 2 naming each process's count."""
  done = run_processes(
      lambda port: [[sys.executable, "train.py", "--config=configs/digits_resnet_mrl.py:runlocal",
                     f"--workdir={tmp_path / 'run'}", f"--config.input.data_dir={data_dir}",
                     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={i}"] for i in range(2)],
      [process_env(d) for d in (1, 2)], timeout=300)
  for i, (p, out, err) in enumerate(done):
    assert p.returncode == 2, err[-2000:]
    assert f"process {i}/2 on " in out and "global devices" in out
    assert err.strip().splitlines()[-1].startswith(
        "error: processes see different numbers of local devices (process 0")
    assert ": 1, process 1" in err and ": 2); every process must drive" in err
  assert not (tmp_path / "run").exists()
