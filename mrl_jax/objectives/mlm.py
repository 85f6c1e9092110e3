"""Matryoshka masked-language modelling (paper Sec. 3 / Appendix C, BERT): MRL-E on BERT's head.

The batch holds BERT's masking (data/text.py: 15 % of the tokens, 80/10/10, at most
`max_predictions` per sequence); the model gives the tied logits of every nesting size at the
masked positions (models/mlm.py); the loss is the weighted sum over sizes of the mean
cross-entropy over real predictions (losses.matryoshka_loss with the predictions' weights as its
mask). Logged and evaluated per size: `mlm_acc@m`, the masked-token accuracy (the paper's BERT
metric, Fig. 8 / its `BERT MLM` plots).
"""

from mrl_jax import losses
from mrl_jax.data import text
from mrl_jax.evaluation import text as text_eval


def mlm_loss(logits_by_size, batch, weights):
  """(loss, {loss@m, mlm_acc@m}) over the real predictions of [B, P, V] logits."""
  flat = {m: l.reshape(-1, l.shape[-1]) for m, l in logits_by_size.items()}
  loss, metrics = losses.matryoshka_loss(flat, batch["masked_ids"].reshape(-1), weights=weights,
                                         mask=batch["masked_weights"].reshape(-1))
  return loss, {k.replace("top1@", "mlm_acc@"): v for k, v in metrics.items()}


class Objective:

  def __init__(self, config, spec):
    self.config = config
    self.spec = spec
    self.sizes = spec.head_sizes
    self.hit = "mlm_acc"

  def loss(self, module, batch, *, rngs, weights, rng):
    del rng
    _, logits = module(batch, rngs=rngs)
    return mlm_loss(logits, batch, weights)

  def train_preprocess(self, source, steps_per_epoch: int):
    del steps_per_epoch
    return text.from_config(self.config, task="mlm", keys=self.config.text.features[:1])

  def evaluate(self, model, state, source, reader, mesh) -> dict[str, float]:
    """Masked-token accuracy (and loss) per size on the eval split, with BERT's masking drawn
    from seed 0 at each example's position (the same masks at every evaluation)."""
    return text_eval.mlm_accuracy(self.config, model, state.params, state.batch_stats, source,
                                  reader, self.config.input.eval_split, mesh)
