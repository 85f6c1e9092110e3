"""Full-scale configs run as is: ImageNet ResNet-50 and a JFT-style ViT, on offline mock data."""

import json
import os

import jax
import pytest
import tensorflow_datasets as tfds

from mrl_jax import train_lib
from tests.conftest import load_config
from tests.data_test import write_mock_metadata


class JftStyleTest(tfds.core.GeneratorBasedBuilder):
  """Stands for a user's private JFT-style builder: JPEG images and one integer label."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "labels": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError("prepared by the user; tests use tfds.testing.mock_data")

  def _generate_examples(self):
    raise NotImplementedError


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
