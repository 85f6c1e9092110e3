"""Nesting sizes: halving, explicit lists, and one-line errors for bad sizes."""

import pytest

from mrl_jax import nesting
from mrl_jax.errors import ConfigError


def test_halving_resnet50_gives_the_papers_nine_sizes():
  # Paper Sec. 4.1: ResNet-50, d = 2048, M = {8, 16, ..., 2048}.
  assert nesting.halving(2048, 8) == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def test_vit_b16_paper_sizes_by_halving_and_by_explicit_list():
  paper = (12, 24, 48, 96, 192, 384, 768)  # Paper Sec. 4.1 / Fig. 4, ViT-B/16.
  assert nesting.parse("halving:12", 768) == paper
  assert nesting.parse("12,24,48,96,192,384,768", 768) == paper
  assert nesting.parse(list(paper), 768) == paper


def test_full_is_the_feature_dim_alone():
  assert nesting.parse("full", 2048) == (2048,)


@pytest.mark.parametrize("spec, message", [
    ("8,16,4096", "nesting size 4096 exceeds feature_dim 2048"),
    ("0,8,16", "nesting size 0 is below 1"),
    ("16,8,32", "nesting size 8 follows 16"),
    ("8,16,16,32", "nesting size 16 appears twice"),
    ("", "is empty"),
    ("halving:x", "must be followed by an integer"),
    ("halving:4096", "outside [1, 2048]"),
    ("a,b", "is not 'halving:<min>', 'full' or a comma-separated list"),
])
def test_bad_sizes_are_rejected_with_one_line_naming_value_and_range(spec, message):
  with pytest.raises(ConfigError) as e:
    nesting.parse(spec, 2048)
  assert message in str(e.value)
  assert "\n" not in str(e.value)
  assert "config.mrl.nesting" in str(e.value)


def test_error_names_the_allowed_range():
  with pytest.raises(ConfigError, match=r"allowed: 1 <= m <= 2048"):
    nesting.validate([8, 4096], 2048)
