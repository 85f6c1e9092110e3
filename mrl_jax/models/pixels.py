"""Pixel normalisation on the device.

The input pipeline sends uint8 pixels: 4x less to copy from the host than float32 and no float
work on the input cores (FFCV's loaders do the same and normalise on the GPU). The model turns
them into (x - config.input.mean) / config.input.std, in float32, as the first op of its
forward pass. Float inputs are taken as already normalised: arrays a caller prepared itself.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.errors import ConfigError


def stats(input_cfg, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of config.input as tuples of 1 or `channels` floats; one-line errors."""
  mean, std = _floats(input_cfg.mean), _floats(input_cfg.std)
  if len(mean) not in (1, channels) or len(std) not in (1, channels):
    raise ConfigError(f"config.input.mean/std have {len(mean)}/{len(std)} values; "
                      f"allowed: 1 or {channels} (the image channels)")
  if min(std) <= 0:
    raise ConfigError(f"config.input.std={std}; allowed: positive values")
  return mean, std


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 [..., C] -> float32 (x - mean) / std; other dtypes unchanged (already normalised)."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _floats(values) -> tuple[float, ...]:
  return tuple(float(v) for v in np.atleast_1d(values))
