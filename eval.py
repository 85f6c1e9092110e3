r"""Evaluates a trained Matryoshka model, or saved features, at every nesting size.

  python eval.py --config=configs/digits_resnet_mrl.py --workdir=runs/digits
  python eval.py --config=... --workdir=... --checkpoint_step=2500 --config.eval.flip_tta=True
  python eval.py --embeddings=DIR --sizes=8,16,32,2048 --out=OUTDIR   # features of any model
  python eval.py --database=D/1K_train_mrl1_e0_ffNone --queries=D/1K_val_mrl1_e0_ffNone \
      --sizes=16,2048 --shortlist_sizes=16 --shortlist_k=200 --funnels=16:128,2048:200,50 \
      --database_chunk_rows=1000000 --out=OUTDIR   # the official dumps, streamed
  python eval.py --config=... --workdir=... --export_embeddings=DIR [--export_dtype=float16]

Writes results.json, results.csv and accuracy_vs_dim.png to <workdir>/eval/<dataset>/ (or to
--out). Metric definitions: docs/training_and_evaluation.md "Evaluation" and mrl_jax/evaluation/metrics.py.
"""

import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from mrl_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to evaluate (default: the latest).")
flags.DEFINE_string("embeddings", None, "Embeddings-only mode: folder with database_X.npy, "
                    "database_y.npy, queries_X.npy, queries_y.npy.")
flags.DEFINE_string("database", None, "Embeddings-only mode, instead of --embeddings: PREFIX of "
                    "PREFIX-X.npy / PREFIX-y.npy (the official code's dumps).")
flags.DEFINE_string("queries", None, "With --database: the queries' PREFIX.")
flags.DEFINE_list("shortlist_sizes", [], "Embeddings-only mode: adaptive retrieval's shortlist "
                  "sizes Ds (as config.eval.shortlist_sizes); empty: no adaptive retrieval.")
flags.DEFINE_list("rerank_sizes", [], "Embeddings-only mode: rerank sizes Dr (default: d).")
flags.DEFINE_list("shortlist_k", ["200"], "Embeddings-only mode: shortlist lengths K.")
flags.DEFINE_multi_string("funnels", [], "Embeddings-only mode: a funnel Ds:Dr1,Dr2:K1,K2 "
                          "(repeatable), e.g. 16:128,2048:200,50.")
flags.DEFINE_list("shortlist_engines", ["exact"], "Embeddings-only mode: exact and/or hnsw.")
flags.DEFINE_list("sizes", None, "Embeddings-only mode: sizes, e.g. 8,16,32.")
flags.DEFINE_string("out", None, "Embeddings-only mode: output folder.")
flags.DEFINE_list("knn_k", ["1", "10"], "Embeddings-only mode: k of the k-NN accuracies.")
flags.DEFINE_list("retrieval_k", ["10", "25", "50", "100"],
                  "Embeddings-only mode: k of mAP@k etc.")
flags.DEFINE_integer("query_block", 1024, "Embeddings-only mode: queries per search block.")
flags.DEFINE_integer("database_block", 4096, "Embeddings-only mode: database rows per block.")
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


def _print(results):
  from mrl_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  report.print_results(results)


def _evaluate():
  from mrl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  if FLAGS.embeddings or FLAGS.database or FLAGS.queries:
    from mrl_jax.evaluation import embeddings  # pylint: disable=g-import-not-at-top
    if not FLAGS.sizes or not FLAGS.out:
      raise ConfigError("embeddings-only mode needs --sizes (e.g. 8,16,32) and --out")
    location = embeddings.locate(FLAGS.embeddings, database=FLAGS.database,
                                 queries=FLAGS.queries)
    results = evaluate.evaluate_embeddings(
        location, cli.ints(FLAGS.sizes, "sizes"), FLAGS.out, adaptive=_adaptive_flags(),
        knn_ks=cli.ints(FLAGS.knn_k, "knn_k"), retrieval_ks=cli.ints(FLAGS.retrieval_k,
                                                                      "retrieval_k"),
        query_block=FLAGS.query_block, database_block=FLAGS.database_block,
        database_chunk_rows=FLAGS.database_chunk_rows)
    _print(results)
    return 0
  if FLAGS.config is None or FLAGS.workdir is None:
    raise ConfigError("give --config and --workdir (checkpoint mode) or --embeddings (or "
                      "--database and --queries), --sizes and --out (embeddings-only mode)")
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


def _adaptive_flags():
  """config.eval's adaptive-retrieval fields from the flags (None: none asked for)."""
  from mrl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if not FLAGS.shortlist_sizes and not FLAGS.funnels:
    return None
  funnels = []
  for text in FLAGS.funnels:
    try:
      ds, drs, ks = text.split(":")
      funnels.append((int(ds), tuple(int(d) for d in drs.split(",")),
                      tuple(int(k) for k in ks.split(","))))
    except ValueError:
      raise ConfigError(f"--funnels={text!r}; allowed: Ds:Dr1,Dr2,...:K1,K2,... (e.g. "
                        "16:128,2048:200,50)") from None
  return ml_collections.ConfigDict(dict(
      shortlist_sizes=tuple(cli.ints(FLAGS.shortlist_sizes, "shortlist_sizes")),
      rerank_sizes=tuple(cli.ints(FLAGS.rerank_sizes, "rerank_sizes")),
      shortlist_k=tuple(cli.ints(FLAGS.shortlist_k, "shortlist_k")), funnels=tuple(funnels),
      shortlist_engines=tuple(FLAGS.shortlist_engines)))  # HNSW: ann.HnswParams' defaults


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
