"""Cross-field config checks, run once before any data is read or anything compiles.

Each failure is a one-line ConfigError naming the field, the value and what is allowed.
Dataset-level checks (name, splits, prepared files, classes) happen when the source is opened,
still before compilation.
"""

from mrl_jax import losses
from mrl_jax import models
from mrl_jax import optim
from mrl_jax import sharding
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.errors import ConfigError
from mrl_jax.models import heads as heads_lib
from mrl_jax.models import vit

NONFINITE_POLICIES = ("stop", "skip")


def parse_ints(text, field: str) -> tuple[int, ...]:
  """'1,5,10' (or a sequence) -> (1, 5, 10), each >= 1."""
  if text is None or text == "":
    return ()
  try:
    values = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text)
                   if str(v).strip())
  except ValueError:
    raise ConfigError(f"{field}={text!r} is not a comma-separated list of integers") from None
  for v in values:
    if v < 1:
      raise ConfigError(f"{field} has {v}; allowed: integers >= 1")
  return values


def validate_model(config) -> None:
  """Everything needed to build the model (the dry run checks only this)."""
  models.get_dtype(config.dtype)
  d = models.feature_dim(config)  # unknown encoder / depth / variant
  nesting = models.nesting_sizes(config)
  heads_lib.head_nesting(config.mrl.head, nesting, config.mrl.get("ff_size"), d)
  losses.parse_weights(config.mrl.weights, nesting)
  if config.mrl.sizes_per_step < 0:
    raise ConfigError(f"config.mrl.sizes_per_step={config.mrl.sizes_per_step}; allowed: >= 0")
  if config.loss.name not in losses.LOSSES:
    raise ConfigError(f"unknown loss {config.loss.name!r} (config.loss.name); allowed: "
                      f"{list(losses.LOSSES)}")
  if config.loss.name == "sigmoid_xent" and config.loss.label_smoothing:
    raise ConfigError(f"config.loss.label_smoothing={config.loss.label_smoothing} with "
                      "sigmoid_xent; label smoothing is defined for softmax_xent only")
  if config.num_classes < 1:
    raise ConfigError(f"config.num_classes={config.num_classes}; allowed: >= 1")
  if config.model_name == "vit":
    _, patch = vit.parse_variant(config.model.variant)
    for field, size in (("config.model.image_size", config.model.image_size),
                        ("config.input.image_size", config.input.image_size)):
      if size % patch:
        raise ConfigError(f"{field}={size} is not divisible by the ViT patch size {patch} "
                          f"(config.model.variant={config.model.variant!r})")
    eval_size = config.input.pp_eval.get("image_size")
    if eval_size and eval_size != config.model.image_size:
      raise ConfigError(f"config.input.pp_eval.image_size={eval_size} differs from "
                        f"config.model.image_size={config.model.image_size}; a ViT evaluates "
                        "at the resolution of its position embeddings")
    if config.model.image_size != config.input.image_size:
      raise ConfigError(f"config.model.image_size={config.model.image_size} differs from "
                        f"config.input.image_size={config.input.image_size}; the ViT position "
                        "embeddings need the input size")


def validate_config(config, num_devices: int, process_count: int = 1) -> None:
  """All cross-field invariants of a training/eval run."""
  validate_model(config)
  if config.input.reader not in pipeline.READERS:
    raise ConfigError(f"unknown reader {config.input.reader!r} (config.input.reader); "
                      f"allowed: {sorted(pipeline.READERS)}")
  for pp in (config.input.pp_train, config.input.pp_eval):
    if pp.name not in preprocess.PRESETS:
      raise ConfigError(f"unknown preprocessing {pp.name!r} (config.input.pp_*.name); "
                        f"allowed: {list(preprocess.PRESETS)}")
  if config.optim.weight_decay_rule not in optim.DECAY_RULES:
    raise ConfigError(f"unknown weight decay rule {config.optim.weight_decay_rule!r} "
                      f"(config.optim.weight_decay_rule); allowed: {list(optim.DECAY_RULES)}")
  if config.optim.weight_decay_rule == "official" and config.model_name != "resnet":
    raise ConfigError("config.optim.weight_decay_rule='official' names parameters as the "
                      "official PyTorch ResNet does; allowed for model_name='resnet' only")
  if config.optim.name not in optim.OPTIMIZERS:
    raise ConfigError(f"unknown optimizer {config.optim.name!r} (config.optim.name); "
                      f"allowed: {list(optim.OPTIMIZERS)}")
  if config.schedule.name not in optim.SCHEDULES:
    raise ConfigError(f"unknown schedule {config.schedule.name!r} (config.schedule.name); "
                      f"allowed: {list(optim.SCHEDULES)}")
  if config.on_nonfinite not in NONFINITE_POLICIES:
    raise ConfigError(f"config.on_nonfinite={config.on_nonfinite!r}; allowed: "
                      f"{list(NONFINITE_POLICIES)}")
  data, fsdp = sharding.mesh_shape(config.mesh, num_devices)
  shards = data * fsdp
  accum = config.optim.grad_accum_steps
  if accum < 1:
    raise ConfigError(f"config.optim.grad_accum_steps={accum}; allowed: >= 1")
  batch = config.input.batch_size
  if batch < 1 or batch % (shards * accum):
    raise ConfigError(
        f"config.input.batch_size={batch} is not divisible by the {shards} batch shards "
        f"(mesh data={data} x fsdp={fsdp}) x grad_accum_steps={accum}; allowed: multiples of "
        f"{shards * accum}")
  if batch % process_count:
    raise ConfigError(f"config.input.batch_size={batch} is not divisible by the "
                      f"{process_count} processes")
  eval_batch = config.input.get("eval_batch_size") or batch
  if eval_batch % shards or eval_batch % process_count:
    raise ConfigError(f"config.input.eval_batch_size={eval_batch} is not divisible by the "
                      f"{shards} batch shards and {process_count} processes")
  if config.total_steps is None and not config.total_epochs:
    raise ConfigError("set config.total_steps or config.total_epochs (> 0)")
  if config.total_steps is not None and config.total_steps < 1:
    raise ConfigError(f"config.total_steps={config.total_steps}; allowed: >= 1")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[field] < 1:
      raise ConfigError(f"config.{field}={config[field]}; allowed: >= 1")
  d = models.feature_dim(config)
  for m in parse_ints(config.eval.extra_sizes, "config.eval.extra_sizes"):
    if m > d:
      raise ConfigError(f"eval size {m} exceeds feature_dim {d} (config.eval.extra_sizes); "
                        f"allowed: 1 <= m <= {d}")
  chunk = config.eval.get("database_chunk_rows")
  if chunk is not None and chunk < 1:
    raise ConfigError(f"config.eval.database_chunk_rows={chunk}; allowed: >= 1, or None for "
                      "the whole database on the devices")
  parse_ints(config.eval.knn_k, "config.eval.knn_k")
  parse_ints(config.eval.retrieval_k, "config.eval.retrieval_k")
