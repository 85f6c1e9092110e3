"""BERT-style text encoder (Devlin et al. 2019), returning the pooled feature z.

Layout as BERT and its HF `transformers` port: token, position and segment embeddings summed,
LayerNorm (eps 1e-12) and dropout; post-LN blocks (transformer.py, shared with the ViT) with
exact GELU, attention-probability and hidden dropout 0.1; an optional pooler (tanh(Dense(CLS)),
BERT's next-sentence head input). BERT-Base (12 layers, 768 wide, vocab 30,522, 512 positions)
has 109,482,240 parameters with its pooler, 108,891,648 without: exactly HF's BertModel.

z, the representation MRL nests, is the pooled last layer:
- "cls": the [CLS] token's hidden state (BERT);
- "mean": the mean of the hidden states over real tokens (sentence-transformers' mean pooling,
  as all-MiniLM-L6-v2 uses);
- "pooler": BERT's pooler output (needs the pooler).
The same pooling of every layer's hidden states (the embedding output first) is returned in
aux["layers"] ([L + 1, B, d]) for 2D Matryoshka (layers x dims).

Inputs are a dict of int32 [B, L] arrays: `input_ids`, `segment_ids`, `input_mask` (1 = token,
0 = padding). No classifier and no MLM head live here: objectives own them (objectives/).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models import transformer
from mrl_jax.models.transformer import EncoderBlock

# width, depth, mlp_dim, heads. base/large: Devlin et al. 2019; tiny..medium: the compact BERTs
# of Turc et al. 2019 (google-research/bert); minilm_*: microsoft/MiniLM-L*-H384 (the
# all-MiniLM-L6-v2 sentence encoder is minilm_l6).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 2, 512, 2),
    "mini": (256, 4, 1024, 4),
    "small": (512, 4, 2048, 8),
    "medium": (512, 8, 2048, 8),
    "base": (768, 12, 3072, 12),
    "large": (1024, 24, 4096, 16),
    "minilm_l6": (384, 6, 1536, 12),
    "minilm_l12": (384, 12, 1536, 12),
}
POOLS = ("cls", "mean", "pooler")
INPUT_KEYS = ("input_ids", "segment_ids", "input_mask")


def parse_variant(variant: str) -> tuple[int, int, int, int]:
  if variant not in VARIANTS:
    raise ConfigError(f"BERT variant {variant!r} is not supported (config.model.variant); "
                      f"allowed: {sorted(VARIANTS)}")
  return VARIANTS[variant]


def pool_tokens(hidden: jax.Array, mask: jax.Array, pool: str) -> jax.Array:
  """[B, L, d] hidden states -> [B, d] float32: the first token, or the mean over the real
  tokens (sum / max(count, 1e-9), as sentence-transformers' Pooling)."""
  hidden = hidden.astype(jnp.float32)
  if pool in ("cls", "pooler"):
    return hidden[:, 0]
  weights = mask.astype(jnp.float32)[..., None]
  return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)


