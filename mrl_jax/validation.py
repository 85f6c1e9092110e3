"""Cross-field config checks, run once before any data is read or anything compiles.

`validate` resolves the config into the run's ModelSpec (models.resolve) and checks every other
field against it; each failure is a one-line ConfigError naming the field, the value and what
is allowed. Dataset-level checks (name, splits, prepared files, classes) happen when the source
is opened, still before compilation.
"""

from mrl_jax import contrastive
from mrl_jax import losses
from mrl_jax import models
from mrl_jax import nesting
from mrl_jax import optim
from mrl_jax import paths
from mrl_jax import sharding
from mrl_jax import utils
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.data import text
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import adaptive_retrieval
from mrl_jax.evaluation import baselines
from mrl_jax.evaluation import image_text as image_text_eval
from mrl_jax.evaluation import quantize
from mrl_jax.evaluation import text as text_eval

NONFINITE_POLICIES = ("stop", "skip")


def positive_ints(values, field: str) -> tuple[int, ...]:
  """A tuple of integers >= 1 from a config list (or a one-line error)."""
  if isinstance(values, (str, int)):
    raise ConfigError(f"{field}={values!r} is not a tuple of integers; e.g. (1, 10) (on the "
                      f"command line: --{field}='(1,10)')")
  out = tuple(values)
  for v in out:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f"{field} has {v!r}; allowed: integers >= 1")
  return out


def validate_model(config) -> models.ModelSpec:
  """Everything needed to build the model (the dry run checks only this); the ModelSpec.
  Path fields get their leading ~ expanded first (paths.expand_config)."""
  paths.expand_config(config)
  spec = models.resolve(config)
  dropped = fit_eval_sizes(config.eval, spec.feature_dim)
  if dropped:
    utils.console(f"NOTE: eval sizes above the feature dim {spec.feature_dim} are skipped: "
                  + "; ".join(f"config.eval.{k} {v}" for k, v in dropped.items()))
  losses.nesting_weights(config.mrl.weights, spec.head_sizes)
  if config.mrl.sizes_per_step < 0:
    raise ConfigError(f"config.mrl.sizes_per_step={config.mrl.sizes_per_step}; allowed: >= 0")
  if config.loss.name not in losses.LOSSES:
    raise ConfigError(f"unknown loss {config.loss.name!r} (config.loss.name); allowed: "
                      f"{list(losses.LOSSES)}")
  if config.loss.name == "sigmoid_xent" and config.loss.label_smoothing:
    raise ConfigError(f"config.loss.label_smoothing={config.loss.label_smoothing} with "
                      "sigmoid_xent; label smoothing is defined for softmax_xent only")
  check_unused_loss_fields(config, spec)
  return spec


def check_unused_loss_fields(config, spec) -> None:
  """A loss field the objective would silently ignore is a one-line error."""
  c = config.contrastive
  if spec.objective != "classify" and config.loss.label_smoothing:
    raise ConfigError(f"config.loss.label_smoothing={config.loss.label_smoothing} with "
                      f"config.objective={spec.objective!r}; it applies to classifier heads "
                      "only (a dual encoder's softmax loss: config.contrastive.label_smoothing)")
  if spec.model_name == models.DUAL:
    if c.loss == "sigmoid" and c.label_smoothing:
      raise ConfigError(f"config.contrastive.label_smoothing={c.label_smoothing} with "
                        "config.contrastive.loss='sigmoid'; label smoothing is defined for the "
                        "softmax loss only")
  elif spec.objective == "contrastive":
    for field, default in (("loss", "softmax"), ("label_smoothing", 0.0),
                           ("per_size_scale", False)):
      if c[field] != default:
        raise ConfigError(f"config.contrastive.{field}={c[field]!r} with a text encoder; it "
                          "applies to dual encoders only (text pairs use sentence-transformers' "
                          "MultipleNegativesRankingLoss at config.contrastive.scale)")


