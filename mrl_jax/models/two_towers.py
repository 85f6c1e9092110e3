"""ALIGN / CLIP / SigLIP-style dual encoder: an image tower and a text tower, unnormalised.

Any image encoder of the registry (ResNet, ViT) and the BERT-style text encoder, each with an
optional linear projection to a common width d (`config.model.projection`; 0: none, the towers'
widths must then be equal), and the loss's learned parameters: a log-scale t' (logits = exp(t')
x cosine; big_vision's `t`, initialised at log(config.contrastive.scale)), and for the sigmoid
loss a bias (SigLIP, initialised at config.contrastive.bias_init = -10). With
`per_size_scale` there is one (t', b) per nesting size.

The model returns the **unnormalised** z_img, z_txt [B, d]: MRL normalises each prefix in the
loss (paper Sec. 3 and Appendix C; big_vision's two_towers normalises the full vector inside the
model, which would make every prefix's norm depend on the others' coordinates). A tower can be
frozen (`config.model.freeze = "image"`, LiT: Zhai et al. 2022): its parameters get no update
(optim.py) and it runs in eval mode (BatchNorm running statistics, no dropout). The locked tower
is the encoder alone: its projection is trained (the stop-gradient sits between the two), since
a projection trained to the new tower is what lets a locked 2048-d image tower meet a text tower
of another width; a projection that only decayed would shrink every embedding each step.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.models import pixels

TOWERS = ("image", "text")
FREEZE = ("", "image", "text")
NAME = "two_towers"


def describe(image: str, text: str, projection: int) -> str:
  """A dual encoder's architecture in checkpoint signatures, from its towers' descriptions."""
  return f"{NAME}({image},{text},projection={projection})"


def parse_description(encoder: str) -> tuple[str, str, int] | None:
  """(image, text, projection) of a `describe` string; None for a single encoder's."""
  if not encoder.startswith(f"{NAME}(") or not encoder.endswith(")"):
    return None
  parts, depth, start = [], 0, len(NAME) + 1
  for i, char in enumerate(encoder[start:-1], start):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append(encoder[start:i])
      start = i + 1
  parts.append(encoder[start:-1])
  if len(parts) != 3 or not parts[2].startswith("projection="):
    return None
  return parts[0], parts[1], int(parts[2].removeprefix("projection="))


class TwoTowers(nnx.Module):
  """batch {image, input_ids, segment_ids, input_mask} -> (z_img, z_txt), unnormalised."""

  def __init__(self, image_encoder: nnx.Module, text_encoder: nnx.Module, *, projection: int,
               num_scales: int, scale_init: float, bias_init: float | None,
               pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...], freeze: str = "",
               rngs: nnx.Rngs):
    self.image = image_encoder
    self.pixel_mean, self.pixel_std = pixel_mean, pixel_std  # uint8 images: models/pixels.py
    self.text = text_encoder
    self.freeze = freeze
    init = nnx.initializers.normal(0.02)
    self.image_projection = (nnx.Linear(image_encoder.feature_dim, projection, use_bias=False,
                                        kernel_init=init, rngs=rngs) if projection else None)
    self.text_projection = (nnx.Linear(text_encoder.feature_dim, projection, use_bias=False,
                                       kernel_init=init, rngs=rngs) if projection else None)
    self.feature_dim = projection or image_encoder.feature_dim
    self.log_scale = nnx.Param(jnp.full((num_scales,), jnp.log(scale_init), jnp.float32))
    self.bias = (nnx.Param(jnp.full((num_scales,), bias_init, jnp.float32))
                 if bias_init is not None else None)

  def _project(self, tower: str, z, projection):
    z = z.astype(jnp.float32)
    if self.freeze == tower:
      z = jax.lax.stop_gradient(z)
    return z if projection is None else projection(z)

  def embed_image(self, images, *, rngs=None):
    z, _ = self.image(pixels.normalize(images, self.pixel_mean, self.pixel_std), rngs=rngs)
    return self._project("image", z, self.image_projection)

  def embed_text(self, tokens, *, rngs=None):
    z, _ = self.text(tokens, rngs=rngs)
    return self._project("text", z, self.text_projection)

  def __call__(self, batch: dict, *, rngs: nnx.Rngs | None = None):
    z_img = self.embed_image(batch["image"], rngs=rngs)
    tokens = {k: batch[k] for k in ("input_ids", "segment_ids", "input_mask")}
    return z_img, self.embed_text(tokens, rngs=rngs)
