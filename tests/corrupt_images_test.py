"""A corrupt JPEG in a shard: skipped and counted by both readers, in training and evaluation."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mrl_jax.data import builtin
from mrl_jax.data import photos
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.errors import DataError
from tests.conftest import load_config

N = 20
CORRUPT = {3: "truncated", 11: "garbage"}  # record index -> how it is broken


def _files():
  out = []
  for i, data in enumerate(photos.jpegs(N)):
    if CORRUPT.get(i) == "truncated":  # a cut-off download
      data = data[:len(data) // 3]
    elif CORRUPT.get(i) == "garbage":  # a valid JPEG header, then noise
      data = data[:40] + np.random.default_rng(i).bytes(4000)
    out.append(data)
  return out


class CorruptPhotos(tfds.core.GeneratorBasedBuilder):
  """20 photographs, two of them unreadable; label = record index (to identify records)."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=N)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, data in enumerate(_files()):
      yield i, {"image": data, "label": i}


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("corrupt"))
  builtin.prepare_both_formats(CorruptPhotos, path)
  return path


def _reader(data_dir, reader):
  config = load_config("configs/resnet50_imagenet.py:mrl,runlocal")
  config.input.update(dataset="corrupt_photos", data_dir=data_dir, reader=reader,
                      image_size=32)
  config.input.pp_eval.update(resize_size=36)
  source = pipeline.open_source(config.input)
  return config, pipeline.make_reader(config.input, source)


@pytest.mark.parametrize("reader", ["grain", "tf_data"])
def test_eval_skips_and_counts_each_corrupt_image(corrupt_dir, reader):
  config, r = _reader(corrupt_dir, reader)
  pp = preprocess.from_config(config.input, train=False, channels=3)
  batches = list(r.eval_batches("train", local_batch=8, num_batches=3, preprocess=pp,
                                process_index=0, process_count=1))
  assert r.skipped == len(CORRUPT)
  mask = np.concatenate([b["mask"] for b in batches]) > 0
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert sorted(labels) == sorted(set(range(N)) - set(CORRUPT))  # every readable one, once
  assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)


@pytest.mark.parametrize("reader", ["grain", "tf_data"])
def test_training_skips_and_counts_corrupt_images_without_stopping(corrupt_dir, reader):
  config, r = _reader(corrupt_dir, reader)
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=1)
  stream = r.train_batches("train", local_batch=8, start_batch=0, seed=0, train_preprocess=tp,
                           process_index=0, process_count=1, shuffle_buffer=N)
  batches = [next(stream) for _ in range(10)]  # 80 examples: 4 epochs
  labels = np.concatenate([b["label"] for b in batches])
  assert not set(labels) & set(CORRUPT)  # no example of a corrupt record survives
  assert set(labels) == set(range(N)) - set(CORRUPT)
  assert 2 * len(CORRUPT) <= r.skipped <= 5 * len(CORRUPT)  # each met once per epoch
  assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)


def test_a_batch_with_no_readable_image_is_one_line(corrupt_dir):
  config, r = _reader(corrupt_dir, "grain")
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=1)
  src = r.source.builder("array_record").as_data_source(
      split="train", decoders={"image": tfds.decode.SkipDecoding()})
  records = [(i, src.data_source[i]) for i in range(N) if src[i]["label"] in CORRUPT]
  make = pipeline._GrainBatch(r.source, 0, train_preprocess=tp)  # pylint: disable=protected-access
  with pytest.raises(DataError, match=r"no image of batch 0 \(2 records\) can be decoded"):
    make(0, records)
