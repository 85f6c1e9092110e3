"""Format conversion (mrl_jax.data.prepare): both orders, every record, nothing replaced on a
short copy. On the built-in digits builder: 1,438 train records in one shard, so a shard spans
several of the conversion's 256-record reads."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from mrl_jax.data import builtin  # noqa: F401  (registers the built-in builders)
from mrl_jax.data import pipeline
from mrl_jax.data import prepare
from mrl_jax.data import preprocess
from mrl_jax.errors import ConfigError
from tests.conftest import REPO
from tests.conftest import load_config
from tests.conftest import process_env


def _records(builder, file_format):
  """{split: sorted serialized records} read straight from a format's shard files."""
  out = {}
  shards = prepare._shard_files(builder, file_format)  # pylint: disable=protected-access
  for path, split, _ in shards:
    if file_format == "tfrecord":
      records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    else:
      reader = array_record_module.ArrayRecordReader(path)
      records = reader.read(list(range(reader.num_records())))
      reader.close()
    out.setdefault(split, []).extend(records)
  return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("first, then", [("tfrecord", "array_record"),
                                         ("array_record", "tfrecord")])
def test_a_format_is_added_to_a_prepared_copy_in_either_order(tmp_path, first, then):
  """A copy prepared in one format gets the other with --formats=<the other> alone (it used to
  end in TFDS's 'File format is already set' traceback unless the existing format came
  first): every record of every split, byte for byte, and both readers read the same eval
  batches from it."""
  data_dir = str(tmp_path)
  prepare.prepare("sklearn_digits", data_dir, formats=(first,))
  builder = tfds.builder("sklearn_digits", data_dir=data_dir)
  assert prepare.prepared_formats(builder) == {first}
  assert builder.info.splits["train"].shard_lengths == [1438]  # > one 256-record read
  assert prepare.convert(builder, then) == 1438 + 359
  builder = tfds.builder("sklearn_digits", data_dir=data_dir)
  assert prepare.prepared_formats(builder) == {first, then}
  assert prepare.prepare("sklearn_digits", data_dir, formats=(then, first)) == builder.data_dir
  source, target = _records(builder, first), _records(builder, then)
  assert {k: len(v) for k, v in target.items()} == {"train": 1438, "test": 359}
  assert source == target
  config = load_config("configs/digits_resnet_mrl.py")
  config.input.data_dir = data_dir
  batches = {}
  for reader in ("grain", "tf_data"):
    config.input.reader = reader
    opened = pipeline.open_source(config.input)
    batches[reader] = list(pipeline.make_reader(config.input, opened).eval_batches(
        "test", local_batch=128, num_batches=3, process_index=0, process_count=1,
        preprocess=preprocess.from_config(config.input, train=False, channels=1)))
  for a, b in zip(batches["grain"], batches["tf_data"]):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_a_conversion_that_comes_up_short_replaces_nothing(tmp_path, monkeypatch):
  """A copy that writes one record fewer than dataset_info.json says a shard holds (a chunk
  boundary bug, a full disk): one line naming the shard and both counts; no file of the new
  format is left, dataset_info.json still lists only the first format."""
  data_dir = str(tmp_path)
  prepare.prepare("sklearn_digits", data_dir, formats=("array_record",))
  builder = tfds.builder("sklearn_digits", data_dir=data_dir)
  copy = prepare._copy_shard  # pylint: disable=protected-access

  def short(src, tmp, source_format):
    return copy(src, tmp, source_format) - ("train" in src)

  monkeypatch.setattr(prepare, "_copy_shard", short)
  with pytest.raises(ConfigError, match=r"converting sklearn_digits-train.array_record-00000-of-"
                                        r"00001 to tfrecord gave 1437 records but "
                                        r"dataset_info.json has 1438 for it; nothing was"):
    prepare.convert(builder, "tfrecord")
  assert not [f for f in os.listdir(builder.data_dir) if "tfrecord" in f]
  assert prepare.prepared_formats(tfds.builder("sklearn_digits", data_dir=data_dir)) == {
      "array_record"}


def test_the_second_format_reads_with_plain_tfds(tmp_path):
  """docs/data.md's recipe: TFDS opens a copy in the format it was built in (file_format=<the
  other> refuses it); one builder per format, switched with set_file_format, reads each, for a
  copy built in either format first."""
  for first, then in (("array_record", "tfrecord"), ("tfrecord", "array_record")):
    data_dir = str(tmp_path / first)
    prepare.prepare("sklearn_digits", data_dir, formats=(first, then))
    with pytest.raises(Exception, match="File format is already set"):
      tfds.builder("sklearn_digits", data_dir=data_dir, file_format=then)

    def opened(file_format):
      builder = tfds.builder("sklearn_digits", data_dir=data_dir)  # pylint: disable=cell-var-from-loop
      builder.info.set_file_format(file_format, override=True, override_if_initialized=True)
      return builder

    labels = [int(x["label"]) for x in opened("tfrecord").as_dataset(split="test")]
    random_access = opened("array_record").as_data_source(split="test")
    assert len(labels) == len(random_access) == 359
    assert sorted(labels) == sorted(int(x["label"]) for x in random_access)


BUILDER = '''
import tensorflow_datasets as tfds


class MyPairs(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(300)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"text": f"text {i}", "label": i % 2}
'''


def test_a_builder_of_ones_own_is_prepared_through_module(tmp_path):
  """--module imports the module that registers a user's builder (`tfds build` needs
  apache-beam): both formats, exit 0; without it, the name is unknown (one line, exit 2)."""
  (tmp_path / "my_pairs_module.py").write_text(BUILDER)
  env = process_env(1, PYTHONPATH=f"{REPO}:{tmp_path}")
  run = lambda *a: subprocess.run(
      [sys.executable, "-m", "mrl_jax.data.prepare", "--dataset=my_pairs",
       f"--data_dir={tmp_path / 'tfds'}", *a], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  out = run()
  assert out.returncode == 2 and out.stderr.strip() == (
      "error: unknown TFDS dataset 'my_pairs' (--dataset)")
  out = run("--module=my_pairs_module")
  assert out.returncode == 0, out.stderr[-2000:]
  builder = tfds.builder("my_pairs", data_dir=str(tmp_path / "tfds"))  # read from its files
  assert prepare.prepared_formats(builder) == {"array_record", "tfrecord"}
  assert builder.info.splits["train"].num_examples == 300
