"""Full-scale configs run as is: ImageNet ResNet-50 and a JFT-style ViT, on offline mock data."""

import json
import os

import jax
import pytest
import tensorflow_datasets as tfds

from mrl_jax import train_lib
from mrl_jax.data import pipeline
from tests.conftest import load_config
from tests.data_test import write_mock_metadata


class _UserBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder the user prepares elsewhere: JPEG images and a 10-class label under LABEL_KEY
  (tests fill it with tfds.testing.mock_data)."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None
  LABEL_KEY = "label"

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        self.LABEL_KEY: tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError("prepared by the user; tests use tfds.testing.mock_data")

  def _generate_examples(self):
    raise NotImplementedError


class JftStyleTest(_UserBuilder):
  """Stands for a user's private JFT-style builder (its label feature named `labels`)."""
  LABEL_KEY = "labels"


class Imagenet21k(_UserBuilder):
  """Stands for the ImageNet-21k builder big_vision uses (not in public TFDS): one split, full."""


def _run(config, workdir):
  summary = train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:8])
  assert summary["final_step"] == config.total_steps
  assert json.load(open(os.path.join(workdir, "summary.json")))["num_devices"] == 8
  return summary


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["mrl"])  # other recipes/heads: dry runs in configs_test
def test_resnet50_imagenet_config_trains_on_mock_imagenet(tmp_path, arg):
  mock_dir = str(tmp_path / "tfds")
  write_mock_metadata(mock_dir, "imagenet2012", ("train", "validation"), num_examples=24)
  config = load_config(f"configs/resnet50_imagenet.py:{arg},runlocal")
  config.input.data_dir = mock_dir
  config.total_steps = 2
  with tfds.testing.mock_data(num_examples=24, data_dir=mock_dir):
    summary = _run(config, str(tmp_path / "run"))
  assert set(summary["eval"]) == set(map(str, config.mrl.ff_size and [config.mrl.ff_size]
                                         or [8, 16, 32, 64, 128, 256]))


@pytest.mark.slow
def test_jft_style_config_needs_only_a_builder_name(tmp_path):
  mock_dir = str(tmp_path / "tfds")
  write_mock_metadata(mock_dir, "jft_style_test", ("train", "validation"), num_examples=24)
  config = load_config("configs/vit_b16_jft.py:mrl,runlocal,dataset=jft_style_test,"
                       "label_key=labels")
  config.input.data_dir = mock_dir
  with tfds.testing.mock_data(num_examples=24, data_dir=mock_dir):
    summary = _run(config, str(tmp_path / "run"))
  assert set(summary["eval"]) == {"12", "24", "48", "96", "192"}
  assert summary["dataset"] == "jft_style_test"


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
