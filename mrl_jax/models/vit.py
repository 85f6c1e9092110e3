"""Vision Transformer (Dosovitskiy et al. 2021), original layout, returning the pooled feature z.

Layout as in the original ViT / big_vision `vit.py`: patch embedding conv, a learned CLS token,
learned position embeddings, pre-LN blocks (x + MHSA(LN(x)), x + MLP(LN(x))), a final LayerNorm,
then the CLS token ("cls") or the mean of the patch tokens ("gap"; no CLS token, as big_vision).
ViT-B/16 at 224px has 86,567,656 parameters with its 1000-class head, i.e. 85,798,656 here.
No classifier lives here: the Matryoshka heads own it.

The blocks (transformer.py) are shared with the text encoder: attention goes through
`jax.nn.dot_product_attention`, so XLA may pick a fused (cuDNN flash) kernel on GPU; the
query/key/value projection is one fused matmul.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models import transformer
from mrl_jax.models.transformer import EncoderBlock

# width, depth, mlp_dim, heads (ViT paper Table 1; Ti/S from DeiT / big_vision).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
PATCHES = (8, 14, 16, 32)
POOLS = ("cls", "gap")


def parse_variant(variant: str) -> tuple[str, int]:
  """'B/16' -> ('B', 16), with a one-line error for anything else."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit() or int(patch) not in PATCHES:
    raise ConfigError(f"ViT variant {variant!r} is not supported (config.model.variant); "
                      f"allowed: <{'|'.join(VARIANTS)}>/<{'|'.join(map(str, PATCHES))}>, "
                      "e.g. 'B/16'")
  return name, int(patch)


class ViT(nnx.Module):
  """ViT encoder: images [B, H, W, C] -> (z [B, width] float32, aux).

  Args:
    variant: "<Ti|S|B|L|H>/<8|14|16|32>", e.g. "B/16".
    image_size: input resolution; must be divisible by the patch size (sets the number of
      position embeddings).
    pool: "cls" (CLS token, the original ViT) or "gap" (mean of patch tokens, no CLS token).
    dropout_rate: dropout after attention and in the MLP (the original ViT used 0.1 on 21k).
    remat: recompute each block's activations in the backward pass (saves memory).
    hidden_size, num_layers, mlp_dim, num_heads: override the variant's shape (0 = the
      variant's; small depths for debugging; transformer.shape).
  """

  def __init__(self, variant: str = "B/16", *, image_size: int = 224, pool: str = "cls",
               in_channels: int = 3, dropout_rate: float = 0.0, remat: bool = False,
               num_layers: int = 0, hidden_size: int = 0, mlp_dim: int = 0, num_heads: int = 0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    name, patch = parse_variant(variant)
    if pool not in POOLS:
      raise ConfigError(f"ViT pool {pool!r} is not supported (config.model.pool); "
                        f"allowed: {list(POOLS)}")
    if image_size % patch:
      raise ConfigError(f"image size {image_size} is not divisible by the ViT patch size {patch} "
                        f"(config.model.image_size, variant {variant!r})")
    width, depth, mlp_dim, num_heads = transformer.shape(
        VARIANTS[name], dict(hidden_size=hidden_size, num_layers=num_layers, mlp_dim=mlp_dim,
                             num_heads=num_heads))
    self.patch = patch
    self.pool = pool
    self.remat = remat
    self.dtype = dtype
    self.feature_dim = width
    self.embedding = nnx.Conv(in_channels, width, (patch, patch), (patch, patch),
                              padding="VALID", dtype=dtype, rngs=rngs)
    num_tokens = (image_size // patch)**2 + (pool == "cls")
    self.cls = nnx.Param(jnp.zeros((1, 1, width))) if pool == "cls" else None
    self.pos_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, num_tokens, width)))
    self.blocks = nnx.List([
        EncoderBlock(width, mlp_dim, num_heads, dropout_rate, dtype=dtype, rngs=rngs)
        for _ in range(depth)
    ])
    # Final LayerNorm and pooling in float32: z is float32 whatever the compute dtype.
    self.encoder_norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=jnp.float32, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None):
    x = self.embedding(x.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, d)), x], 1)
    if x.shape[1] != self.pos_embedding.shape[1]:
      raise ValueError(f"input gives {x.shape[1]} tokens but the model was built for "
                       f"{self.pos_embedding.shape[1]} (config.model.image_size)")
    x = self.dropout(x + self.pos_embedding[...].astype(x.dtype), rngs=rngs)
    for block in self.blocks:
      x = nnx.remat(EncoderBlock.__call__)(block, x, rngs) if self.remat else block(x, rngs)
    x = self.encoder_norm(x.astype(jnp.float32))
    z = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)  # [B, width]
    return z, {"tokens": x}




# --- the encoder interface of models.MODELS ------------------------------------------------------

def build(model_cfg, *, dtype, rngs: nnx.Rngs) -> ViT:
  return ViT(model_cfg.variant, image_size=model_cfg.image_size,
             pool=model_cfg.get("pool", "cls"), in_channels=model_cfg.get("in_channels", 3),
             dropout_rate=model_cfg.get("dropout_rate", 0.0), remat=model_cfg.get("remat", False),
             dtype=dtype, rngs=rngs,
             **{f: model_cfg.get(f, 0) for f in transformer.SHAPE_FIELDS})


def feature_dim_of(model_cfg) -> int:
  return transformer.shape(VARIANTS[parse_variant(model_cfg.variant)[0]], model_cfg)[0]


def describe(model_cfg) -> str:
  return (f"vit-{model_cfg.variant}(image_size={model_cfg.image_size},"
          f"pool={model_cfg.get('pool', 'cls')},in_channels={model_cfg.get('in_channels', 3)}"
          + transformer.describe_overrides(model_cfg) + ")")


def check(config) -> None:
  """The input size must tile into patches and equal the size the position embeddings are
  built for, at train and at eval resolution."""
  name, patch = parse_variant(config.model.variant)
  transformer.shape(VARIANTS[name], config.model)
  for field, size in (("config.model.image_size", config.model.image_size),
                      ("config.input.image_size", config.input.image_size)):
    if size % patch:
      raise ConfigError(f"{field}={size} is not divisible by the ViT patch size {patch} "
                        f"(config.model.variant={config.model.variant!r})")
  eval_size = config.input.pp_eval.get("image_size")
  if eval_size and eval_size != config.model.image_size:
    raise ConfigError(f"config.input.pp_eval.image_size={eval_size} differs from "
                      f"config.model.image_size={config.model.image_size}; a ViT evaluates at "
                      "the resolution of its position embeddings")
  if config.model.image_size != config.input.image_size:
    raise ConfigError(f"config.model.image_size={config.model.image_size} differs from "
                      f"config.input.image_size={config.input.image_size}; the ViT position "
                      "embeddings need the input size")