class Bert(nnx.Module):
  """BERT encoder: {input_ids, segment_ids, mask} [B, L] -> (z [B, width] float32, aux).

  Args:
    variant: a key of VARIANTS.
    vocab_size, max_len, type_vocab_size: the embedding tables (BERT: 30522, 512, 2).
    pool: "cls", "mean" or "pooler" (module docstring).
    pooler: build BERT's pooler (always when pool == "pooler").
    dropout_rate / attention_dropout_rate: hidden and attention-probability dropout (0.1).
    remat: recompute each block in the backward pass.
    hidden_size, num_layers, mlp_dim, num_heads: override the variant's shape (0 = the
      variant's), so any HF BERT shape builds (transformer.shape).
  """

  def __init__(self, variant: str = "base", *, vocab_size: int = 30522, max_len: int = 512,
               type_vocab_size: int = 2, pool: str = "cls", pooler: bool = False,
               dropout_rate: float = 0.1, attention_dropout_rate: float = 0.1,
               remat: bool = False, num_layers: int = 0, hidden_size: int = 0,
               mlp_dim: int = 0, num_heads: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
    width, depth, mlp_dim, num_heads = transformer.shape(
        parse_variant(variant), dict(hidden_size=hidden_size, num_layers=num_layers,
                                     mlp_dim=mlp_dim, num_heads=num_heads))
    if pool not in POOLS:
      raise ConfigError(f"BERT pool {pool!r} is not supported (config.model.pool); allowed: "
                        f"{list(POOLS)}")
    for name, value in (("vocab_size", vocab_size), ("max_len", max_len),
                        ("type_vocab_size", type_vocab_size)):
      if value < 1:
        raise ConfigError(f"config.model.{name}={value}; allowed: >= 1")
    init = nnx.initializers.normal(0.02)  # BERT's initializer_range
    self.pool = pool
    self.remat = remat
    self.dtype = dtype
    self.feature_dim = width
    self.max_len = max_len
    self.vocab_size = vocab_size
    self.word = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs)
    self.position = nnx.Embed(max_len, width, embedding_init=init, rngs=rngs)
    self.segment = nnx.Embed(type_vocab_size, width, embedding_init=init, rngs=rngs)
    self.embedding_norm = nnx.LayerNorm(width, epsilon=1e-12, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.blocks = nnx.List([
        EncoderBlock(width, mlp_dim, num_heads, dropout_rate, post_norm=True, epsilon=1e-12,
                     attention_dropout_rate=attention_dropout_rate, mlp_dropout_rate=0.0,
                     kernel_init=init, bias_init=nnx.initializers.zeros, dtype=dtype,
                     rngs=rngs)
        for _ in range(depth)
    ])
    self.pooler = (nnx.Linear(width, width, kernel_init=init, dtype=dtype, rngs=rngs)
                   if pooler or pool == "pooler" else None)

  def embed(self, tokens: dict) -> jax.Array:
    """[B, L, d] summed embeddings before LayerNorm and dropout (the tied MLM decoder reads
    `self.word`)."""
    ids = tokens["input_ids"]
    length = ids.shape[1]
    if length > self.max_len:
      raise ValueError(f"sequences of {length} tokens but the model has {self.max_len} "
                       "positions (config.model.max_len)")
    positions = jnp.arange(length)[None, :]
    segments = tokens.get("segment_ids")
    segments = jnp.zeros_like(ids) if segments is None else segments
    return self.word(ids) + self.position(positions) + self.segment(segments)

  def __call__(self, tokens: dict, *, rngs: nnx.Rngs | None = None):
    mask = tokens["input_mask"]
    x = self.dropout(self.embedding_norm(self.embed(tokens).astype(self.dtype)), rngs=rngs)
    layers = [pool_tokens(x, mask, self.pool)]
    for block in self.blocks:
      if self.remat:
        x = nnx.remat(EncoderBlock.__call__)(block, x, rngs, mask)
      else:
        x = block(x, rngs, mask)
      layers.append(pool_tokens(x, mask, self.pool))
    hidden = x.astype(jnp.float32)
    z = layers[-1]
    if self.pool == "pooler":
      z = jnp.tanh(self.pooler(hidden[:, 0].astype(self.dtype)).astype(jnp.float32))
    return z, {"tokens": hidden, "layers": jnp.stack(layers)}


# --- the encoder interface of models.MODELS ------------------------------------------------------

def build(model_cfg, *, dtype, rngs: nnx.Rngs) -> Bert:
  return Bert(model_cfg.variant, vocab_size=model_cfg.vocab_size, max_len=model_cfg.max_len,
              type_vocab_size=model_cfg.type_vocab_size, pool=model_cfg.pool,
              pooler=model_cfg.pooler, dropout_rate=model_cfg.dropout_rate,
              attention_dropout_rate=model_cfg.attention_dropout_rate,
              remat=model_cfg.remat, dtype=dtype, rngs=rngs,
              **{f: model_cfg.get(f, 0) for f in transformer.SHAPE_FIELDS})


def feature_dim_of(model_cfg) -> int:
  return transformer.shape(parse_variant(model_cfg.variant), model_cfg)[0]


def describe(model_cfg) -> str:
  return (f"bert-{model_cfg.variant}(vocab_size={model_cfg.vocab_size},"
          f"max_len={model_cfg.max_len},type_vocab_size={model_cfg.type_vocab_size},"
          f"pool={model_cfg.pool},pooler={bool(model_cfg.pooler or model_cfg.pool == 'pooler')}"
          + transformer.describe_overrides(model_cfg) + ")")


def check(config) -> None:
  """The shape is buildable and the sequence length fits the position table."""
  transformer.shape(parse_variant(config.model.variant), config.model)
  if config.model.pool not in POOLS:
    raise ConfigError(f"BERT pool {config.model.pool!r} is not supported (config.model.pool); "
                      f"allowed: {list(POOLS)}")
  if config.text.max_length > config.model.max_len:
    raise ConfigError(f"config.text.max_length={config.text.max_length} is longer than the "
                      f"position table config.model.max_len={config.model.max_len}")
