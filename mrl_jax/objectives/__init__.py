"""What the train step computes, per model family: one small module per objective.

The trainer (train_lib.py) has one loop and one step builder; an objective says what the step
computes from the merged model and a batch, which input pipeline feeds it, and what the
in-training evaluation measures:
- `classify` (classify.py): heads on z, softmax / sigmoid Matryoshka cross-entropy (ResNet, ViT);
- `mlm` (mlm.py): BERT's masked LM with the tied head nested (MRL-E), paper Sec. 3;
- `contrastive` (contrastive_text.py): in-batch-negatives InfoNCE at every size, optionally
  2D Matryoshka (layers x dims), for sentence embeddings; with a dual encoder
  (contrastive_image_text.py) CLIP / ALIGN / SigLIP losses between images and captions.
Each module defines `Objective(config, spec)` with `sizes`, `hit` (the per-size metric the
console line shows), `loss(module, batch, *, rngs, weights, rng)`, `train_preprocess(...)`,
`eval_preprocess(...)` and `evaluate(...)`.
"""

from mrl_jax import models
from mrl_jax.errors import ConfigError
from mrl_jax.objectives import classify
from mrl_jax.objectives import contrastive_image_text
from mrl_jax.objectives import contrastive_text
from mrl_jax.objectives import mlm

OBJECTIVES = {"classify": classify, "mlm": mlm, "contrastive": contrastive_text}


def create(config, spec):
  """The Objective of the run's ModelSpec."""
  if spec.objective not in OBJECTIVES:
    raise ConfigError(f"unknown objective {spec.objective!r} (config.objective); allowed: "
                      f"{sorted(OBJECTIVES)}")
  if spec.model_name == models.DUAL:  # image-text pairs through the two towers
    return contrastive_image_text.Objective(config, spec)
  return OBJECTIVES[spec.objective].Objective(config, spec)
