r"""Text step throughput (tokens/s) and what the Matryoshka losses cost over one size.

Two measurements, each MRL vs a single full size in the same process, timed in alternating
rounds (train_throughput.interleaved: medians):
1. the whole jitted, donated train step train.py runs (BERT encoder + objective), on
   device-resident synthetic token batches: MLM (BERT's masking shapes) and contrastive pairs;
   tokens/s = batch x sequence length / step time;
2. the MLM loss alone with its gradient, on fixed inputs: the nested tied logits over the
   vocabulary (one pass of block partial sums), against the same loss at the full size only
   (the contrastive losses: benchmarks/contrastive_loss.py).

  python benchmarks/text_throughput.py                       # BERT-mini, CPU, a few minutes
  python benchmarks/text_throughput.py --variant=base --batch=256 --append=BENCHMARKS.md
"""

import datetime
import os
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.timing import interleaved  # noqa: E402  pylint: disable=wrong-import-position
from benchmarks.timing import report  # noqa: E402  pylint: disable=wrong-import-position


def text_config(objective: str, variant: str, nesting: str, batch: int, length: int,
                dtype: str):
  from configs import text_wiki  # pylint: disable=g-import-not-at-top
  config = text_wiki.get_config("contrastive" if objective == "contrastive" else "mlm")
  config.model.update(variant=variant, num_layers=0)
  config.mrl.nesting = nesting
  config.text.update(max_length=length, max_predictions=max(1, round(0.15 * length)))
  config.input.batch_size = batch
  config.dtype = dtype
  config.mesh.update(data=-1, fsdp=1)
  return config


class StepRunner:
  """The train step of a text config on a synthetic batch that stays on the devices."""

  def __init__(self, config):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from mrl_jax import models  # pylint: disable=g-import-not-at-top
    from mrl_jax import optim  # pylint: disable=g-import-not-at-top
    from mrl_jax import sharding  # pylint: disable=g-import-not-at-top
    from mrl_jax import state as state_lib  # pylint: disable=g-import-not-at-top
    from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
    self.mesh = sharding.make_mesh(config.mesh)
    spec = models.resolve(config)
    model, abstract, _ = state_lib.build_model(config, spec)
    schedule = optim.make_schedule(config, 1000, 100_000)
    tx = optim.make_optimizer(config, spec, abstract, schedule)
    self.state, state_sharding = state_lib.create_train_state(config, spec, tx, self.mesh)
    step = train_lib.make_train_step(config, model, tx, schedule, self.mesh, state_sharding)
    b, length = config.input.batch_size, config.text.max_length
    rng = np.random.default_rng(0)
    tokens = lambda: {"input_ids": rng.integers(5, config.model.vocab_size, (b, length),
                                                dtype=np.int32),
                      "segment_ids": np.zeros((b, length), np.int32),
                      "input_mask": np.ones((b, length), np.int32)}
    if config.objective == "mlm":
      p = config.text.max_predictions
      batch = dict(tokens(), masked_positions=rng.integers(1, length - 1, (b, p), dtype=np.int32),
                   masked_ids=rng.integers(5, config.model.vocab_size, (b, p), dtype=np.int32),
                   masked_weights=np.ones((b, p), np.float32))
    else:
      batch = {f"{side}_{k}": v for side in ("anchor", "positive") for k, v in tokens().items()}
    self.batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
    self.tokens = b * length * (2 if config.objective == "contrastive" else 1)
    with jax.set_mesh(self.mesh):
      self.step = step.lower(self.state, self.batch).compile()

  def run(self, steps: int) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    with jax.set_mesh(self.mesh):
      t0 = time.perf_counter()
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.batch)
      jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps


