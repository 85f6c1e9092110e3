"""Full-scale configs run as is: ImageNet ResNet-50 and a JFT-style ViT, on offline mock data."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mrl_jax import train_lib
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.evaluation import evaluate
from tests.conftest import load_config
from tests.data_test import write_mock_metadata


class _UserBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder the user prepares elsewhere: JPEG images and a 10-class label under LABEL_KEY
  (tests fill it with tfds.testing.mock_data)."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None
  LABEL_KEY = "label"

  def _label_feature(self):
    return tfds.features.ClassLabel(num_classes=10)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        self.LABEL_KEY: self._label_feature()}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError("prepared by the user; tests use tfds.testing.mock_data")

  def _generate_examples(self):
    raise NotImplementedError


class JftStyleTest(_UserBuilder):
  """Stands for a user's private JFT-style builder: several class ids per image (`labels`)."""
  LABEL_KEY = "labels"

  def _label_feature(self):
    return tfds.features.Sequence(tfds.features.ClassLabel(num_classes=10))


class Imagenet21k(_UserBuilder):
  """Stands for the ImageNet-21k builder big_vision uses (not in public TFDS): one split, full."""


def _run(config, workdir):
  summary = train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:8])
  assert summary["final_step"] == config.total_steps
  assert json.load(open(os.path.join(workdir, "summary.json")))["num_devices"] == 8
  return summary


@pytest.mark.slow
def test_resnet50_imagenet_config_trains_and_evaluates_imagenet_real(tmp_path):
  """The paper config on mock ImageNet, then eval.py's ImageNet-ReaL split (the default in the
  full config): multi-label `real_label`, images without one left out, prec@1 per size."""
  mock_dir = str(tmp_path / "tfds")
  write_mock_metadata(mock_dir, "imagenet2012", ("train", "validation"), num_examples=24)
  write_mock_metadata(mock_dir, "imagenet2012_real", ("validation",), num_examples=24)
  assert load_config("configs/resnet50_imagenet.py:mrl").eval.splits == (
      "imagenet2012_real:validation",)
  config = load_config("configs/resnet50_imagenet.py:mrl,runlocal")
  config.input.data_dir = mock_dir
  config.total_steps = 2
  with tfds.testing.mock_data(num_examples=24, data_dir=mock_dir):
    summary = _run(config, str(tmp_path / "run"))
    assert set(summary["eval"]) == {"8", "16", "32", "64", "128", "256"}
    real = pipeline.open_source(config.input, dataset="imagenet2012_real",
                                label_key="real_label")
    reader = pipeline.make_reader(config.input, real)
    labels = np.concatenate([b["label"] for b in reader.eval_batches(
        "validation", local_batch=24, num_batches=1, process_index=0, process_count=1,
        preprocess=preprocess.from_config(config.input, train=False, channels=3))])
    raw = [np.asarray(ex["real_label"]) for ex in tfds.data_source(
        "imagenet2012_real", split="validation", data_dir=mock_dir)]
    # The reader's multi-hot rows are the raw label lists, in dataset order.
    want = np.zeros((24, 1000), np.uint8)
    for i, ids in enumerate(raw):
      want[i, ids] = 1
    np.testing.assert_array_equal(labels, want)
    config.eval.update(splits=("imagenet2012_real:validation",), adaptive_retrieval=False,
                       adaptive_classification=False, extra_sizes=(), retrieval_k=(10,))
    results = evaluate.evaluate_checkpoint(config, str(tmp_path / "run"),
                                           devices=jax.devices()[:8])["imagenet2012_real"]
  unlabelled = sum(len(ids) == 0 for ids in raw)
  assert unlabelled < 24
  assert results["multi_label"] and results["num_unlabelled_excluded"] == unlabelled
  assert results["num_queries"] == 24 - unlabelled
  for m in ("8", "256"):
    assert set(results["sizes"][m]) >= {"prec@1", "class_map", "knn1_top1", "map@10"}
    assert 0.0 <= results["sizes"][m]["prec@1"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["grain", "tf_data"])
def test_jft_style_multi_label_builder_trains_with_the_sigmoid_loss(tmp_path, reader):
  """A builder with a Sequence(ClassLabel) label: multi-hot targets, sigmoid_xent per size."""
  mock_dir = str(tmp_path / "tfds")
  write_mock_metadata(mock_dir, "jft_style_test", ("train", "validation"), num_examples=24)
  config = load_config(f"configs/vit_b16_jft.py:mrl,runlocal,dataset=jft_style_test,"
                       f"label_key=labels,reader={reader}")
  assert config.loss.name == "sigmoid_xent" and config.mrl.head_bias_init == -10.0
  config.input.data_dir = mock_dir
  with tfds.testing.mock_data(num_examples=24, data_dir=mock_dir):
    assert pipeline.open_source(config.input).multi_label
    summary = _run(config, str(tmp_path / "run"))
  assert set(summary["eval"]) == {"12", "24", "48", "96", "192"}
  assert all(set(v) == {"prec1"} for v in summary["eval"].values())
  assert summary["dataset"] == "jft_style_test"
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  first = next(r for r in records if "train/loss" in r)
  # Sigmoid CE summed over 10 classes, 5 sizes, heads at bias -10: ~5 x (labels x 10).
  assert 10 < first["train/loss@12"] < 100 and "train/prec1@12" in first


@pytest.mark.slow
def test_vit_imagenet21k_config_trains_and_evaluates_on_slices_of_full(tmp_path):
  """ImageNet-21k has only `full`: train on full[16:], evaluate on full[:16] (runlocal sizes of
  big_vision's full[51200:] / full[:25600])."""
  mock_dir = str(tmp_path / "tfds")
  write_mock_metadata(mock_dir, "imagenet21k", ("full",), num_examples=48)
  config = load_config("configs/vit_b16_imagenet21k.py:mrl,runlocal")
  assert (config.input.train_split, config.input.eval_split) == ("full[16:]", "full[:16]")
  assert load_config("configs/vit_b16_imagenet21k.py:mrl").input.train_split == "full[51200:]"
  config.input.data_dir = mock_dir
  with tfds.testing.mock_data(num_examples=48, data_dir=mock_dir):
    source = pipeline.open_source(config.input)
    assert (source.num_examples("full[16:]"), source.num_examples("full[:16]")) == (32, 16)
    summary = _run(config, str(tmp_path / "run"))
  assert summary["eval_split"] == "full[:16]"
