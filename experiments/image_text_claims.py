r"""The paper's ALIGN claim at small scale: a Matryoshka dual encoder against truncating a
non-MRL one trained the same way, on the built-in captioned digits.

  python experiments/image_text_claims.py            # ~25 min on 2 CPU cores; --seeds=N

For each seed, configs/image_text_digits.py trained with the Matryoshka CLIP loss at 8, 16,
..., 128 and with the full size only (`standard`, evaluated at every size by truncation);
zero-shot top-1 on mnist_colored and text -> image / image -> text Recall@1 on mnist_captions
at every size. Writes docs/image_text_claims/results.md and summary.json.
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

from experiments import claims_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 2, "seeds")
flags.DEFINE_integer("steps", 600, "training steps")
flags.DEFINE_string("workdir", None, "runs (default runs/image_text_claims)")
flags.DEFINE_string("out", None, "results (default docs/image_text_claims)")
flags.DEFINE_string("data_dir", None, "TFDS data_dir")


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from configs import image_text_digits  # pylint: disable=g-import-not-at-top
  workdir = FLAGS.workdir or os.path.join(REPO, "runs", "image_text_claims")
  out = FLAGS.out or os.path.join(REPO, "docs", "image_text_claims")
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  metrics = {"zeroshot_top1": ("mnist_colored", {}), "recall@1_t2i": ("mnist_captions", {}),
             "recall@1_i2t": ("mnist_captions", {}), "cosine_gap": ("mnist_captions", {})}
  summary = {"seconds": {}, "runs": {}}
  for seed in range(FLAGS.seeds):
    for name, arg in (("MRL", ""), ("standard (truncated)", "standard,")):
      config = image_text_digits.get_config(f"{arg}seed={seed},steps={FLAGS.steps}")
      config.input.data_dir = FLAGS.data_dir
      config.update(eval_every_steps=0, checkpoint_every_steps=10**9, keep_checkpoints=1,
                    log_every_steps=max(1, FLAGS.steps // 4))
      run = f"{'mrl' if name == 'MRL' else 'standard'}_seed{seed}"
      results, seconds = claims_lib.train_eval(config, os.path.join(workdir, run))
      summary["seconds"][run] = seconds
      summary["runs"][run] = {k: v["sizes"] for k, v in results.items()}
      for metric, (dataset, table) in metrics.items():
        for m, values in results[dataset]["sizes"].items():
          if metric in values:
            table.setdefault(name, {}).setdefault(int(m), []).append(values[metric])
      print(f"{run}: {seconds:.0f} s", flush=True)
  sizes = sorted({m for _, table in metrics.values() for v in table.values() for m in v})
  text = ["# ALIGN at small scale (experiments/image_text_claims.py)", "",
          f"`python experiments/image_text_claims.py`: {FLAGS.seeds} seeds, {FLAGS.steps} "
          f"steps; {jax.device_count()} x {jax.devices()[0].device_kind}; mean ± std over "
          "seeds.", ""]
  titles = {"zeroshot_top1": "Zero-shot top-1 (%) on mnist_colored test",
            "recall@1_t2i": "Text -> image Recall@1 (%) on mnist_captions test",
            "recall@1_i2t": "Image -> text Recall@1 (%) on mnist_captions test",
            "cosine_gap": "Cosine gap x 100 (matched - random pairs), mnist_captions test"}
  for metric, (_, table) in metrics.items():
    text += [f"## {titles[metric]}", "", claims_lib.table(table, sizes), ""]
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(text))
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  print("\n".join(text))
  return 0


if __name__ == "__main__":
  app.run(main)
