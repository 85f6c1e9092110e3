"""Matryoshka sentence embeddings: in-batch-negatives InfoNCE at every size, optionally 2D.

A batch holds (anchor, positive) text pairs (data/text.py task `pair`: two columns, or two
random crops of one text). Both go through the encoder in one call; z is the pooled last layer.
The loss (contrastive.py) is sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss)
(config.contrastive: scale 20, one direction; `symmetric` for both), with the sizes' weights and
k-of-n size sampling of config.mrl; the negatives are the whole global batch. With
config.contrastive.two_d, 2D Matryoshka (layers x dims) adds the sampled earlier layers and the
KL term; the last layer always trains its full size (keep_largest is forced there).

The periodic evaluation runs the text evaluators of config.eval.text_sets (evaluation/text.py),
those eval.py runs, and reports their per-size metrics (`spearman@m`, `ndcg@10@m`, ...).
"""

import jax
import jax.numpy as jnp

from mrl_jax import contrastive
from mrl_jax import losses
from mrl_jax.data import text
from mrl_jax.evaluation import evaluate as evaluate_lib


def split_pair(batch: dict) -> tuple[dict, int]:
  """The anchor and positive token arrays stacked into one [2B, L] batch."""
  tokens = {k: jnp.concatenate([batch[f"anchor_{k}"], batch[f"positive_{k}"]])
            for k in ("input_ids", "segment_ids", "input_mask")}
  return tokens, batch["anchor_input_ids"].shape[0]


class Objective:

  def __init__(self, config, spec):
    self.config = config
    self.spec = spec
    self.sizes = spec.head_sizes
    self.hit = "acc"
    cfg = config.contrastive
    self.scale = float(cfg.scale)
    self.symmetric = bool(cfg.symmetric)
    self.two_d = bool(cfg.two_d)
    self.tile_rows = int(cfg.tile_rows)

  def loss(self, module, batch, *, rngs, weights, rng):
    tokens, b = split_pair(batch)
    z, aux = module(tokens, rngs=rngs)
    if not self.two_d:
      return contrastive.matryoshka_contrastive_loss(z[:b], z[b:], self.sizes, weights,
                                                     scale=self.scale, symmetric=self.symmetric,
                                                     tile_rows=self.tile_rows)
    cfg, mrl = self.config.contrastive, self.config.mrl
    layers = aux["layers"]  # [L + 1, 2B, d]
    num_earlier = layers.shape[0] - 1
    layer_rng, size_rng, last_rng = jax.random.split(rng, 3)
    base = jnp.asarray(losses.nesting_weights(mrl.weights, self.sizes), jnp.float32)
    last = losses.sample_nesting_weights(last_rng, base, mrl.sizes_per_step,
                                         keep_smallest=mrl.keep_smallest, keep_largest=True)
    prior = jnp.stack([
        losses.sample_nesting_weights(jax.random.fold_in(size_rng, layer), base,
                                      mrl.sizes_per_step, keep_smallest=mrl.keep_smallest,
                                      keep_largest=mrl.keep_largest)
        for layer in range(num_earlier)])
    mask = contrastive.sample_layers(layer_rng, num_earlier, cfg.layers_per_step)
    return contrastive.matryoshka_2d_loss(
        layers[:, :b], layers[:, b:], self.sizes, last, prior, mask, scale=self.scale,
        symmetric=self.symmetric, last_layer_weight=cfg.last_layer_weight,
        prior_layers_weight=cfg.prior_layers_weight, kl_div_weight=cfg.kl_div_weight,
        kl_temperature=cfg.kl_temperature, tile_rows=self.tile_rows)

  def train_preprocess(self, source, steps_per_epoch: int):
    del steps_per_epoch
    return text.from_config(self.config, task="pair")

  def evaluate(self, model, state, source, reader, mesh) -> dict[str, float]:
    """The text evaluators of config.eval.text_sets: {"<set>/<metric>@m": value}, as eval.py
    names them (several sets keep apart)."""
    results = evaluate_lib.text_metrics(self.config, self.spec, model, state.params,
                                        state.batch_stats, mesh, quantize=False)
    return {name: value for name, value in results if isinstance(value, (int, float))}
