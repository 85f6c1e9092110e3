"""Matryoshka heads: logits for every nesting size from one feature z (paper Sec. 3).

- MRL: one Dense per size m with its own kernel [m, C] and bias, reading z[:, :m].
- MRL-E ("efficient", weight-tied): one kernel W [d, C] and bias b; logits_m = z[:, :m] @ W[:m] + b.
  This is the official code's `MRL_Linear_Layer(efficient=True)`: the first m rows of one
  classifier, sharing the full bias.
- FF-m (fixed-feature baseline): an MRL head with the single size m; the encoder still produces d
  features but only z[:, :m] reaches the classifier, as the official FF baselines do.

All sizes are computed from the same z, i.e. from one encoder forward pass.

Initialisation (`init`): "lecun_normal" (flax's Dense default: kernel N(0, 1/fan_in), bias 0) or
"torch_linear" (PyTorch's nn.Linear, which the official MRL heads are: kernel and bias uniform
in +-1/sqrt(fan_in)); `bias_init` (a constant) overrides the bias, e.g. the large negative prior
of sigmoid heads.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax import nesting as nesting_lib
from mrl_jax.errors import ConfigError

HEAD_TYPES = ("mrl", "mrle", "ff")
HEAD_INITS = ("lecun_normal", "torch_linear")


def _linear(fan_in: int, num_classes: int, init: str, bias_init: float | None, dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
  if init not in HEAD_INITS:
    raise ConfigError(f"unknown head init {init!r} (config.mrl.head_init); allowed: "
                      f"{list(HEAD_INITS)}")
  kwargs = {}
  if init == "torch_linear":
    bound = 1.0 / math.sqrt(fan_in)
    kwargs["kernel_init"] = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    kwargs["bias_init"] = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
  if bias_init is not None:
    kwargs["bias_init"] = nnx.initializers.constant(bias_init)
  return nnx.Linear(fan_in, num_classes, dtype=dtype, rngs=rngs, **kwargs)


class MatryoshkaHeads(nnx.Module):
  """z [B, d] -> {m: logits_m [B, C]} for every m in `nesting`.

  Parameters are named `head_{m}/{kernel,bias}` (MRL, FF) or `tied/{kernel,bias}` (MRL-E).
  """

  def __init__(self, feature_dim: int, num_classes: int, nesting: tuple[int, ...], *,
               efficient: bool = False, init: str = "lecun_normal",
               bias_init: float | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    self.nesting = nesting_lib.validate(list(nesting), feature_dim)
    self.feature_dim = feature_dim
    self.efficient = efficient
    if num_classes < 1:
      raise ConfigError(f"num_classes {num_classes} must be >= 1 (config.num_classes)")
    if efficient:
      self.tied = _linear(feature_dim, num_classes, init, bias_init, dtype, rngs)
    else:
      for m in self.nesting:
        setattr(self, f"head_{m}", _linear(m, num_classes, init, bias_init, dtype, rngs))

  def full_classifier(self) -> tuple[jax.Array, jax.Array] | None:
    """(kernel [d, C], bias [C]) of the head that reads all d features (MRL: head_d, MRL-E: the
    tied one), or None (an FF-m model with m < d)."""
    head = self.tied if self.efficient else getattr(self, f"head_{self.feature_dim}", None)
    return None if head is None else (head.kernel[...], head.bias[...])

  def __call__(self, z: jax.Array) -> dict[int, jax.Array]:
    if self.efficient:
      kernel, bias = self.tied.kernel[...], self.tied.bias[...]
      dtype = self.tied.dtype or z.dtype
      return {m: z[:, :m].astype(dtype) @ kernel[:m].astype(dtype) + bias.astype(dtype)
              for m in self.nesting}
    return {m: getattr(self, f"head_{m}")(z[:, :m]) for m in self.nesting}


def head_nesting(head: str, nesting: tuple[int, ...], ff_size: int | None,
                 feature_dim: int) -> tuple[int, ...]:
  """The sizes the heads of a head type (config.mrl) read."""
  if head not in HEAD_TYPES:
    raise ConfigError(f"head type {head!r} is not supported (config.mrl.head); "
                      f"allowed: {list(HEAD_TYPES)}")
  if head == "ff":
    if ff_size is None:
      raise ConfigError("config.mrl.ff_size must be set for head 'ff' (e.g. ff=64 in the "
                        "config arg); allowed: 1 <= ff_size <= feature_dim")
    return nesting_lib.validate([ff_size], feature_dim, "config.mrl.ff_size")
  return nesting
