r"""Training throughput: images/s, step time, peak memory, MFU, and the cost of MRL's heads.

For each model (ResNet-50 ImageNet MRL, ViT-B/16 MRL) the same jitted, donated train step that
train.py runs is timed on device-resident synthetic batches (the input pipeline excluded), once
with the MRL heads (9 / 7 sizes) and once with a single full-size head (FF-d, i.e. a standard
model), in the same process, timed in alternating rounds (medians); the ratio of the two step
times is MRL's overhead. `--real_data`
adds a ResNet-50 run fed by the real input pipeline (grain, JPEG decoding and Inception crop) from
the synthetic JPEG dataset of benchmarks/input_pipeline.py.

MFU = (XLA's FLOP count of the compiled step) / step time / peak FLOP/s. Peak is the device's
dense bf16 spec for known accelerators; on CPU it is a float32 matmul peak measured in the same
run (so CPU MFU is "fraction of what this CPU's matmul reaches", not a hardware spec).

  python benchmarks/train_throughput.py --models=resnet50,vit_b16 --batch=8 --dtype=float32
  python benchmarks/train_throughput.py --batch=256 --steps=20 --append=BENCHMARKS.md  # GPU
"""

import datetime
import os
import resource
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.timing import interleaved  # noqa: E402  pylint: disable=wrong-import-position
from benchmarks.timing import report  # noqa: E402  pylint: disable=wrong-import-position

# Dense bf16 peak FLOP/s by device_kind substring (vendor specs).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}

MODELS = {
    "resnet50": ("configs/resnet50_imagenet.py", "resnet50_imagenet"),
    "vit_b16": ("configs/vit_b16_imagenet21k.py", "vit_b16_imagenet21k"),
}


def load_config(name: str, head: str, dtype: str, batch: int):
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"configs.{MODELS[name][1]}")
  config = module.get_config(f"{head},dtype={dtype},batch_size={batch}")
  if name == "vit_b16":
    config.num_classes = 1000  # ImageNet-1K heads for comparability with ResNet-50
  config.mesh.update(data=-1, fsdp=1)
  return config


def peak_flops(device) -> tuple[float, str]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  for key, value in PEAK_BF16.items():
    if key in device.device_kind:
      return value * jax.device_count(), f"{device.device_kind} bf16 spec"
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    out = f(a)
  out.block_until_ready()
  return 5 * 2 * n**3 / (time.perf_counter() - t0), "measured f32 matmul peak"


def memory_in_use(device) -> tuple[float, str]:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host max RSS"


class Runner:
  """One config's compiled train step, its state and its batch source."""

  def __init__(self, config, batches=None):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from mrl_jax import models  # pylint: disable=g-import-not-at-top
    from mrl_jax import optim  # pylint: disable=g-import-not-at-top
    from mrl_jax import sharding  # pylint: disable=g-import-not-at-top
    from mrl_jax import state as state_lib  # pylint: disable=g-import-not-at-top
    from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh)
    spec = models.resolve(config)
    model, abstract_params, _ = state_lib.build_model(config, spec)
    schedule = optim.make_schedule(config, steps_per_epoch=1000, total_steps=100_000)
    tx = optim.make_optimizer(config, spec, abstract_params, schedule)
    self.state, state_sharding = state_lib.create_train_state(config, spec, tx, self.mesh)
    step_fn = train_lib.make_train_step(config, model, tx, schedule, self.mesh, state_sharding)
    size, channels = config.input.image_size, config.model.in_channels
    b = config.input.batch_size
    rng = np.random.default_rng(0)
    synthetic = jax.device_put(
        {"image": rng.standard_normal((b, size, size, channels), np.float32),
         "label": rng.integers(0, config.num_classes, b).astype(np.int32)},
        sharding.batch_sharding(self.mesh))
    self.next_batch = (lambda: next(batches)) if batches is not None else (lambda: synthetic)
    with jax.set_mesh(self.mesh):
      t0 = time.perf_counter()
      self.step = step_fn.lower(self.state, synthetic).compile()
      self.compile_s = time.perf_counter() - t0
    cost = self.step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get("flops", 0.0)) if cost else 0.0

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    import jax  # pylint: disable=g-import-not-at-top
    with jax.set_mesh(self.mesh):
      t0 = time.perf_counter()
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.next_batch())
      jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps


