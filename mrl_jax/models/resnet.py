"""ResNet v1.5 (He et al. 2016; torchvision layout) returning the pooled feature z.

v1.5 puts the stride on the 3x3 convolution of the bottleneck, as torchvision and the official
MRL code (torchvision resnet50) do. Padding, BatchNorm momentum/epsilon and the conv init follow
torchvision, so ResNet-50 has exactly torchvision's 25,557,032 parameters minus its 2048x1000+1000
classifier. No classifier lives here: the Matryoshka heads own it (models/heads.py).

BatchNorm uses batch statistics in train mode and running averages in eval mode. The mode is a
static attribute (`use_running_average`) set outside jit with `nnx.view`, so one train graph and
one eval graph share the same state. Under `jax.jit` with a batch sharded over devices the batch
mean is already the global mean, which is what synchronous data-parallel BN over the data axis
means; no `axis_name` is needed.

BlurPool (Zhang 2019; FFCV's ResNet-50 recipe, which the official MRL training uses): every conv
with stride > 1 and at least 16 input channels is preceded by a fixed depthwise [1, 2, 1] x
[1, 2, 1] / 16 blur, stride 1, zero padding 1 -- in ResNet-50 the strided 3x3 convs and the
strided 1x1 shortcut convs, not the stem (3 input channels). The filter is a constant, not a
parameter, so parameter counts are unchanged.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.errors import ConfigError

# Blocks per stage, and whether the stage uses bottleneck blocks (expansion 4).
DEPTHS: dict[int, tuple[tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
STEMS = ("imagenet", "small")

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
BLUR_MIN_CHANNELS = 16  # FFCV's apply_blurpool: stride > 1 and in_channels >= 16


def blur(x: jax.Array) -> jax.Array:
  """The BlurPool filter: depthwise [1,2,1] x [1,2,1] / 16, stride 1, zero padding 1 (NHWC)."""
  channels = x.shape[-1]
  taps = jnp.asarray([1.0, 2.0, 1.0], x.dtype)
  kernel = (taps[:, None] * taps[None, :] / 16.0)[:, :, None, None]
  kernel = jnp.broadcast_to(kernel, (3, 3, 1, channels))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


class _ConvBN(nnx.Module):
  """Conv (no bias) followed by BatchNorm, torchvision padding (k // 2 on each side)."""

  def __init__(self, in_features: int, out_features: int, kernel: int, stride: int = 1, *,
               zero_init_scale: bool = False, blurpool: bool = False, dtype, rngs: nnx.Rngs):
    pad = kernel // 2
    self.blur = blurpool and stride > 1 and in_features >= BLUR_MIN_CHANNELS
    self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), (stride, stride),
                         padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                         kernel_init=conv_init, rngs=rngs)
    # torch momentum 0.1 == flax momentum 0.9; eps 1e-5 as torchvision.
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                            scale_init=nnx.initializers.zeros if zero_init_scale
                            else nnx.initializers.ones, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(blur(x) if self.blur else x))


def _shortcut(in_features: int, out: int, stride: int, blurpool: bool, dtype, rngs):
  """torchvision's `downsample`: a strided 1x1 conv + BN when the shape changes, else None."""
  if stride == 1 and in_features == out:
    return None
  return _ConvBN(in_features, out, 1, stride, blurpool=blurpool, dtype=dtype, rngs=rngs)


class _Residual(nnx.Module):
  """relu(branch(x) + shortcut(x)); subclasses define `branch`."""
  shortcut: _ConvBN | None

  def __call__(self, x):
    return nnx.relu(self.branch(x) + (self.shortcut(x) if self.shortcut is not None else x))


class BasicBlock(_Residual):
  """Two 3x3 convs (ResNet-18/34)."""
  expansion = 1

  def __init__(self, in_features: int, filters: int, stride: int, *, zero_init_residual: bool,
               blurpool: bool = False, dtype, rngs: nnx.Rngs):
    self.conv1 = _ConvBN(in_features, filters, 3, stride, blurpool=blurpool, dtype=dtype,
                         rngs=rngs)
    self.conv2 = _ConvBN(filters, filters, 3, zero_init_scale=zero_init_residual, dtype=dtype,
                         rngs=rngs)
    self.shortcut = _shortcut(in_features, filters, stride, blurpool, dtype, rngs)

  def branch(self, x):
    return self.conv2(nnx.relu(self.conv1(x)))


