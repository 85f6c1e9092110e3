"""The head path: flip TTA and class-subset masks against numpy, on a real (small) model."""

import functools

import jax
import numpy as np
import optax
import pytest

from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import validation
from mrl_jax.evaluation import class_subsets
from mrl_jax.evaluation import extract
from mrl_jax.evaluation import linear
from tests.conftest import load_config


@functools.cache
def _model():
  """The built-in digits model (ResNet-18, d = 128, 10 classes) at its initialisation, with
  random head weights so that every size's logits differ."""
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  spec = validation.validate(config, 1, 1)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  state, _ = state_lib.create_train_state(config, spec, optax.sgd(0.1), mesh)
  model, _, _ = state_lib.build_model(config, spec)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(
      np.float32), state.params)
  return model, params, state.batch_stats, mesh


def _numpy_logits(model, params, batch_stats, z):
  """{m: z[:, :m] @ W_m + b_m} from the heads' own parameters (MRL: one Dense per size)."""
  heads = model.heads(params, batch_stats)
  out = {}
  for m in model.nesting:
    head = getattr(heads, f"head_{m}")
    kernel, bias = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
    out[m] = z[:, :m].astype(np.float64) @ kernel.astype(np.float64) + bias
  return out


def test_flip_tta_mirrors_the_image_and_sums_the_two_logits():
  model, params, batch_stats, mesh = _model()
  rng = np.random.default_rng(1)
  images = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)  # NHWC, not symmetric
  batch = {"image": images, "label": np.zeros(8, np.int32), "mask": np.ones(8, bool)}
  with jax.set_mesh(mesh):
    out = extract._encode_fn(model, mesh, True)(params, batch_stats, batch)
  mirrored = images[:, :, ::-1, :].copy()  # left-right: the width axis
  z_ref, _ = model.apply(params, batch_stats, mirrored)
  np.testing.assert_allclose(out["z_flipped"], np.asarray(z_ref), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out["z_flipped"], out["z"], atol=1e-3)  # the flip changed something
  heads = linear.HeadLogits(model, params, batch_stats, mesh, block=8)
  (rows, logits), = heads.blocks(out["z"], out["z_flipped"])
  want = {m: a + b for (m, a), b in zip(
      _numpy_logits(model, params, batch_stats, out["z"]).items(),
      _numpy_logits(model, params, batch_stats, out["z_flipped"]).values())}
  assert rows == 8
  for m in model.nesting:
    np.testing.assert_allclose(np.asarray(logits[m]), want[m], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_200_class_mask_restricts_top1_and_top5_like_numpy(name, monkeypatch):
  """ImageNet-A/-R: logits outside the dataset's 200 classes never win. A model with 1000
  classes is emulated by a random head on random features."""
  model, params, batch_stats, mesh = _model()
  mask = class_subsets.class_mask(name, 1000)
  assert mask.sum() == 200
  rng = np.random.default_rng(2)
  n, d = 300, 128
  z = rng.normal(size=(n, d)).astype(np.float32)
  kernel = rng.normal(size=(d, 1000)).astype(np.float32)
  bias = rng.normal(size=1000).astype(np.float32)
  classes = np.flatnonzero(mask)
  masked = z.astype(np.float64) @ kernel + bias
  masked[:, ~mask] = -np.inf
  labels = rng.choice(classes, n)
  labels[:n // 2] = masked[:n // 2].argmax(1)  # half of them predictable within the subset

  class Heads:  # the heads of one size reading all 128 dims
    def __call__(self, x):
      return {d: x @ kernel + bias}

  monkeypatch.setattr(type(model), "heads", lambda self, p, b: Heads())
  linear._logits_fn.cache_clear()
  got = linear.metrics_by_size(linear.HeadLogits(model, params, batch_stats, mesh, block=128),
                               z, labels, class_mask=mask)[d]
  linear._logits_fn.cache_clear()
  logits = z.astype(np.float64) @ kernel + bias
  logits[:, ~mask] = -np.inf
  order = np.argsort(-logits, axis=1)
  assert got["linear_top1"] == pytest.approx(np.mean(order[:, 0] == labels))
  assert got["linear_top5"] == pytest.approx(np.mean((order[:, :5] == labels[:, None]).any(1)))
  unmasked = z.astype(np.float64) @ kernel + bias
  assert np.mean(unmasked.argmax(1) == labels) < got["linear_top1"]  # the mask matters