def real_batches(config, data_dir: str):
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
  from mrl_jax import sharding  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import builtin  # pylint: disable=g-import-not-at-top
  builtin.prepare_both_formats(input_pipeline._builder_cls(1024), data_dir)  # pylint: disable=protected-access
  config.input.update(dataset="synthetic_jpeg", data_dir=data_dir, reader="grain")
  source = pipeline.open_source(config.input)
  reader = pipeline.make_reader(config.input, source)
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=1)
  mesh = sharding.make_mesh(config.mesh)
  return pipeline.global_batches(
      reader.train_batches("train", local_batch=config.input.batch_size // jax.process_count(),
                           start_batch=0, seed=0, train_preprocess=tp,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), shuffle_buffer=0),
      sharding.batch_sharding(mesh), prefetch=4)


FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet50", "vit_b16"], "models to measure")
flags.DEFINE_integer("batch", 8, "global batch")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
flags.DEFINE_integer("steps", 5, "steps per timed round")
flags.DEFINE_integer("rounds", 3, "alternating timed rounds")
flags.DEFINE_bool("real_data", False, "also time ResNet-50 fed by the real input pipeline")
flags.DEFINE_string("data_dir", "/tmp/mrl_jax_bench_tfds", "TFDS data_dir of the real data")
flags.DEFINE_string("append", "", "append the table to this markdown file")


def main(argv):
  del argv
  args = FLAGS
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  peak, peak_kind = peak_flops(device)
  rows = []
  for name in args.models:
    d = 2048 if name == "resnet50" else 768
    runners = {"mrl": Runner(load_config(name, "mrl", args.dtype, args.batch)),
               "ff_full": Runner(load_config(name, f"ff={d}", args.dtype, args.batch))}
    if args.real_data and name == "resnet50":
      cfg = load_config(name, "mrl", args.dtype, args.batch)
      runners["mrl_real_pipeline"] = Runner(cfg, real_batches(cfg, args.data_dir))
    step_s = interleaved(runners, args.rounds, args.steps)
    mem, mem_kind = memory_in_use(device)
    for head, runner in runners.items():
      rows.append(dict(model=name, head=head, step_s=step_s[head],
                       images_per_s=args.batch / step_s[head], flops=runner.flops,
                       compile_s=runner.compile_s, mfu=runner.flops / step_s[head] / peak,
                       mrl_over_ff=step_s["mrl"] / step_s["ff_full"],
                       flops_mrl_over_ff=runners["mrl"].flops / runners["ff_full"].flops,
                       memory_gib=mem, memory_kind=mem_kind))
      print(rows[-1], flush=True)
    del runners
  command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
  header = (f"\n### Train throughput, {datetime.date.today()}: {jax.device_count()} x "
            f"{device.device_kind} ({device.platform}), global batch {args.batch}, "
            f"{args.dtype}\n\nCommand: `{command}`. Peak for MFU: {peak / 1e12:.2f} TFLOP/s "
            f"({peak_kind}). Memory: {rows[-1]['memory_kind']} (GiB) after all runs.\n\n")
  table = ["| model | heads | images/s | step (ms) | compile (s) | TFLOP/step | MFU | "
           "MRL/FF-full step time | MRL/FF-full FLOPs | memory (GiB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    table.append(f"| {r['model']} | {r['head']} | {r['images_per_s']:.1f} | "
                 f"{1e3 * r['step_s']:.1f} | {r['compile_s']:.0f} | {r['flops'] / 1e12:.3f} | "
                 f"{100 * r['mfu']:.1f}% | {r['mrl_over_ff']:.4f} | "
                 f"{r['flops_mrl_over_ff']:.5f} | {r['memory_gib']:.1f} |")
  report(header + "\n".join(table) + "\n", args.append)


if __name__ == "__main__":
  app.run(main)
