"""Matryoshka masked-language-model head: BERT's MLM head, nested (paper Sec. 3, "MRL-E").

BERT's output layer is tied to its input embedding E [V, d], so its MLM head is already a
weight-tied classifier over the vocabulary, and Matryoshka MLM is MRL-E on it: at each size m,

  logits_m = t[:, :m] E[:, :m]^T + b,   t = LayerNorm(GELU(Dense(h)))  (BERT's transform)

at the masked positions only (gathered first: [B, P, d], P = max predictions per sequence).
All sizes come from one pass over the blocks between consecutive sizes: logits_{m_k} =
logits_{m_(k-1)} + t[:, m_(k-1):m_k] E[:, m_(k-1):m_k]^T, so |M| sizes cost one full-size
matmul, not |M|. The logits are float32 whatever the compute dtype (as the classifier heads).
Parameter names follow HF's BertForMaskedLM (`cls.predictions`): transform `dense` and
`norm`, output `bias`; the decoder has no parameter of its own, unless it is untied from the
word embeddings (HF's `tie_word_embeddings=False`): then `decoder` [V, d] (HF's
`cls.predictions.decoder.weight`) takes E's place above, nested the same way.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def nested_tied_logits(t: jax.Array, embedding: jax.Array, bias: jax.Array,
                       sizes: tuple[int, ...]) -> dict[int, jax.Array]:
  """{m: t[..., :m] @ embedding[:, :m].T + bias} for sorted sizes, from block partial sums."""
  out, acc, start = {}, None, 0
  for m in sorted(sizes):
    block = jnp.einsum("...d,vd->...v", t[..., start:m].astype(jnp.float32),
                       embedding[:, start:m].astype(jnp.float32))
    acc = block if acc is None else acc + block
    out[m] = acc + bias.astype(jnp.float32)
    start = m
  return out


class MatryoshkaMlm(nnx.Module):
  """A BERT encoder with BERT's MLM head, nested: batch -> (z [B, d], {m: logits [B, P, V]})."""

  def __init__(self, encoder: nnx.Module, nesting: tuple[int, ...], *, tied: bool = True,
               rngs: nnx.Rngs):
    d = encoder.feature_dim
    self.encoder = encoder
    self.nesting = tuple(nesting)
    init = nnx.initializers.normal(0.02)
    self.dense = nnx.Linear(d, d, kernel_init=init, dtype=encoder.dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(d, epsilon=1e-12, dtype=encoder.dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((encoder.vocab_size,), jnp.float32))
    self.decoder = None if tied else nnx.Param(init(rngs.params(), (encoder.vocab_size, d)))

  def transform(self, hidden: jax.Array) -> jax.Array:
    return self.norm(nnx.gelu(self.dense(hidden.astype(self.encoder.dtype)), approximate=False))

  def __call__(self, batch: dict, *, rngs: nnx.Rngs | None = None, sizes=None):
    """`sizes` (default: the nesting) may include untrained sizes: the head is tied, so every
    prefix has logits (a standard model's truncations, for the baseline)."""
    z, aux = self.encoder(batch, rngs=rngs)
    hidden = jnp.take_along_axis(aux["tokens"], batch["masked_positions"][..., None], axis=1)
    decoder = self.encoder.word.embedding if self.decoder is None else self.decoder
    logits = nested_tied_logits(self.transform(hidden), decoder[...], self.bias[...],
                                sizes or self.nesting)
    return z, logits
