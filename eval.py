r"""Evaluates a trained Matryoshka model, or saved features, at every nesting size.

  python eval.py --config=configs/digits_resnet_mrl.py --workdir=runs/digits
  python eval.py --config=... --workdir=... --checkpoint_step=2500 --config.eval.flip_tta=True
  python eval.py --embeddings=DIR --sizes=8,16,32,2048 --out=OUTDIR   # features of any model
  python eval.py --config=... --workdir=... --export_embeddings=DIR [--export_dtype=float16]

Writes results.json, results.csv and accuracy_vs_dim.png to <workdir>/eval/<dataset>/ (or to
--out). Metric definitions: README "Evaluation" and mrl_jax/evaluation/metrics.py.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from mrl_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to evaluate (default: the latest).")
flags.DEFINE_string("embeddings", None, "Embeddings-only mode: folder with database_X.npy, "
                    "database_y.npy, queries_X.npy, queries_y.npy.")
flags.DEFINE_list("sizes", None, "Embeddings-only mode: sizes, e.g. 8,16,32.")
flags.DEFINE_string("out", None, "Embeddings-only mode: output folder.")
flags.DEFINE_list("knn_k", ["1", "10"], "Embeddings-only mode: k of the k-NN accuracies.")
flags.DEFINE_list("retrieval_k", ["10", "25", "50", "100"],
                  "Embeddings-only mode: k of mAP@k etc.")
flags.DEFINE_integer("query_block", 1024, "Embeddings-only mode: queries per search block.")
flags.DEFINE_integer("database_block", 65536, "Embeddings-only mode: database rows per block.")
flags.DEFINE_integer("database_chunk_rows", None, "Embeddings-only mode: database rows held on "
                     "the devices at once (default: all); smaller streams a large database.")
flags.DEFINE_string("export_embeddings", None, "Checkpoint mode: write database_X.npy, "
                    "database_y.npy, queries_X.npy, queries_y.npy (what --embeddings reads) to "
                    "this folder instead of evaluating.")
flags.DEFINE_integer("export_size", None, "With --export_embeddings: keep the first m dims.")
flags.DEFINE_string("export_dtype", "float32", "With --export_embeddings: float32 or float16.")
cli.define_run_flags()


def main(argv):
  del argv
  return cli.run(_evaluate, verbose=FLAGS.verbose)


def _evaluate():
  from mrl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  if FLAGS.embeddings:
    if not FLAGS.sizes or not FLAGS.out:
      raise ConfigError("embeddings-only mode needs --sizes (e.g. 8,16,32) and --out")
    results = evaluate.evaluate_embeddings(
        FLAGS.embeddings, cli.ints(FLAGS.sizes, "sizes"), FLAGS.out,
        knn_ks=cli.ints(FLAGS.knn_k, "knn_k"), retrieval_ks=cli.ints(FLAGS.retrieval_k,
                                                                      "retrieval_k"),
        query_block=FLAGS.query_block, database_block=FLAGS.database_block,
        database_chunk_rows=FLAGS.database_chunk_rows)
    _print(results)
    return 0
  if FLAGS.config is None or FLAGS.workdir is None:
    raise ConfigError("give --config and --workdir (checkpoint mode) or --embeddings, --sizes "
                      "and --out (embeddings-only mode)")
  cli.start_processes()
  if FLAGS.export_embeddings:
    rows = evaluate.export_embeddings(FLAGS.config, FLAGS.workdir, FLAGS.export_embeddings,
                                      size=FLAGS.export_size, dtype=FLAGS.export_dtype,
                                      checkpoint_step=FLAGS.checkpoint_step)
    print(f"wrote {', '.join(f'{k} ({n} rows)' for k, n in rows.items())} to "
          f"{FLAGS.export_embeddings}")
    return 0
  for results in evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.workdir,
                                              checkpoint_step=FLAGS.checkpoint_step).values():
    _print(results)
  return 0


def _print(results):
  print(f"{results['dataset']} ({results['split']}): {results['num_queries']} queries, "
        f"{results['num_database']} database")
  for size, m in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
    shown = {k: v for k, v in m.items() if k in ("linear_top1", "prec@1", "knn1_top1",
                                                  "map@10")}
    print(f"  m={size:>5}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
