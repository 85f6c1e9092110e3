r"""Trains a Matryoshka (MRL / MRL-E / FF-m) model.

  python train.py --config=configs/digits_resnet_mrl.py --workdir=runs/digits
  python train.py --config=configs/resnet50_imagenet.py:mrl --workdir=... --dry_run
  python train.py --config=... --workdir=... --config.input.batch_size=4096

Every host of a TPU pod / GPU cluster runs the same command (docs/scaling.md). Rerunning a
command resumes from the workdir's latest checkpoint. Config errors exit with code 2 and one line.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mrl_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summaries.")
flags.DEFINE_bool("dry_run", False, "Build the model from the config, print the parameter table, "
                  "write <workdir>/model_summary.json, load no data and exit.")
flags.DEFINE_bool("overwrite", False, "Delete a previous run in --workdir whose config differs.")
cli.define_run_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  return cli.run(lambda: _train(FLAGS.config), verbose=FLAGS.verbose)


def _train(config):
  # Imported here so that --help and flag errors do not pay for importing jax/tf.
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
  if FLAGS.dry_run:
    train_lib.dry_run(config, FLAGS.workdir)
    return 0
  cli.start_processes()
  summary = train_lib.train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  logging.info("summary: %s", summary)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