class BottleneckBlock(_Residual):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 (x4) (ResNet-50/101/152)."""
  expansion = 4

  def __init__(self, in_features: int, filters: int, stride: int, *, zero_init_residual: bool,
               blurpool: bool = False, dtype, rngs: nnx.Rngs):
    out = filters * self.expansion
    self.conv1 = _ConvBN(in_features, filters, 1, dtype=dtype, rngs=rngs)
    self.conv2 = _ConvBN(filters, filters, 3, stride, blurpool=blurpool, dtype=dtype, rngs=rngs)
    self.conv3 = _ConvBN(filters, out, 1, zero_init_scale=zero_init_residual, dtype=dtype,
                         rngs=rngs)
    self.shortcut = _shortcut(in_features, out, stride, blurpool, dtype, rngs)

  def branch(self, x):
    return self.conv3(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))


class ResNet(nnx.Module):
  """ResNet v1.5 encoder: images [B, H, W, C] -> (z [B, feature_dim] float32, aux).

  Args:
    depth: 18, 34, 50, 101 or 152.
    width: channels of the first stage (64 in the paper); feature_dim = 8 * width (basic blocks)
      or 32 * width (bottlenecks), e.g. 2048 for ResNet-50.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "small" (3x3/1 conv, no pool) for
      28x28/32x32 inputs.
    zero_init_residual: zero-init the last BN scale of each block (Goyal et al. 2017); the
      official MRL model does not (torchvision's default).
    blurpool: blur before every strided conv with >= 16 input channels (module docstring).
    remat: recompute each block's activations in the backward pass (saves memory).
  """

  def __init__(self, depth: int = 50, *, width: int = 64, stem: str = "imagenet",
               in_channels: int = 3, zero_init_residual: bool = True, blurpool: bool = False,
               remat: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if depth not in DEPTHS:
      raise ConfigError(f"ResNet depth {depth} is not supported (config.model.depth); "
                        f"allowed: {sorted(DEPTHS)}")
    if stem not in STEMS:
      raise ConfigError(f"ResNet stem {stem!r} is not supported (config.model.stem); "
                        f"allowed: {list(STEMS)}")
    if width < 1:
      raise ConfigError(f"ResNet width {width} must be >= 1 (config.model.width)")
    stage_sizes, bottleneck = DEPTHS[depth]
    block_cls = BottleneckBlock if bottleneck else BasicBlock
    self.depth = depth
    self.stem_kind = stem
    self.remat = remat
    if stem == "imagenet":
      self.stem = _ConvBN(in_channels, width, 7, 2, blurpool=blurpool, dtype=dtype, rngs=rngs)
    else:
      self.stem = _ConvBN(in_channels, width, 3, 1, dtype=dtype, rngs=rngs)
    blocks = []
    features = width
    for stage, num_blocks in enumerate(stage_sizes):
      filters = width * 2**stage
      for b in range(num_blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        blocks.append(block_cls(features, filters, stride, zero_init_residual=zero_init_residual,
                                blurpool=blurpool, dtype=dtype, rngs=rngs))
        features = filters * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.feature_dim = features
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None):
    del rngs  # No dropout in ResNet; accepted so every encoder has one signature.
    x = nnx.relu(self.stem(x.astype(self.dtype)))
    if self.stem_kind == "imagenet":
      x = nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = nnx.remat(block.__class__.__call__)(block, x) if self.remat else block(x)
    # The pooled feature is float32 whatever the compute dtype: a bf16 z leaves the small
    # prefixes (z[:2], z[:4]) too coarse to train (docs/training_and_evaluation.md).
    z = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, feature_dim]
    return z, {"pre_pool": x}


def feature_dim(depth: int, width: int = 64) -> int:
  """feature_dim of a ResNet without building it (used to validate nesting sizes early)."""
  if depth not in DEPTHS:
    raise ConfigError(f"ResNet depth {depth} is not supported (config.model.depth); "
                      f"allowed: {sorted(DEPTHS)}")
  return width * 8 * (4 if DEPTHS[depth][1] else 1)



# --- the encoder interface of models.MODELS ------------------------------------------------------

def build(model_cfg, *, dtype, rngs: nnx.Rngs) -> ResNet:
  return ResNet(model_cfg.depth, width=model_cfg.get("width", 64),
                stem=model_cfg.get("stem", "imagenet"), in_channels=model_cfg.get("in_channels", 3),
                zero_init_residual=model_cfg.get("zero_init_residual", True),
                blurpool=model_cfg.get("blurpool", False), remat=model_cfg.get("remat", False),
                dtype=dtype, rngs=rngs)


def feature_dim_of(model_cfg) -> int:
  return feature_dim(model_cfg.depth, model_cfg.get("width", 64))


def describe(model_cfg) -> str:
  """The architecture in checkpoint signatures (BlurPool named only when on, so that
  checkpoints written before it existed keep their signature)."""
  return (f"resnet{model_cfg.depth}(width={model_cfg.get('width', 64)},"
          f"stem={model_cfg.get('stem', 'imagenet')},in_channels="
          f"{model_cfg.get('in_channels', 3)}" + (",blurpool" if model_cfg.get("blurpool")
                                                  else "") + ")")


def check(config) -> None:
  """ResNet has no cross-field rule: depth, stem and width are checked when built."""
  del config
