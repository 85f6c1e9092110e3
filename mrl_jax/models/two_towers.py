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
(optim.py) and it runs in eval mode (BatchNorm running statistics, no dropout).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.models import pixels

TOWERS = ("image", "text")
FREEZE = ("", "image", "text")


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

  def embed_image(self, images, *, rngs=None):
    z, _ = self.image(pixels.normalize(images, self.pixel_mean, self.pixel_std), rngs=rngs)
    z = z.astype(jnp.float32)
    return z if self.image_projection is None else self.image_projection(z)

  def embed_text(self, tokens, *, rngs=None):
    z, _ = self.text(tokens, rngs=rngs)
    z = z.astype(jnp.float32)
    return z if self.text_projection is None else self.text_projection(z)

  def __call__(self, batch: dict, *, rngs: nnx.Rngs | None = None):
    z_img = self.embed_image(batch["image"], rngs=rngs)
    tokens = {k: batch[k] for k in ("input_ids", "segment_ids", "input_mask")}
    z_txt = self.embed_text(tokens, rngs=rngs)
    if self.freeze == "image":
      z_img = jax.lax.stop_gradient(z_img)
    elif self.freeze == "text":
      z_txt = jax.lax.stop_gradient(z_txt)
    return z_img, z_txt
