r"""Trains a Matryoshka (MRL / MRL-E / FF-m) model.

  python train.py --config=configs/digits_resnet_mrl.py --workdir=runs/digits
  python train.py --config=configs/resnet50_imagenet.py:mrl --workdir=... --dry_run
  python train.py --config=... --workdir=... --config.input.batch_size=4096

Every host of a TPU pod / GPU cluster runs the same command (see README "Scaling"). Rerunning a
command resumes from the workdir's latest checkpoint. Config errors exit with code 2 and one line.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summaries.")
flags.DEFINE_bool("dry_run", False, "Build the model from the config, print the parameter table, "
                  "write <workdir>/model_summary.json, load no data and exit.")
flags.DEFINE_bool("overwrite", False, "Delete a previous run in --workdir whose config differs.")
flags.DEFINE_bool("verbose", False, "Show tracebacks for config errors.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.DEFINE_string("local_device_ids", None, "Multi-host: comma-separated local GPU ids this "
                    "process drives (default: decided from the launcher, README 'Scaling').")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Imported here so that --help and flag errors do not pay for importing jax/tf.
  from mrl_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(lambda: _train(FLAGS.config), verbose=FLAGS.verbose)


def _train(config):
  from mrl_jax import distributed  # pylint: disable=g-import-not-at-top
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
  if FLAGS.dry_run:
    train_lib.dry_run(config, FLAGS.workdir)
    return 0
  distributed.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                    FLAGS.local_device_ids)
  summary = train_lib.train_and_evaluate(config, FLAGS.workdir,
                                         overwrite=FLAGS.overwrite)
  logging.info("summary: %s", summary)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=__import__("mrl_jax.cli").cli.parse_flags))
