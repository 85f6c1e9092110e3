"""Shared fixtures. 8 simulated CPU devices for every test (set before jax is imported)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as mrl_jax/cli.py

import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set by optimized_build_test.py: run with XLA's normal optimisations, as users do.
OPTIMIZED = os.environ.get("MRL_JAX_TEST_OPTIMIZED") == "1"

# Set in the environment, not only in jax.config, so that the xdist workers and every process a
# test starts (train.py, two-process runs) inherit them. Tests compare numbers, not speed:
# compile ~2.5x faster with fewer XLA optimisations (optimized_build_test.py reruns one test of
# each equality family with them). Many tests, workers and subprocesses compile the same
# programs: one on-disk cache serves them all; a size limit makes jax lock it (filelock), so
# two processes never read an entry while it is being written.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0" if OPTIMIZED else "1"
# And XLA:CPU's legacy elemental emitters instead of its MLIR fusion emitters: the same HLO,
# lowered to LLVM in ~45 % less time (the dual-encoder step: 5.3 -> 2.9 s; the suite: 16 -> 13.4
# min). The optimised rerun, which inherits this environment, drops it: users' default.
_DEVICE_COUNT = "--xla_force_host_platform_device_count="
_LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` CPU devices with the suite's emitters, other flags kept."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith(_DEVICE_COUNT) and f != _LEGACY_EMITTERS]
  return " ".join(kept + [f"{_DEVICE_COUNT}{devices}"] * (devices > 1) +
                  [_LEGACY_EMITTERS] * (not OPTIMIZED))


os.environ["XLA_FLAGS"] = _xla_flags(8)
os.environ.setdefault("MRL_JAX_TEST_COMPILE_CACHE", tempfile.mkdtemp(prefix="jax_cache_"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["MRL_JAX_TEST_COMPILE_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)


def process_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a process a test starts (train.py, a two-process run) on `devices` CPU
  devices: this one's, so it compiles as the suite does (build, emitters, cache), with `extra`."""
  return dict(os.environ, XLA_FLAGS=_xla_flags(devices), **extra)


def pytest_collection_modifyitems(items):
  """Files with end-to-end (`slow`) tests run first, the other files after them; each file's
  tests stay together and in order (module fixtures are set up once per worker). xdist hands
  out tests in file order, so its workers then end on short tests: in file order one worker
  sat idle for the last 45 s while the other ran a two-process test."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with every built-in dataset prepared in both file formats, once per test
  session: xdist workers share one directory (their common parent), and builtin.prepare's file
  lock makes the others wait for the first and find the datasets ready (~16 s of CPU each)."""
  from mrl_jax.data import builtin  # pylint: disable=g-import-not-at-top
  path = os.environ.get("MRL_JAX_TEST_DATA_DIR")
  if not path and os.environ.get("PYTEST_XDIST_WORKER"):
    path = str(tmp_path_factory.getbasetemp().parent / "tfds")
  path = path or str(tmp_path_factory.mktemp("tfds"))
  for name in builtin.BUILTIN:
    builtin.prepare(name, path)
  return path


@contextlib.contextmanager
def checkpointer(workdir: str):
  """A Checkpointer on `<workdir>/checkpoints` that reads any step, closed afterwards."""
  from mrl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=9)
  try:
    yield ckpt
  finally:
    ckpt.close()


def stop_at_step(monkeypatch, stop_at: int) -> None:
  """The train loop sees a SIGTERM at step `stop_at` (the stop check reports it there), as a
  preemption noticed at that step would be; other steps keep the real check."""
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
  reason = train_lib._StopSignal.stop_reason  # pylint: disable=protected-access
  monkeypatch.setattr(train_lib._StopSignal, "stop_reason",  # pylint: disable=protected-access
                      lambda self, step, log_step: "SIGTERM" if step == stop_at
                      else reason(self, step, log_step))


