"""Configs: every experiment loads and validates; the dry run reports exact parameter counts."""

import json
import subprocess
import sys

import pytest

from mrl_jax import models
from mrl_jax import train_lib
from mrl_jax import validation
from tests.conftest import REPO
from tests.conftest import load_config

CONFIGS = [
    "configs/digits_resnet_mrl.py", "configs/digits_resnet_mrl.py:mrle",
    "configs/digits_resnet_mrl.py:ff=8", "configs/digits_resnet_mrl.py:runlocal",
    "configs/mnist_resnet_mrl.py", "configs/mnist_resnet_mrl.py:mrle,reader=tf_data",
    "configs/resnet50_imagenet.py:mrl", "configs/resnet50_imagenet.py:mrle",
    "configs/resnet50_imagenet.py:ff=64", "configs/resnet50_imagenet.py:mrl,recipe=standard90",
    "configs/resnet50_imagenet.py:mrl,progressive", "configs/vit_b16_imagenet21k.py:mrl",
    "configs/vit_b16_imagenet21k.py:mrle", "configs/vit_b16_imagenet21k.py:mrl,runlocal",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates_for_8_devices(name):
  config = load_config(name)
  validation.validate_config(config, num_devices=8)
  assert models.nesting_sizes(config)


def test_resnet50_mrl_dry_run_counts(tmp_path):
  summary = train_lib.dry_run(load_config("configs/resnet50_imagenet.py:mrl"), str(tmp_path))
  on_disk = json.loads((tmp_path / "model_summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  assert on_disk["num_params_encoder"] == 25_557_032 - 2_049_000  # torchvision R50 minus fc
  # One Dense per size: (sum of sizes + one bias per size) x 1000 classes.
  sizes = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
  assert on_disk["nesting_sizes"] == sizes
  assert on_disk["num_params_heads"] == (sum(sizes) + len(sizes)) * 1000 == 4_097_000
  assert on_disk["head"] == "mrl" and on_disk["feature_dim"] == 2048
  assert on_disk["num_classes"] == 1000


@pytest.mark.parametrize("arg, heads", [("mrle", 2048 * 1000 + 1000), ("ff=64", 64 * 1000 + 1000)])
def test_mrle_and_ff_heads_have_one_classifier(tmp_path, arg, heads):
  summary = train_lib.dry_run(load_config(f"configs/resnet50_imagenet.py:{arg}"), str(tmp_path))
  assert summary["num_params_heads"] == heads
  assert summary["num_params_encoder"] == 23_508_032


def test_vit_b16_21k_dry_run_uses_the_papers_sizes(tmp_path):
  summary = train_lib.dry_run(load_config("configs/vit_b16_imagenet21k.py:mrl"), str(tmp_path))
  sizes = [12, 24, 48, 96, 192, 384, 768]
  assert summary["nesting_sizes"] == sizes
  assert summary["num_params_encoder"] == 86_567_656 - 769_000
  assert summary["num_params_heads"] == (sum(sizes) + len(sizes)) * 21843


def test_train_py_dry_run_with_cli_override(tmp_path):
  out = subprocess.run(
      [sys.executable, "train.py", "--config=configs/resnet50_imagenet.py:mrle",
       f"--workdir={tmp_path}", "--dry_run", "--config.num_classes=100",
       "--config.mrl.nesting=16,64,2048"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads((tmp_path / "model_summary.json").read_text())
  assert summary["num_classes"] == 100 and summary["nesting_sizes"] == [16, 64, 2048]
  assert summary["num_params_heads"] == 2048 * 100 + 100
