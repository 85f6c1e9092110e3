"""Encoder registry and the Matryoshka model (encoder + heads) built from a config."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mrl_jax import nesting as nesting_lib
from mrl_jax.errors import ConfigError
from mrl_jax.models import heads as heads_lib
from mrl_jax.models import resnet
from mrl_jax.models import torchvision_layout
from mrl_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _resnet(model_cfg, dtype, rngs):
  return resnet.ResNet(model_cfg.depth, width=model_cfg.get("width", 64),
                       stem=model_cfg.get("stem", "imagenet"),
                       in_channels=model_cfg.get("in_channels", 3),
                       zero_init_residual=model_cfg.get("zero_init_residual", True),
                       blurpool=model_cfg.get("blurpool", False),
                       remat=model_cfg.get("remat", False), dtype=dtype, rngs=rngs)


def _vit(model_cfg, dtype, rngs):
  return vit.ViT(model_cfg.variant, image_size=model_cfg.image_size,
                 pool=model_cfg.get("pool", "cls"), in_channels=model_cfg.get("in_channels", 3),
                 dropout_rate=model_cfg.get("dropout_rate", 0.0),
                 remat=model_cfg.get("remat", False),
                 num_layers=model_cfg.get("num_layers", 0), dtype=dtype, rngs=rngs)


# name -> (builder(model_cfg, dtype, rngs), feature_dim(model_cfg)).
MODELS: dict[str, tuple[Callable, Callable[[ml_collections.ConfigDict], int]]] = {
    "resnet": (_resnet, lambda c: resnet.feature_dim(c.depth, c.get("width", 64))),
    "vit": (_vit, lambda c: vit.feature_dim(c.variant)),
}


def _model_entry(config):
  if config.model_name not in MODELS:
    raise ConfigError(f"unknown encoder {config.model_name!r} (config.model_name); "
                      f"allowed: {sorted(MODELS)}")
  return MODELS[config.model_name]


def get_dtype(name: str):
  if name not in DTYPES:
    raise ConfigError(f"unknown dtype {name!r} (config.dtype); allowed: {sorted(DTYPES)}")
  return DTYPES[name]


def feature_dim(config) -> int:
  """The encoder's feature dim d, computed from the config without building anything."""
  return _model_entry(config)[1](config.model)


def nesting_sizes(config) -> tuple[int, ...]:
  """The validated nesting sizes of config.mrl.nesting for this encoder."""
  return nesting_lib.parse(config.mrl.nesting, feature_dim(config))


def head_sizes(config) -> tuple[int, ...]:
  """Sizes that have a trained head: the nesting sizes, or (ff_size,) for an FF-m model."""
  return heads_lib.head_nesting(config.mrl.head, nesting_sizes(config),
                                config.mrl.get("ff_size"), feature_dim(config))[0]


def torchvision_param_names(config) -> dict[tuple, str]:
  """{param path: the official PyTorch name} of a ResNet config (models/torchvision_layout.py)."""
  if config.model_name != "resnet":
    raise ConfigError(f"the official PyTorch layout exists for ResNets only; "
                      f"config.model_name={config.model_name!r}")
  abstract = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0)))
  sizes, _ = heads_lib.head_nesting(config.mrl.head, nesting_sizes(config),
                                    config.mrl.get("ff_size"), feature_dim(config))
  return torchvision_layout.param_names(abstract.encoder, config.mrl.head, sizes)


class MatryoshkaModel(nnx.Module):
  """images [B, H, W, C] -> (z [B, d], {m: logits_m [B, C]}) with one encoder pass."""

  def __init__(self, encoder: nnx.Module, heads: heads_lib.MatryoshkaHeads):
    self.encoder = encoder
    self.heads = heads

  def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None):
    z, _ = self.encoder(images, rngs=rngs)
    return z, self.heads(z)


def create_model(config, rngs: nnx.Rngs) -> MatryoshkaModel:
  """Builds encoder and Matryoshka heads from config.model / config.mrl / config.dtype."""
  builder, _ = _model_entry(config)
  dtype = get_dtype(config.dtype)
  encoder = builder(config.model, dtype, rngs)
  d = encoder.feature_dim
  sizes, efficient = heads_lib.head_nesting(config.mrl.head, nesting_lib.parse(
      config.mrl.nesting, d), config.mrl.get("ff_size"), d)
  # Heads in float32 whatever config.dtype: they cost ~nothing next to the encoder and the
  # smallest sizes need the precision (bf16 heads: 49% vs 89% top-1 at m=2 on digits).
  heads = heads_lib.MatryoshkaHeads(d, config.num_classes, sizes, efficient=efficient,
                                    init=config.mrl.get("head_init", "lecun_normal"),
                                    bias_init=config.mrl.get("head_bias_init"),
                                    dtype=jnp.float32, rngs=rngs)
  return MatryoshkaModel(encoder, heads)
