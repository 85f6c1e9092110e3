r"""Why the Matryoshka dual encoder loses at its full size on the built-in captioned digits:
an ablation, every row against the same standard (full size only, truncated) baseline.

  python experiments/image_text_ablation.py                  # mnist_captions, 3 seeds
  python experiments/image_text_ablation.py --data=scenes --rows=standard,mrl
  python experiments/image_text_ablation.py --rows=standard_4x_steps,mrl_4x_steps

configs/image_text_digits.py as experiments/image_text_claims.py trains it (600 steps, image
tower width 16; `--steps`, `--width` for a cheaper look), one run ~15 min on 2 CPU cores (two
runs side by side, each pinned to a core with `taskset`, finish ~13% sooner in all), so the
default, 5 rows x 3 seeds, takes about 4 h on a 2-core host. Rows (`--rows`, default the first
five):

- `standard`: only the full size (128) trained; smaller sizes by truncation (the baseline).
- `mrl`: the Matryoshka loss at 8, 16, ..., 128, equal weights, one learned scale shared by
  the sizes (the config's recipe; the paper's Sec. 3 uses equal weights too).
- `mrl_per_size_scale`: one learned scale (temperature) per size.
- `mrl_full_half`: weights (1/4, 1/4, 1/4, 1/4, 1): the full size keeps half the loss's
  weight instead of a fifth.
- `mrl_both`: per-size scales and the full size's half.
- `mrl_4x_steps`, `standard_4x_steps`: 4 x --steps. `mrl_batch512`, `standard_batch512`:
  batch 512 (the learning rate scaled linearly by the config's lr_batch_size rule).

Reported at every size, mean ± std over seeds: zero-shot top-1 (mnist_colored test), text ->
image and image -> text Recall@1 (mnist_captions test), the learned scale(s) at the end, and the
seconds per run; plus a figure of the full-size (m = 128) training loss of every row. Writes
docs/image_text_ablation/<data>/{results.md,summary.json,loss_128.png}. `--data=scenes` trains
and retrieves on mnist_scenes (1-4 digits of two sizes on four backgrounds, every caption naming
all of it), where a caption carries many more bits than mnist_captions'.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import claims_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> (config arg, overrides). `steps` / `batch` multiply --steps / the batch size.
ROWS = {
    "standard": ("standard", {}),
    "mrl": ("", {}),
    "mrl_per_size_scale": ("", {"per_size_scale": True}),
    "mrl_full_half": ("", {"full_half": True}),
    "mrl_both": ("", {"per_size_scale": True, "full_half": True}),
    "standard_4x_steps": ("standard", {"steps": 4}),
    "mrl_4x_steps": ("", {"steps": 4}),
    "standard_batch512": ("standard", {"batch": 4}),
    "mrl_batch512": ("", {"batch": 4}),
}
DEFAULT_ROWS = "standard,mrl,mrl_per_size_scale,mrl_full_half,mrl_both"
DATA = {"captions": "mnist_captions", "scenes": "mnist_scenes"}


def metrics(data: str) -> dict[str, tuple[str, str]]:
  """{metric: (dataset, title)} of the tables."""
  pairs = DATA[data]
  return {"zeroshot_top1": ("mnist_colored", "Zero-shot top-1 (%), mnist_colored test"),
          "recall@1_t2i": (pairs, f"Text -> image Recall@1 (%), {pairs} test"),
          "recall@1_i2t": (pairs, f"Image -> text Recall@1 (%), {pairs} test")}


FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 3, "seeds")
flags.DEFINE_integer("steps", 600, "training steps of a 1x row")
flags.DEFINE_integer("width", 16, "the image tower's width (the config's 16)")
flags.DEFINE_enum("data", "captions", list(DATA), "the image-text pairs trained on: "
                  "mnist_captions, or mnist_scenes (captions with many bits)")
flags.DEFINE_string("rows", DEFAULT_ROWS, f"comma-separated rows of {list(ROWS)}")
flags.DEFINE_bool("quick", False, "a smoke run: the configs' runlocal size, 6 steps, one seed")
flags.DEFINE_string("workdir", None, "runs (default runs/image_text_ablation)")
flags.DEFINE_string("out", None, "results (default docs/image_text_ablation; --quick: "
                    "<workdir>/out)")
flags.DEFINE_string("data_dir", None, "TFDS data_dir")


def make_config(row: str, seed: int, steps: int, quick: bool, data_dir=None,
                data: str = "captions", width: int = 16):
  """configs/image_text_digits.py with the row's changes (the module docstring)."""
  from configs import image_text_digits  # pylint: disable=g-import-not-at-top
  from mrl_jax import nesting  # pylint: disable=g-import-not-at-top
  arg, changes = ROWS[row]
  steps *= changes.get("steps", 1)
  config = image_text_digits.get_config(
      ",".join(a for a in (arg, f"seed={seed}", f"steps={steps}", "runlocal" if quick else "",
                           "scenes" if data == "scenes" else "") if a))
  config.input.data_dir = data_dir
  if not quick:
    config.image_tower.width = width
  config.input.batch_size *= changes.get("batch", 1)
  config.contrastive.per_size_scale = changes.get("per_size_scale", False)
  if changes.get("full_half"):  # the smaller sizes share half the weight, the full size half
    n = len(nesting.parse(config.mrl.nesting, config.model.projection))
    config.mrl.weights = (1.0 / (n - 1),) * (n - 1) + (1.0,)
  # Only the sets the tables read: retrieval both ways and zero-shot.
  config.eval.image_text_sets = tuple(s for s in config.eval.image_text_sets
                                      if s.split(":")[0] in ("retrieval", "zeroshot"))
  if quick and config.eval.extra_sizes:
    config.eval.extra_sizes = (8, 16)
  config.update(eval_every_steps=0, checkpoint_every_steps=10**9, keep_checkpoints=1,
                log_every_steps=max(1, steps // 30))
  return config


def logged(workdir: str, size: int) -> tuple[tuple[list[int], list[float]], dict[str, float]]:
  """From the run's metrics.jsonl: (steps, train loss at `size`), and the learned scale(s)
  logged last ({"scale": s} or {"scale@m": s_m})."""
  steps, losses, scales = [], [], {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if f"train/loss@{size}" in record:
        steps.append(record["step"])
        losses.append(record[f"train/loss@{size}"])
      scales.update({k.split("/", 1)[1]: v for k, v in record.items()
                     if k.startswith("train/scale")})
  return (steps, losses), scales


def norm_share(run_dir: str, config, size: int, count: int = 500) -> dict[str, float]:
  """Mean share of |z|^2 in z[:size] over `count` test pairs, per tower: how much of the
  full-size cosine the first `size` dimensions decide (size / d when spread evenly)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mrl_jax import inference  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import builtin  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(config.input.dataset, split=f"test[:{count}]",
                            data_dir=config.input.data_dir or builtin.default_data_dir())
  examples = [source[i] for i in range(len(source))]
  text = lambda c: c.decode() if isinstance(c, bytes) else str(c)
  model = inference.load(run_dir)
  share = {}
  for tower, inputs in (("image", np.stack([e["image"] for e in examples])),
                        ("text", [text(e["captions"][0]) for e in examples])):
    z = np.asarray(model.embed(inputs), np.float64) ** 2
    share[tower] = float(np.mean(z[:, :size].sum(1) / z.sum(1)))
  return share


def plot(path: str, curves: dict[str, list[tuple[list[int], list[float]]]], size: int) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, (row, runs) in enumerate(curves.items()):
    n = min(len(s) for s, _ in runs)
    steps = runs[0][0][:n]
    losses = np.asarray([l[:n] for _, l in runs])
    mean = losses.mean(0)
    ax.plot(steps, mean, "--" if row.startswith("standard") else "-", color=f"C{i}",
            label=f"{row} ({len(runs)} seeds)")
    if len(runs) > 1:
      ax.fill_between(steps, losses.min(0), losses.max(0), color=f"C{i}", alpha=0.15)
  ax.set_xlabel("step")
  ax.set_ylabel(f"train contrastive loss at m = {size} (both directions)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  rows = [r for r in FLAGS.rows.split(",") if r]
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    print(f"--rows: unknown {unknown}; allowed: {list(ROWS)}", file=sys.stderr)
    return 2
  if len(set(rows)) < len(rows):  # a repeated row would count its runs twice as seeds
    print(f"--rows={FLAGS.rows}: a row is repeated; name each once", file=sys.stderr)
    return 2
  if FLAGS.seeds < 1:
    print(f"--seeds={FLAGS.seeds}; allowed: 1 or more", file=sys.stderr)
    return 2
  seeds = 1 if FLAGS.quick else FLAGS.seeds
  steps = 6 if FLAGS.quick else FLAGS.steps
  workdir = FLAGS.workdir or os.path.join(REPO, "runs", "image_text_ablation")
  out = FLAGS.out or (os.path.join(workdir, "out") if FLAGS.quick else
                      os.path.join(REPO, "docs", "image_text_ablation", FLAGS.data))
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  tables = {metric: {} for metric in metrics(FLAGS.data)}
  scales, seconds, curves, runs, shares = {}, {}, {}, {}, {}
  full = None
  for seed in range(seeds):
    for row in rows:
      config = make_config(row, seed, steps, FLAGS.quick, FLAGS.data_dir, FLAGS.data,
                           FLAGS.width)
      run = f"{row}_seed{seed}"
      # Every setting its own folder: finished runs are reused by name.
      setting = "runlocal" if FLAGS.quick else f"width{FLAGS.width}"
      run_dir = os.path.join(workdir, f"{FLAGS.data}_steps{steps}_{setting}", run)
      results, secs = claims_lib.train_eval(config, run_dir)
      full = config.model.projection
      seconds.setdefault(row, []).append(secs)
      runs[run] = {k: v["sizes"] for k, v in results.items()}
      curve, last_scales = logged(run_dir, full)
      curves.setdefault(row, []).append(curve)
      for tower, value in norm_share(run_dir, config, 8).items():
        shares.setdefault(row, {}).setdefault(tower, []).append(value)
      for name, value in last_scales.items():
        scales.setdefault(row, {}).setdefault(name, []).append(value)
      for metric, (dataset, _) in metrics(FLAGS.data).items():
        for m, values in results[dataset]["sizes"].items():
          if metric in values:
            tables[metric].setdefault(row, {}).setdefault(int(m), []).append(values[metric])
      print(f"{run}: {secs:.0f} s", flush=True)
  sizes = sorted({m for table in tables.values() for v in table.values() for m in v})
  text = ["# Why MRL loses at the full size: an ablation (experiments/image_text_ablation.py)",
          "", f"`python experiments/image_text_ablation.py --data={FLAGS.data} "
          f"--rows={','.join(rows)} "
          f"--seeds={seeds} --steps={steps} --width={FLAGS.width}`{' --quick' if FLAGS.quick else ''}: "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; mean ± std over seeds "
          f"({seeds}). Setting: configs/image_text_digits.py, image tower width "
          f"{FLAGS.width if not FLAGS.quick else 'runlocal'}, batch 128 unless the row says "
          "otherwise.",
          ""]
  for metric, (_, title) in metrics(FLAGS.data).items():
    text += [f"## {title}", "", claims_lib.table(tables[metric], sizes), ""]
  text += ["## Learned scale (exp t') at the end, share of |z|² in z[:8] (test pairs; "
           f"{800 / full:.0f}% when spread evenly), seconds per run (train + eval)", "",
           "| row | scale(s) | z[:8] share, image | text | seconds |", "|---|---|---|---|---|"]
  for row in rows:
    cells = ", ".join(f"{name}: {claims_lib.pm(v)}" for name, v in sorted(
        scales.get(row, {}).items(), key=lambda kv: (len(kv[0]), kv[0])))
    image, text_share = (claims_lib.pm(np.multiply(shares[row][t], 100))
                         for t in ("image", "text"))
    text.append(f"| {row} | {cells} | {image}% | {text_share}% | "
                f"{claims_lib.pm(seconds[row])} |")
  text += ["", f"![full-size training loss](loss_{full}.png)", ""]
  os.makedirs(out, exist_ok=True)
  plot(os.path.join(out, f"loss_{full}.png"), curves, full)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(text))
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"rows": rows, "seeds": seeds, "steps": steps, "seconds": seconds,
               "scales": scales, "norm_share@8": shares, "runs": runs}, f, indent=1,
              sort_keys=True)
  print("\n".join(text))
  return 0


if __name__ == "__main__":
  app.run(main)
