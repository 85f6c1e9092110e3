"""Classification (ResNet, ViT): Matryoshka heads on z and the weighted per-size cross-entropy.

The loss is losses.matryoshka_loss (softmax or sigmoid, label smoothing) of every head's
logits; the periodic evaluation is the evaluators' linear evaluator on the eval split, exactly
what eval.py reports (`top1@m`, `top5@m`; multi-label `prec1@m`, `class_map@m`).
"""

from mrl_jax import losses
from mrl_jax.data import preprocess
from mrl_jax.evaluation import evaluators
from mrl_jax.evaluation import extract as extract_lib
from mrl_jax.evaluation import linear


class Objective:

  def __init__(self, config, spec):
    self.config = config
    self.spec = spec
    self.sizes = spec.head_sizes
    self.hit = "top1"  # multi-label data: prec1 (train_lib picks what the metrics have)

  def loss(self, module, batch, *, rngs, weights, rng):
    del rng  # no sampling beyond the sizes
    _, logits = module(batch["image"], rngs=rngs)
    return losses.matryoshka_loss(logits, batch["label"], loss=self.config.loss.name,
                                  weights=weights,
                                  label_smoothing=self.config.loss.label_smoothing)

  def train_preprocess(self, source, steps_per_epoch: int):
    return preprocess.train_from_config(self.config.input, channels=source.channels,
                                        steps_per_epoch=steps_per_epoch)

  def evaluate(self, model, state, source, reader, mesh) -> dict[str, float]:
    """The linear evaluator on the eval split: {top1@m, top5@m} (multi-label: {prec1@m,
    class_map@m}), from features extracted with the eval preprocessing, as eval.py."""
    config = self.config
    features = extract_lib.extract(model, state.params, state.batch_stats, source=source,
                                   reader=reader, split=config.input.eval_split,
                                   input_cfg=config.input, mesh=mesh, show_progress=False)
    inputs = evaluators.Inputs(
        query_sets={"val": features.labelled()}, num_classes=self.spec.num_classes,
        heads=linear.HeadLogits(model, state.params, state.batch_stats, mesh))
    return {name.removeprefix("val/").removeprefix("linear_").replace("prec@1", "prec1"): value
            for name, value in evaluators.Linear().run(inputs)}