def validate(config, num_devices: int, process_count: int = 1) -> models.ModelSpec:
  """All cross-field invariants of a training/eval run; returns the run's ModelSpec."""
  spec = validate_model(config)
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
  if config.optim.weight_decay_rule == "official" and spec.model_name != "resnet":
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
  if batch < 1:
    raise ConfigError(f"config.input.batch_size={batch}; allowed: a positive multiple of "
                      f"{shards * accum} (batch shards x grad_accum_steps)")
  if batch % (shards * accum):
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
  validate_eval(config.eval, spec)
  if spec.objective != "classify":
    validate_text(config, spec)
  return spec


def validate_text(config, spec: models.ModelSpec) -> None:
  """config.text / config.contrastive / the text evaluations of a text model."""
  t = config.text
  if isinstance(t.features, str) or not t.features:
    raise ConfigError(f"config.text.features={t.features!r}; allowed: a tuple of text "
                      "features, e.g. ('text',) or ('anchor', 'positive')")
  if t.pair_mode not in text.PAIR_MODES:
    raise ConfigError(f"config.text.pair_mode={t.pair_mode!r}; allowed: {list(text.PAIR_MODES)}")
  if (spec.objective == "contrastive" and spec.model_name != models.DUAL
      and t.pair_mode == "columns" and len(t.features) != 2):
    raise ConfigError(f"config.text.features={tuple(t.features)} with pair_mode='columns' "
                      "needs two text features (anchor, positive); or set pair_mode='crop'")
  if not 0.0 < t.mask_rate < 1.0:
    raise ConfigError(f"config.text.mask_rate={t.mask_rate}; allowed: 0 < rate < 1")
  if spec.objective == "mlm" and not 1 <= t.max_predictions <= t.max_length:
    raise ConfigError(f"config.text.max_predictions={t.max_predictions}; allowed: 1 .. "
                      f"config.text.max_length ({t.max_length})")
  if t.crop_tokens < 0 or t.crop_tokens > t.max_length - 2:
    raise ConfigError(f"config.text.crop_tokens={t.crop_tokens}; allowed: 0 .. max_length - 2 "
                      f"({t.max_length - 2})")
  c = config.contrastive
  if c.scale <= 0:
    raise ConfigError(f"config.contrastive.scale={c.scale}; allowed: > 0")
  if c.kl_temperature < 0:
    raise ConfigError(f"config.contrastive.kl_temperature={c.kl_temperature}; allowed: >= 0")
  if not isinstance(c.tile_rows, int) or c.tile_rows < 0:
    raise ConfigError(f"config.contrastive.tile_rows={c.tile_rows!r}; allowed: an int >= 0 "
                      "(0: the whole batch at once)")
  if spec.objective == "contrastive" and config.input.batch_size < 2:
    raise ConfigError(f"config.input.batch_size={config.input.batch_size}: in-batch negatives "
                      "need a batch of at least 2")
  if isinstance(config.eval.quantize, str):
    raise ConfigError(f"config.eval.quantize={config.eval.quantize!r} is not a tuple; e.g. "
                      "('int8', 'binary')")
  for kind in config.eval.quantize:
    quantize.check_kind(kind)
  text_eval.parse_sets(config.eval.text_sets)
  if spec.model_name == models.DUAL:
    image_text_eval.parse_sets(config.eval.image_text_sets)
    if config.contrastive.loss not in contrastive.LOSSES:
      raise ConfigError(f"config.contrastive.loss={config.contrastive.loss!r}; allowed: "
                        f"{list(contrastive.LOSSES)}")
    if config.contrastive.scale <= 0:
      raise ConfigError(f"config.contrastive.scale={config.contrastive.scale}; allowed: > 0")