class LossRunner:
  """A jitted loss-and-gradient on fixed inputs."""

  def __init__(self, fn, *args):
    import jax  # pylint: disable=g-import-not-at-top
    self.args = args
    self.fn = jax.jit(jax.value_and_grad(fn)).lower(*args).compile()

  def run(self, steps: int) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    for _ in range(steps):
      out = self.fn(*self.args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def mlm_loss_runners(sizes: tuple[int, ...], d: int, batch: int, vocab: int,
                     predictions: int):
  """The nested tied MLM logits and their loss, at `sizes` and at d alone."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mrl_jax.models import mlm  # pylint: disable=g-import-not-at-top
  from mrl_jax.objectives import mlm as mlm_objective  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  t = jnp.asarray(rng.normal(size=(batch, predictions, d)), jnp.float32)
  embedding = jnp.asarray(rng.normal(size=(vocab, d)) * 0.02, jnp.float32)
  bias = jnp.zeros((vocab,), jnp.float32)
  targets = {"masked_ids": jnp.asarray(rng.integers(0, vocab, (batch, predictions)), jnp.int32),
             "masked_weights": jnp.ones((batch, predictions), jnp.float32)}

  def make(s):
    def loss(x):
      logits = mlm.nested_tied_logits(x, embedding, bias, s)
      return mlm_objective.mlm_loss(logits, targets, jnp.ones(len(s)))[0]
    return loss

  return {f"{len(sizes)} sizes": LossRunner(make(sizes), t),
          "full size": LossRunner(make((d,)), t)}


FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "mini", "BERT variant (models/bert.py)")
flags.DEFINE_integer("batch", 32, "global batch (sequences, or pairs)")
flags.DEFINE_integer("length", 128, "tokens per sequence")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_integer("steps", 3, "steps per timed round")
flags.DEFINE_integer("rounds", 3, "alternating timed rounds")
flags.DEFINE_string("append", "", "append the tables to this markdown file")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from mrl_jax import nesting  # pylint: disable=g-import-not-at-top
  from mrl_jax.models import bert  # pylint: disable=g-import-not-at-top
  args = FLAGS
  d = bert.VARIANTS[args.variant][0]
  mrl_sizes = nesting.parse("halving:8" if d % 12 else "halving:12", d)
  rows = []
  for objective in ("mlm", "contrastive"):
    runners = {
        f"{len(mrl_sizes)} sizes": StepRunner(text_config(
            objective, args.variant, ",".join(map(str, mrl_sizes)), args.batch, args.length,
            args.dtype)),
        "full size": StepRunner(text_config(objective, args.variant, "full", args.batch,
                                            args.length, args.dtype))}
    times = interleaved(runners, args.rounds, args.steps)
    for name, seconds in times.items():
      rows.append(dict(what=f"{objective} train step", sizes=name, ms=1e3 * seconds,
                       tokens_per_s=runners[name].tokens / seconds,
                       ratio=seconds / times["full size"]))
      print(rows[-1], flush=True)
  predictions = max(1, round(0.15 * args.length))
  runners = mlm_loss_runners((12, 24, 48, 96, 192, 384, 768), 768, args.batch, 30522,
                             predictions)
  times = interleaved(runners, args.rounds, args.steps)
  for name, seconds in times.items():
    rows.append(dict(what=f"MLM loss + grad, d = 768, {args.batch} x {predictions} "
                          "predictions, vocab 30,522", sizes=name, ms=1e3 * seconds,
                     tokens_per_s=None, ratio=seconds / times["full size"]))
    print(rows[-1], flush=True)
  device = jax.devices()[0]
  command = "python benchmarks/text_throughput.py " + " ".join(sys.argv[1:])
  text = [f"\n### Text step and Matryoshka loss cost, {datetime.date.today()}: "
          f"{jax.device_count()} x {device.device_kind} ({device.platform}), BERT-{args.variant} "
          f"(d = {d}), batch {args.batch} x {args.length} tokens, {args.dtype}\n",
          f"Command: `{command}`. Ratios: MRL over the full size only, measured in one run "
          "(alternating rounds, medians).\n",
          "| what | sizes | ms | tokens/s | ratio to full size |", "|---|---|---|---|---|"]
  for r in rows:
    tokens = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
    text.append(f"| {r['what']} | {r['sizes']} | {r['ms']:.1f} | {tokens} | "
                f"{r['ratio']:.3f} |")
  report("\n".join(text) + "\n", args.append)


if __name__ == "__main__":
  app.run(main)
