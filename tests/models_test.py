"""Encoders: published parameter counts, forward passes in f32/bf16, BatchNorm modes, gradients.

Parameter counts are computed with nnx.eval_shape (no allocation) and compared with the published
totals minus the 1000-class classifier (d * 1000 + 1000), which our encoders do not contain.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax import models
from mrl_jax.errors import ConfigError
from mrl_jax.models import heads as heads_lib
from mrl_jax.models import resnet
from mrl_jax.models import vit
from tests.conftest import jit_build
from tests.conftest import jit_call
from tests.conftest import load_config


def _num_params(module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# torchvision.models.resnetXX().parameters() totals (torchvision docs "Num Params"; ResNet-50:
# 25,557,032), minus the fc layer.
RESNET_PUBLISHED = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160,
                    152: 60_192_808}
# Original ViT at 224px with a 1000-class head (timm vit_*_patch16_224 / vit_huge_patch14_224;
# ViT-B/16 86.6M in Dosovitskiy et al. Table 1), minus the head.
VIT_PUBLISHED = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656,
                 "L/16": 304_326_632, "H/14": 632_045_800}


@pytest.mark.parametrize("depth", sorted(RESNET_PUBLISHED))
def test_resnet_parameter_count_equals_torchvision_minus_classifier(depth):
  model = nnx.eval_shape(lambda: resnet.ResNet(depth, rngs=nnx.Rngs(0)))
  d = model.feature_dim
  assert d == (2048 if depth >= 50 else 512)
  assert _num_params(model) == RESNET_PUBLISHED[depth] - (d * 1000 + 1000)


@pytest.mark.parametrize("variant", sorted(VIT_PUBLISHED))
def test_vit_parameter_count_equals_published_minus_head(variant):
  model = nnx.eval_shape(lambda: vit.ViT(variant, image_size=224, rngs=nnx.Rngs(0)))
  d = model.feature_dim
  assert _num_params(model) == VIT_PUBLISHED[variant] - (d * 1000 + 1000)


def test_vit_b16_count_matches_a_hand_derivation():
  # Independent of any library: patch conv + cls + pos + 12 blocks + final LN.
  d, mlp, tokens = 768, 3072, 14 * 14 + 1
  block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  expected = (16 * 16 * 3 * d + d) + d + tokens * d + 12 * block + 2 * d
  model = nnx.eval_shape(lambda: vit.ViT("B/16", rngs=nnx.Rngs(0)))
  assert _num_params(model) == expected == 85_798_656


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resnet_forward_small_stem(dtype):
  model = jit_build(lambda: resnet.ResNet(18, width=4, stem="small", in_channels=1, dtype=dtype,
                                          rngs=nnx.Rngs(0)), share_state_as="r18w4")
  z, aux = jit_call(model, jnp.ones((2, 16, 16, 1)))
  assert z.shape == (2, 32) and z.dtype == jnp.float32  # pooled in float32 (mixed precision)
  assert aux["pre_pool"].dtype == dtype
  assert aux["pre_pool"].shape == (2, 2, 2, 32)
  # Parameters stay float32 whatever the compute dtype.
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def test_resnet_imagenet_stem_downsamples_by_32():
  model = jit_build(lambda: resnet.ResNet(18, width=4, rngs=nnx.Rngs(0)))
  z, aux = jit_call(model, jnp.ones((1, 64, 64, 3)))
  assert z.shape == (1, 32) and aux["pre_pool"].shape == (1, 2, 2, 32)


@pytest.mark.parametrize("dtype, pool", [(jnp.float32, "cls"), (jnp.bfloat16, "cls"),
                                         (jnp.float32, "gap")])
def test_vit_forward(dtype, pool):
  model = jit_build(lambda: vit.ViT("Ti/16", image_size=32, pool=pool, dtype=dtype,
                                    rngs=nnx.Rngs(0)), share_state_as=f"vit-ti-{pool}")
  z, aux = jit_call(model, jnp.ones((2, 32, 32, 3)))
  assert z.shape == (2, 192) and z.dtype == jnp.float32  # final LayerNorm in float32
  assert aux["tokens"].shape == (2, 4 + (pool == "cls"), 192)


def test_vit_rejects_image_size_not_divisible_by_patch():
  with pytest.raises(ConfigError, match="image size 30 is not divisible by the ViT patch size 16"):
    vit.ViT("Ti/16", image_size=30, rngs=nnx.Rngs(0))


def test_unknown_variant_and_depth_are_one_line_errors():
  with pytest.raises(ConfigError, match="ViT variant 'X/16' is not supported"):
    vit.parse_variant("X/16")
  with pytest.raises(ConfigError, match="ResNet depth 42 is not supported"):
    resnet.feature_dim(42)


def test_batchnorm_uses_batch_stats_in_train_and_running_averages_in_eval():
  model = jit_build(lambda: resnet.ResNet(18, width=4, stem="small", in_channels=1,
                                          rngs=nnx.Rngs(0)), share_state_as="r18w4")
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) * 3 + 1

  @jax.jit
  def run(state, x, use_running_average):
    m = nnx.merge(graphdef_train if not use_running_average else graphdef_eval, state)
    z, _ = m(x)
    return z, nnx.state(m, nnx.BatchStat)

  graphdef_train, state = nnx.split(model)
  graphdef_eval, _ = nnx.split(nnx.view(model, use_running_average=True))
  run = jax.jit(run.__wrapped__, static_argnums=2)
  before = nnx.state(model, nnx.BatchStat)
  _, after_train = run(state, x, False)  # train mode (default): statistics move
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after_train)))
  z1, after_eval = run(state, x, True)
  z2, _ = run(state, x[:1], True)  # eval output of an example does not depend on the batch
  np.testing.assert_allclose(np.asarray(z1[:1]), np.asarray(z2), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after_eval)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("block_cls, last", [(resnet.BottleneckBlock, "conv3"),
                                             (resnet.BasicBlock, "conv2")])
def test_zero_init_residual_zeroes_the_last_bn_scale_of_each_block(block_cls, last):
  for zero_init in (True, False):
    block = jit_build(lambda: block_cls(8, 4, 2, zero_init_residual=zero_init,
                                        dtype=jnp.float32, rngs=nnx.Rngs(0)))
    scale = np.asarray(getattr(block, last).bn.scale[...])
    assert (np.abs(scale).sum() == 0.0) == zero_init
    assert np.all(np.asarray(block.conv1.bn.scale[...]) == 1.0)


@pytest.mark.parametrize("head", ["mrl", "mrle", "ff=8"])
def test_gradients_reach_every_head_and_the_encoder_from_one_forward(head):
  config = load_config(f"configs/digits_resnet_mrl.py:{head},runlocal")
  model = jit_build(lambda: models.create_model(config, models.resolve(config), nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  labels = jnp.asarray([0, 1, 2, 3])
  calls = []
  original = type(model.encoder).__call__

  def counting_call(self, *a, **k):
    calls.append(1)
    return original(self, *a, **k)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def loss_fn(params, rest):
    z, logits = nnx.merge(graphdef, params, rest)(x)
    return sum(-jax.nn.log_softmax(l)[jnp.arange(4), labels].mean() for l in logits.values())

  type(model.encoder).__call__ = counting_call
  try:
    grads = jax.jit(jax.grad(loss_fn))(params, rest)
  finally:
    type(model.encoder).__call__ = original
  assert len(calls) == 1  # one encoder pass (traced once) for all sizes
  flat = dict(grads.flat_state())
  head_grads = {k: v for k, v in flat.items() if k[0] == "heads"}
  assert head_grads
  for path, g in head_grads.items():
    assert float(jnp.abs(g).sum()) > 0, path
  stem = flat[("encoder", "stem", "conv", "kernel")]
  assert float(jnp.abs(stem).sum()) > 0


@pytest.mark.parametrize("model_name", ["resnet", "vit"])
def test_remat_gives_the_same_outputs_and_gradients(model_name):
  if model_name == "resnet":
    build = lambda r: resnet.ResNet(18, width=4, stem="small", in_channels=1, remat=r,
                                    rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  else:
    build = lambda r: vit.ViT("Ti/16", image_size=32, remat=r, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  key = "r18w4" if model_name == "resnet" else "vit-ti-cls"

  def grads(remat):
    graphdef, params, rest = nnx.split(jit_build(lambda: build(remat), key), nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    # A random projection of z: its gradients are far from zero (sum(z**2) after the final
    # LayerNorm is nearly constant, so its gradients would be rounding noise).

    def loss(p):
      z = nnx.merge(graphdef, p, rest)(x)[0]
      proj = jax.random.normal(jax.random.key(1), z.shape)
      return jnp.sum(z * proj)

    return jax.jit(jax.grad(loss))(params)

  g_plain, g_remat = grads(False), grads(True)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    a, b = np.asarray(a), np.asarray(b)  # f32 summation order differs: tolerance by scale
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_blurpool_equals_a_direct_numpy_convolution():
  """[1,2,1] x [1,2,1] / 16 per channel, zero padding 1, stride 1 (FFCV's BlurPoolConv2d)."""
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
  taps = np.array([1.0, 2.0, 1.0])
  kernel = np.outer(taps, taps) / 16.0
  padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
  want = np.zeros_like(x)
  for i in range(5):
    for j in range(6):
      want[:, i, j, :] = np.einsum("bhwc,hw->bc", padded[:, i:i + 3, j:j + 3, :], kernel)
  np.testing.assert_allclose(np.asarray(resnet.blur(jnp.asarray(x))), want, rtol=1e-6,
                             atol=1e-6)


def test_blurpool_precedes_exactly_the_official_resnet50_convs():
  """apply_blurpool's rule (stride > 1 and >= 16 input channels) on ResNet-50: the strided 3x3
  and 1x1 shortcut convs of layer2-4, not the stem (3 channels) nor layer1's shortcut."""
  model = nnx.eval_shape(lambda: resnet.ResNet(50, blurpool=True, rngs=nnx.Rngs(0)))
  blurred = {name for name, module in [("stem", model.stem)] + [
      (f"{j}.{k}", getattr(b, k)) for j, b in enumerate(model.blocks)
      for k in ("conv1", "conv2", "conv3", "shortcut") if getattr(b, k, None) is not None]
             if module.blur}
  assert blurred == {"3.conv2", "3.shortcut", "7.conv2", "7.shortcut", "13.conv2",
                     "13.shortcut"}  # blocks 3, 7, 13 open layer2, layer3, layer4


def test_torch_linear_head_init_is_uniform_within_one_over_sqrt_fan_in():
  heads = jit_build(lambda: heads_lib.MatryoshkaHeads(
      256, 1000, (16, 256), init="torch_linear", rngs=nnx.Rngs(0)))
  for m in (16, 256):
    bound = 1 / np.sqrt(m)
    for leaf in ("kernel", "bias"):
      w = np.asarray(getattr(getattr(heads, f"head_{m}"), leaf)[...])
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
      assert np.std(w) == pytest.approx(bound / np.sqrt(3), rel=0.1)  # uniform's std
  biased = jit_build(lambda: heads_lib.MatryoshkaHeads(
      8, 5, (4, 8), bias_init=-10.0, rngs=nnx.Rngs(0)))
  assert np.all(np.asarray(biased.head_4.bias[...]) == -10.0)


def _torch_vit(params, images, num_heads: int, pool: str):
  """The original ViT forward transcribed in plain PyTorch from the paper and big_vision's
  vit.py (independent of our module): patches by a strided conv, CLS token, position
  embeddings, pre-LN blocks (softmax(q k^T / sqrt(d_h)) v, exact GELU MLP), final LayerNorm,
  then the CLS token or the mean of the tokens. `params` is our flat {path: array}."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  t = lambda name: torch.from_numpy(np.asarray(params[name], np.float64))
  x = torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2)  # NCHW
  kernel = t("embedding/kernel").permute(3, 2, 0, 1)  # [p, p, C, D] -> [D, C, p, p]
  x = F.conv2d(x, kernel, t("embedding/bias"), stride=kernel.shape[-1])
  x = x.flatten(2).transpose(1, 2)  # [B, N, D], patches in row-major order
  b, _, d = x.shape
  if pool == "cls":
    x = torch.cat([t("cls").expand(b, 1, d), x], 1)
  x = x + t("pos_embedding")
  ln = lambda y, name: F.layer_norm(y, (d,), t(f"{name}/scale"), t(f"{name}/bias"), eps=1e-6)
  i = 0
  while f"blocks/{i}/ln1/scale" in params:
    p = f"blocks/{i}"
    y = ln(x, f"{p}/ln1") @ t(f"{p}/attn/qkv/kernel") + t(f"{p}/attn/qkv/bias")
    q, k, v = y.reshape(b, -1, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    attention = torch.softmax(q @ k.transpose(-1, -2) / (d // num_heads) ** 0.5, -1) @ v
    attention = attention.transpose(1, 2).reshape(b, -1, d)
    x = x + attention @ t(f"{p}/attn/out/kernel") + t(f"{p}/attn/out/bias")
    y = ln(x, f"{p}/ln2") @ t(f"{p}/mlp/fc1/kernel") + t(f"{p}/mlp/fc1/bias")
    x = x + F.gelu(y) @ t(f"{p}/mlp/fc2/kernel") + t(f"{p}/mlp/fc2/bias")
    i += 1
  x = ln(x, "encoder_norm")
  return (x[:, 0] if pool == "cls" else x.mean(1)).numpy()


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_vit_forward_equals_a_pytorch_transcription(pool):
  """ViT-Ti/8 (2 blocks, 3 heads) on 16x16 RGB with every parameter randomised (LayerNorm
  scales and biases too): z equals the PyTorch transcription within 1e-5."""
  model = jit_build(lambda: vit.ViT("Ti/8", image_size=16, num_layers=2, pool=pool,
                                    rngs=nnx.Rngs(3)))
  rng = np.random.default_rng(0)
  state = nnx.state(model, nnx.Param)
  for path, variable in state.flat_state():
    variable.set_value(jnp.asarray(
        0.2 * rng.standard_normal(variable.shape) + (1.0 if path[-1] == "scale" else 0.0),
        jnp.float32))
  nnx.update(model, state)
  params = {"/".join(map(str, path)): np.asarray(v.get_value())
            for path, v in nnx.state(model, nnx.Param).flat_state()}
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  z, _ = jit_call(model, images)
  want = _torch_vit(params, images, num_heads=3, pool=pool)
  np.testing.assert_allclose(np.asarray(z), want, rtol=1e-4, atol=1e-5)


def test_uint8_pixels_are_normalised_on_the_device_in_every_path():
  """The input pipeline sends uint8; (x - config.input.mean) / config.input.std must happen
  in the training forward (module call), in evaluation (Model.apply) and in embedding
  (Model.encode): each equals the encoder on pixels normalised here in numpy."""
  from mrl_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  config.input.update(mean=(40.0,), std=(20.0,))  # not the identity, not the config's
  spec = models.resolve(config)
  model = jit_build(lambda: models.create_model(config, spec, nnx.Rngs(0)))
  model = nnx.view(model, use_running_average=True, raise_if_not_found=False)  # eval mode
  pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
  z_want, _ = jit_call(model.encoder, jnp.asarray((pixels - 40.0) / 20.0, jnp.float32))
  z_call, logits = jit_call(model, jnp.asarray(pixels))
  np.testing.assert_allclose(z_call, z_want, rtol=1e-5, atol=1e-5)
  wrapped, _, _ = state_lib.build_model(config, spec)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, batch_stats = nnx.as_pure(params), nnx.as_pure(batch_stats)
  for z in (wrapped.apply(params, batch_stats, jnp.asarray(pixels))[0],
            wrapped.encode(params, batch_stats, jnp.asarray(pixels))[0]):
    np.testing.assert_allclose(z, z_want, rtol=1e-5, atol=1e-5)
  assert set(logits) == set(spec.head_sizes)


def test_pixel_statistics_are_checked_against_the_channels():
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  config.input.update(mean=(1.0, 2.0), std=(1.0,))
  with pytest.raises(ConfigError, match=r"config.input.mean/std have 2/1 values; allowed: 1 or "
                                        r"1 \(the image channels\)"):
    models.create_model(config, models.resolve(config), nnx.Rngs(0))
  config.input.update(mean=(1.0,), std=(0.0,))
  with pytest.raises(ConfigError, match=r"config.input.std=\(0.0,\); allowed: positive"):
    models.create_model(config, models.resolve(config), nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["mrl", "mrle", "ff"])
def test_full_classifier_is_the_head_that_reads_every_feature(kind):
  """The full-size head the evaluators' baselines use: MRL's head_d, MRL-E's tied head; an FF-m
  model with m < d has none."""
  nesting = (4,) if kind == "ff" else (2, 4, 8)
  heads = heads_lib.MatryoshkaHeads(8, 3, nesting, efficient=kind == "mrle", rngs=nnx.Rngs(0))
  got = heads.full_classifier()
  if kind == "ff":
    assert got is None
    return
  head = heads.tied if kind == "mrle" else heads.head_8
  np.testing.assert_array_equal(got[0], head.kernel[...])
  np.testing.assert_array_equal(got[1], head.bias[...])
  z = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
  np.testing.assert_allclose(heads(jnp.asarray(z))[8], z @ got[0] + got[1], rtol=1e-5, atol=1e-6)


def test_a_one_class_head_is_allowed_and_zero_classes_is_an_error():
  heads = heads_lib.MatryoshkaHeads(8, 1, (4, 8), rngs=nnx.Rngs(0))
  assert heads(jnp.ones((2, 8)))[4].shape == (2, 1)
  with pytest.raises(ConfigError, match="num_classes 0"):
    heads_lib.MatryoshkaHeads(8, 0, (4, 8), rngs=nnx.Rngs(0))


def test_mrle_logits_take_the_head_dtype_not_the_feature_dtype():
  """A bfloat16 head on float32 features computes in bfloat16, for MRL-E as nnx.Linear (MRL)."""
  z = jnp.ones((2, 8), jnp.float32)
  for efficient in (False, True):
    heads = heads_lib.MatryoshkaHeads(8, 3, (4, 8), efficient=efficient, dtype=jnp.bfloat16,
                                      rngs=nnx.Rngs(0))
    assert heads(z)[4].dtype == jnp.bfloat16, efficient