def validate_source(config, spec: models.ModelSpec, source) -> None:
  """The training dataset has what the objective reads (text features for text models)."""
  if spec.model_name == models.DUAL:
    if source.kind != "image_text":
      raise ConfigError(f"dataset {source.name!r} has no image and text feature "
                        f"{config.input.caption_key!r} (config.input.caption_key); an image-text "
                        "model needs both")
    return
  if spec.objective == "classify":
    if source.kind != "image":
      raise ConfigError(f"dataset {source.name!r} has no image feature "
                        f"{config.input.get('image_key', 'image')!r} (config.input.image_key); "
                        f"a classifier needs images")
    return
  missing = [k for k in config.text.features if k not in source.text_keys]
  if source.kind != "text" or missing:
    raise ConfigError(f"dataset {source.name!r} has no text feature "
                      f"{(missing or list(config.text.features))[0]!r} (config.text.features); "
                      f"available: {sorted(source.text_keys)}")


def fit_eval_sizes(ev, feature_dim: int) -> dict[str, list]:
  """Drops, in place, the eval sizes above the feature dim (a paper config at a smaller width,
  e.g. --config.model.width=8: its interpolated, shortlist and rerank sizes and funnels are the
  published model's); returns {field: what was dropped}. Training sizes (config.mrl.nesting)
  are never dropped: they stay errors."""
  dropped = {}
  for field in ("extra_sizes", "shortlist_sizes", "rerank_sizes"):
    kept, above = nesting.split_at(ev[field], feature_dim, f"config.eval.{field}")
    if above:
      ev[field], dropped[field] = kept, list(above)
  funnels = [f for f in ev.funnels if _funnel_fits(f, feature_dim)]
  if len(funnels) < len(ev.funnels):
    dropped["funnels"] = [f for f in ev.funnels if f not in funnels]
    ev.funnels = tuple(funnels)
  return dropped


def _funnel_fits(funnel, feature_dim: int) -> bool:
  """A funnel (Ds, (Dr, ...), (K, ...)) whose sizes all fit (malformed ones are kept for
  funnels_from_config's error)."""
  try:
    sizes = (funnel[0], *funnel[1])
    return not any(isinstance(m, int) and m > feature_dim for m in sizes)
  except (TypeError, IndexError):
    return True


def validate_eval_adaptive(ev, feature_dim: int) -> None:
  """The adaptive-retrieval fields of config.eval (also embeddings-only mode's flags)."""
  positive_ints(ev.shortlist_k, "config.eval.shortlist_k")
  adaptive_retrieval.funnels_from_config(ev, feature_dim)  # sizes, K and funnel shapes
  adaptive_retrieval.check_engines(ev.get("shortlist_engines", ("exact",)))
  for field in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
    if field in ev and ev[field] < 1:
      raise ConfigError(f"config.eval.{field}={ev[field]}; allowed: >= 1")


def validate_eval(ev, spec: models.ModelSpec) -> None:
  """config.eval: every list a tuple of valid values (sizes within the feature dim)."""
  for field in ("knn_k", "retrieval_k", "shortlist_k", "fewshot_shots"):
    positive_ints(ev[field], f"config.eval.{field}")
  for cap in positive_ints(ev.ac_caps, "config.eval.ac_caps"):
    if cap not in spec.head_sizes:
      raise ConfigError(f"config.eval.ac_caps has {cap}; allowed: sizes with a head "
                        f"{list(spec.head_sizes)}")
  validate_eval_adaptive(ev, spec.feature_dim)
  for kind in ev.baselines:
    if kind not in baselines.KINDS:
      raise ConfigError(f"unknown baseline {kind!r} (config.eval.baselines); allowed: "
                        f"{list(baselines.KINDS)}")
  if isinstance(ev.splits, str):
    raise ConfigError(f"config.eval.splits={ev.splits!r} is not a tuple; e.g. "
                      "('imagenet_v2:test',)")
  chunk = ev.get("database_chunk_rows")
  if chunk is not None and chunk < 1:
    raise ConfigError(f"config.eval.database_chunk_rows={chunk}; allowed: >= 1, or None for "
                      "the whole database on the devices")