def load_config(path_and_arg: str):
  """Loads `configs/x.py[:arg]` the way --config does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = path_and_arg.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def build_model(config):
  """(ModelSpec, state.Model, abstract params, abstract batch_stats): the config resolved and
  the model built abstractly, as a run does."""
  from mrl_jax import models  # pylint: disable=g-import-not-at-top
  from mrl_jax import state  # pylint: disable=g-import-not-at-top
  spec = models.resolve(config)
  return (spec, *state.build_model(config, spec))


def digits_config(data_dir: str, steps: int, arg: str = "runlocal", **overrides):
  """The built-in digits config for `steps` steps, logging every step, with dotted overrides
  ({"model.width": 8})."""
  config = load_config(f"configs/digits_resnet_mrl.py:{arg}")
  config.input.data_dir = data_dir
  config.total_steps = steps
  config.log_every_steps = 1
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@contextlib.contextmanager
def unoptimised_init():
  """Compiles initial states with most XLA optimisations off, also in the optimised rerun
  (optimized_build_test.py): each equality it checks starts both sides from one initial state,
  so what it tests is the step's build, not the init's (measured: that rerun took 92 s with
  optimised init compiles, 68 s without)."""
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True)
def _unoptimised_train_state_init(monkeypatch):
  """In the optimised rerun, state.create_train_state (every train state's init, also inside
  train_lib) compiles as `unoptimised_init` says."""
  if OPTIMIZED:
    from mrl_jax import state  # pylint: disable=g-import-not-at-top
    create = state.create_train_state

    def unoptimised_create(*args, **kwargs):
      with unoptimised_init():
        return create(*args, **kwargs)
    monkeypatch.setattr(state, "create_train_state", unoptimised_create)


_BUILT_STATES = {}


def jit_build(constructor, share_state_as: str | None = None):
  """Builds an NNX module with its initialisers jitted (eager init runs op by op: ~10x slower).

  Modules that differ only in static attributes (compute dtype, remat) have the same parameters
  for the same seed: give them the same `share_state_as` key and the state is built once.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, _ = nnx.split(nnx.eval_shape(constructor))
  if share_state_as is None or share_state_as not in _BUILT_STATES:
    with unoptimised_init():
      state = jax.jit(lambda: nnx.split(constructor())[1])()
    if share_state_as is not None:
      _BUILT_STATES[share_state_as] = state
  else:
    state = _BUILT_STATES[share_state_as]
  return nnx.merge(graphdef, state, copy=True)


def jit_call(module, *args):
  """module(*args) under jax.jit (returns outputs; module state updates are dropped)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


@pytest.fixture(scope="session")
def trained_digits(data_dir, tmp_path_factory):
  """(config, workdir) of a small MRL run on digits (24 steps, d = 64), trained once."""
  import jax  # pylint: disable=g-import-not-at-top
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  config.input.data_dir = data_dir
  config.model.width = 8
  config.eval.extra_sizes = (3, 6, 12, 24, 48)
  config.input.batch_size = 64
  config.total_steps = 24
  config.schedule.update(base_lr=0.2, warmup_steps=2)
  config.checkpoint_every_steps = 12
  config.log_every_steps = 12
  workdir = str(tmp_path_factory.mktemp("trained_digits"))
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return config, workdir


@pytest.fixture
def traced_tile_rows(monkeypatch) -> list:
  """The tile_rows of every call of the tiled contrastive loss traced in the test: proves that
  config.contrastive.tile_rows reaches the step (0 = the untiled loss, never called)."""
  from mrl_jax import contrastive_tiled  # pylint: disable=g-import-not-at-top
  tiled, traced = contrastive_tiled.matryoshka_contrastive_loss, []
  monkeypatch.setattr(contrastive_tiled, "matryoshka_contrastive_loss",
                      lambda *a, **kw: traced.append(kw["tile_rows"]) or tiled(*a, **kw))
  return traced


@pytest.fixture(scope="session")
def gcs_emulator():
  """A GCS JSON-API emulator on localhost (gcp-storage-emulator, in memory) with bucket
  `mrl-test`, and the environment that points every client at it: epath's fsspec backend
  (gcsfs: STORAGE_EMULATOR_HOST) and orbax's TensorStore (TENSORSTORE_GCS_HTTP_URL). TF's own
  GCS client has a fixed endpoint and cannot be redirected; nothing of ours uses it."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  _send_generation_headers()
  server = create_server("127.0.0.1", 0, in_memory=True, default_bucket="mrl-test")
  server.start()
  url = f"http://127.0.0.1:{server._api._httpd.server_port}"  # pylint: disable=protected-access
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "EPATH_USE_TF": "false",
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  yield env
  server.stop()


def _send_generation_headers():
  """Real GCS answers a media download with the object's `x-goog-generation` header, which
  TensorStore (orbax's array store) needs to version what it reads; the emulator omits it.
  Adds it to the emulator's download handler (which runs in this process)."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  original = objects.download
  if getattr(original, "sends_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  download.sends_generation = True
  objects.download = download  # objects.get(alt=media) calls it by this name
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


def gcs_files(env, prefix: str) -> dict[str, bytes]:
  """{path relative to prefix: content} of every object under gs://<prefix>/, read with plain
  HTTP from the emulator's JSON API (independent of the code under test)."""
  import json  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  url = env["STORAGE_EMULATOR_HOST"]
  bucket, _, folder = prefix.partition("/")
  query = urllib.parse.urlencode({"prefix": folder + "/", "maxResults": 100000})
  with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?{query}") as r:
    names = [item["name"] for item in json.load(r).get("items", [])]
  files = {}
  for name in names:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media") as r:
      files[name[len(folder) + 1:]] = r.read()
  return files
