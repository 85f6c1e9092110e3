"""Transformer blocks shared by the ViT (pre-LN) and the BERT-style text encoder (post-LN).

Parameter names are the same in both layouts: `ln1`, `attn` (`qkv`: one fused projection, the
columns ordered [query | key | value], each head-major; `out`), `ln2`, `mlp` (`fc1`, `fc2`).
- pre-LN (ViT, big_vision): x + attn(ln1(x)), then x + mlp(ln2(x)).
- post-LN (BERT, Devlin et al. 2019): ln1(x + attn(x)), then ln2(x + mlp(x)).
Attention goes through `jax.nn.dot_product_attention` (XLA may pick a fused cuDNN kernel on GPU)
unless attention-probability dropout is on, which BERT uses: then the same softmax is written
out so the probabilities can be dropped. A padding mask [B, L] (1 = token) hides padded keys.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.errors import ConfigError

# config.model fields that override a ViT / BERT variant's shape (0 = the variant's), in the
# order of the variant tables' tuples: (width, depth, mlp_dim, heads).
SHAPE_FIELDS = ("hidden_size", "num_layers", "mlp_dim", "num_heads")


def shape(variant: tuple[int, int, int, int], model_cfg) -> tuple[int, int, int, int]:
  """(width, depth, mlp_dim, heads): the variant's, each replaced by its config.model override
  when that is > 0 (so any published shape builds, e.g. an HF BERT with 8 heads at width 256).
  One-line errors for a negative override or a width the heads do not divide."""
  out = []
  for field, default in zip(SHAPE_FIELDS, variant):
    value = int(model_cfg.get(field, 0) or 0)
    if value < 0:
      raise ConfigError(f"config.model.{field}={value}; allowed: >= 0 (0 = the variant's "
                        f"{default})")
    out.append(value or default)
  width, _, _, heads = out
  if width % heads:
    raise ConfigError(f"width {width} is not divisible by {heads} attention heads "
                      "(config.model.hidden_size / num_heads)")
  return tuple(out)


def describe_overrides(model_cfg) -> str:
  """',num_layers=1,...' for the shape overrides set (part of a model's signature)."""
  return "".join(f",{f}={model_cfg.get(f)}" for f in SHAPE_FIELDS if model_cfg.get(f, 0))


class SelfAttention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (3*D*D + 3*D parameters)."""

  def __init__(self, width: int, num_heads: int, *, dropout_rate: float = 0.0,
               kernel_init=nnx.initializers.xavier_uniform(), dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate) if dropout_rate else None

  def __call__(self, x, mask=None, rngs=None):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
    keys = None if mask is None else mask.astype(bool)[:, None, None, :]  # [B, 1, 1, N]
    if self.dropout is None:
      y = jax.nn.dot_product_attention(q, k, v, mask=keys)
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
      if keys is not None:
        logits = jnp.where(keys, logits, jnp.finfo(logits.dtype).min)
      probs = self.dropout(jax.nn.softmax(logits.astype(jnp.float32)).astype(v.dtype),
                           rngs=rngs)
      y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.out(y.reshape(b, n, d))


class MlpBlock(nnx.Module):
  """fc1 -> GELU (exact, as ViT and BERT) -> [dropout] -> fc2."""

  def __init__(self, width: int, mlp_dim: int, dropout_rate: float, *,
               kernel_init=nnx.initializers.xavier_uniform(),
               bias_init=nnx.initializers.normal(1e-6), dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, mlp_dim, kernel_init=kernel_init, bias_init=bias_init,
                          dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, width, kernel_init=kernel_init, bias_init=bias_init,
                          dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x, rngs):
    x = self.dropout(nnx.gelu(self.fc1(x), approximate=False), rngs=rngs)
    return self.fc2(x)


class EncoderBlock(nnx.Module):
  """One transformer block, pre-LN (ViT) or post-LN (BERT)."""

  def __init__(self, width: int, mlp_dim: int, num_heads: int, dropout_rate: float, *,
               post_norm: bool = False, epsilon: float = 1e-6,
               attention_dropout_rate: float = 0.0, mlp_dropout_rate: float | None = None,
               kernel_init=nnx.initializers.xavier_uniform(),
               bias_init=nnx.initializers.normal(1e-6), dtype, rngs: nnx.Rngs):
    self.post_norm = post_norm
    self.ln1 = nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, rngs=rngs)
    self.attn = SelfAttention(width, num_heads, dropout_rate=attention_dropout_rate,
                              kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, rngs=rngs)
    inner = dropout_rate if mlp_dropout_rate is None else mlp_dropout_rate
    self.mlp = MlpBlock(width, mlp_dim, inner, kernel_init=kernel_init, bias_init=bias_init,
                        dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x, rngs=None, mask=None):
    if self.post_norm:
      x = self.ln1(x + self.dropout(self.attn(x, mask, rngs), rngs=rngs))
      return self.ln2(x + self.dropout(self.mlp(x, rngs), rngs=rngs))
    x = x + self.dropout(self.attn(self.ln1(x), mask, rngs), rngs=rngs)
    return x + self.dropout(self.mlp(self.ln2(x), rngs), rngs=rngs)
