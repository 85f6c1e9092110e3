"""Matryoshka image-text contrastive learning (the paper's ALIGN experiment, Sec. 3 / App. C).

A batch holds images and one caption each (data/image_text.py: a caption drawn per example
from its captions). The dual encoder (models/two_towers.py) gives unnormalised z_img, z_txt;
at every nesting size both prefixes are renormalised and contrasted over the global batch
(contrastive.py): CLIP / ALIGN's softmax loss in both directions (label smoothing:
config.contrastive.label_smoothing, ALIGN's 0.1) or SigLIP's sigmoid loss, with the model's
learned scale exp(t') (clipped at 100, as CLIP) and, for the sigmoid loss, its learned bias;
one (t', b) shared by every size, or one per size (config.contrastive.per_size_scale). Weights
and k-of-n size sampling from config.mrl, all sizes' logits from one pass.

The periodic evaluation runs the image-text evaluators of config.eval (evaluation/image_text.py):
retrieval Recall@k both ways, zero-shot top-1, the cosine gap, at every size.
"""

import math

import jax.numpy as jnp

from mrl_jax import contrastive
from mrl_jax.data import image_text
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import evaluate as evaluate_lib

MAX_LOG_SCALE = math.log(100.0)  # CLIP clips its logit scale at 100


class Objective:

  def __init__(self, config, spec):
    self.config = config
    self.spec = spec
    self.sizes = spec.head_sizes
    self.hit = "acc"
    cfg = config.contrastive
    if cfg.loss not in contrastive.LOSSES:
      raise ConfigError(f"config.contrastive.loss={cfg.loss!r}; allowed: "
                        f"{list(contrastive.LOSSES)}")
    self.loss_name = cfg.loss
    self.label_smoothing = float(cfg.label_smoothing)
    self.tile_rows = int(cfg.tile_rows)

  def loss(self, module, batch, *, rngs, weights, rng):
    del rng
    z_img, z_txt = module(batch, rngs=rngs)
    scale = jnp.exp(jnp.minimum(module.log_scale[...], MAX_LOG_SCALE))
    bias = None if module.bias is None else module.bias[...]
    loss, metrics = contrastive.matryoshka_contrastive_loss(
        z_img, z_txt, self.sizes, weights, scale=scale, bias=bias, loss=self.loss_name,
        symmetric=True, label_smoothing=self.label_smoothing, tile_rows=self.tile_rows)
    # One learned scale (and bias) shared by the sizes, or one per size: each is logged.
    named = [""] if scale.shape[0] == 1 else [f"@{m}" for m in self.sizes]
    for i, suffix in enumerate(named):
      metrics[f"scale{suffix}"] = scale[i]
      if bias is not None:
        metrics[f"bias{suffix}"] = bias[i]
    return loss, metrics

  def train_preprocess(self, source, steps_per_epoch: int):
    return image_text.from_config(self.config, source, train=True,
                                  steps_per_epoch=steps_per_epoch)

  def evaluate(self, model, state, source, reader, mesh) -> dict[str, float]:
    results = evaluate_lib.text_metrics(self.config, self.spec, model, state.params,
                                        state.batch_stats, mesh, quantize=False)
    return {name: value for name, value in results if isinstance(value, (int, float))}
