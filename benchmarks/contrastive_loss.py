r"""What the Matryoshka contrastive loss costs over one size, at the paper's sizes.

Loss and gradient (w.r.t. both embeddings) of the image-text losses at B pairs, d = 768,
7 sizes (12, 24, ..., 768), timed in alternating rounds in one process:
- `one pass`: every size's cosines from the block partial dot products between consecutive
  sizes (contrastive.nested_cosines: one B x B matmul in all, one B x B matrix per size);
- `tiled`: the same in row tiles of `--tile_rows` with the hand-written gradient
  (contrastive_tiled.py; config.contrastive.tile_rows), no B x B array;
- `per size`: each size recomputed from scratch (truncate, normalise, B x B matmul): what a
  direct implementation does, |M| matmuls;
- `full size only`: the single-size (non-Matryoshka) loss;
- `largest n sizes` (--tiled_size_counts): the tiled loss on sizes[-n:], what each size adds.
For the softmax loss (CLIP / ALIGN, both directions) and the sigmoid loss (SigLIP). Memory is
XLA's own figure for the compiled function's temporaries (memory_analysis().temp_size_in_bytes).

  python benchmarks/contrastive_loss.py                  # B = 4096 on CPU, a few minutes
  python benchmarks/contrastive_loss.py --append=BENCHMARKS.md
  python benchmarks/contrastive_loss.py --tile_rows=128 --tiled_size_counts=1,2,4
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

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 4096, "pairs in the batch")
flags.DEFINE_integer("dim", 768, "embedding width")
flags.DEFINE_integer("steps", 2, "calls per timed round")
flags.DEFINE_integer("rounds", 3, "alternating timed rounds")
flags.DEFINE_integer("tile_rows", 256, "rows per tile of the tiled loss")
flags.DEFINE_list("tiled_size_counts", [], "also time the tiled loss on only the largest n "
                  "sizes, for each n (e.g. 1,2,4): what each further size adds")
flags.DEFINE_string("append", "", "append the table to this markdown file")


class Runner:

  def __init__(self, fn, *args):
    import jax  # pylint: disable=g-import-not-at-top
    self.args = args
    self.fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    self.temp_bytes = self.fn.memory_analysis().temp_size_in_bytes

  def run(self, steps):
    import jax  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    for _ in range(steps):
      out = self.fn(*self.args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def per_size_loss(a, b, sizes, loss):
  """The direct implementation: each size truncated, normalised and multiplied on its own."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mrl_jax import contrastive  # pylint: disable=g-import-not-at-top
  total = 0.0
  for m in sizes:
    x = a[:, :m] / jnp.linalg.norm(a[:, :m], axis=-1, keepdims=True)
    y = b[:, :m] / jnp.linalg.norm(b[:, :m], axis=-1, keepdims=True)
    logits = 10.0 * x @ y.T
    if loss == "sigmoid":
      total += contrastive.sigmoid_pairs(logits - 10.0).mean()
    else:
      total += contrastive.info_nce(logits, symmetric=True).mean()
  return total


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mrl_jax import contrastive  # pylint: disable=g-import-not-at-top
  args = FLAGS
  d = args.dim
  sizes = tuple(d // 2**k for k in range(6, -1, -1))  # 12..768 at d = 768
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(args.batch, d)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(args.batch, d)), jnp.float32)
  rows = []
  for loss in ("softmax", "sigmoid"):
    bias = -10.0 if loss == "sigmoid" else None

    def nested(x, y, s=sizes, loss=loss, bias=bias, tile_rows=0):
      return contrastive.matryoshka_contrastive_loss(x, y, s, jnp.ones(len(s)), scale=10.0,
                                                     bias=bias, loss=loss, symmetric=True,
                                                     tile_rows=tile_rows)[0]

    runners = {"one pass": Runner(nested, a, b),
               f"tiled ({args.tile_rows} rows)": Runner(
                   lambda x, y, f=nested: f(x, y, tile_rows=args.tile_rows), a, b),
               "per size": Runner(lambda x, y, loss=loss: per_size_loss(x, y, sizes, loss),
                                  a, b),
               "full size only": Runner(lambda x, y: nested(x, y, s=(d,)), a, b)}
    for n in map(int, args.tiled_size_counts):
      runners[f"tiled ({args.tile_rows} rows), largest {n} sizes"] = Runner(
          lambda x, y, f=nested, n=n: f(x, y, s=sizes[-n:], tile_rows=args.tile_rows), a, b)
    times = interleaved(runners, args.rounds, args.steps)
    for name, seconds in times.items():
      rows.append((loss, name, seconds, seconds / times["full size only"],
                   runners[name].temp_bytes / 2**20))
      print(rows[-1], flush=True)
  device = jax.devices()[0]
  command = "python benchmarks/contrastive_loss.py " + " ".join(sys.argv[1:])
  text = [f"\n### Matryoshka contrastive loss cost, {datetime.date.today()}: {device.device_kind}"
          f" ({device.platform}), B = {args.batch}, d = {d}, sizes {list(sizes)}\n",
          f"Command: `{command}`. Loss + gradient w.r.t. both embeddings, float32; ratios "
          "to the single-size loss measured in the same run (alternating rounds, medians).\n",
          "| loss | computation | ms | ratio to full size only | temporaries (MiB) |",
          "|---|---|---|---|---|"]
  text += [f"| {loss} | {name} | {1e3 * s:.0f} | {r:.2f} | {mib:.0f} |"
           for loss, name, s, r, mib in rows]
  report("\n".join(text) + "\n", args.append)


if __name__ == "__main__":
  app.run(main)
