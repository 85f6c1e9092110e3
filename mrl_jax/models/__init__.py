"""The encoder registry, the resolved model description (ModelSpec) and the Matryoshka model.

`resolve(config)` reads config.model / config.mrl / config.eval once and returns a frozen
ModelSpec (encoder, feature dim, head type, nesting, head sizes, eval sizes, signature); every
module below the entry points receives the spec instead of re-deriving these from the config.
Each encoder module (resnet.py, vit.py) supplies its own `build`, `feature_dim_of`, `describe`
and `check` from its config section.
"""

import dataclasses
from types import ModuleType

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax import nesting as nesting_lib
from mrl_jax.data import tokenizers
from mrl_jax.errors import ConfigError
from mrl_jax.models import bert
from mrl_jax.models import heads as heads_lib
from mrl_jax.models import mlm as mlm_lib
from mrl_jax.models import pixels
from mrl_jax.models import resnet
from mrl_jax.models import torchvision_layout
from mrl_jax.models import two_towers
from mrl_jax.models import vit

MODELS: dict[str, ModuleType] = {"resnet": resnet, "vit": vit, "bert": bert}
# A dual encoder (models/two_towers.py) holds an image encoder of MODELS (config.image_tower)
# and the text encoder (config.text_tower).
DUAL = two_towers.NAME
# What is trained (objectives/): classifier heads, BERT's tied masked-LM head, or the embedding
# itself with a contrastive loss.
OBJECTIVES = ("classify", "mlm", "contrastive")
TEXT_MODELS = ("bert",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def encoder_module(model_name: str, field: str = "config.model_name") -> ModuleType:
  if model_name not in MODELS:
    raise ConfigError(f"unknown encoder {model_name!r} ({field}); allowed: "
                      f"{sorted(MODELS) + ([DUAL] if field == 'config.model_name' else [])}")
  return MODELS[model_name]


def tower_config(config, tower: str):
  """The config a tower's encoder module reads: config.model replaced by config.<tower>_tower."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.model = config[f"{tower}_tower"]
  return out


def get_dtype(name: str):
  if name not in DTYPES:
    raise ConfigError(f"unknown dtype {name!r} (config.dtype); allowed: {sorted(DTYPES)}")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the config resolves to, once per run."""
  model_name: str
  encoder: str  # the encoder and its architecture fields, e.g. "resnet50(width=64,...)"
  feature_dim: int
  head: str  # mrl | mrle | ff (classify); mlm / mlm_untied (BERT's MLM head); none (contrastive)
  nesting: tuple[int, ...]  # config.mrl.nesting, validated
  head_sizes: tuple[int, ...]  # sizes with a trained head: nesting, or (ff_size,) for FF-m
  eval_sizes: tuple[int, ...]  # nesting, head sizes and config.eval.extra_sizes (<= d)
  num_classes: int  # classes (classify), the vocabulary (mlm), 0 (contrastive)
  objective: str = "classify"
  tokenizer: str | None = None  # text models: the tokenizer's fingerprint

  @property
  def efficient(self) -> bool:
    return self.head == "mrle"

  @property
  def signature(self) -> dict:
    """What makes two checkpoints interchangeable: encoder, head, sizes, classes."""
    out = {"encoder": self.encoder, "head": self.head, "nesting": list(self.head_sizes),
           "num_classes": self.num_classes, "feature_dim": self.feature_dim}
    if self.objective != "classify":  # (absent for classifiers: their checkpoints predate it)
      out.update(objective=self.objective, tokenizer=self.tokenizer)
    return out


def resolve(config) -> ModelSpec:
  """The ModelSpec of a config, or a one-line ConfigError for the first bad field."""
  if config.model_name == DUAL:
    return _resolve_dual(config)
  module = encoder_module(config.model_name)
  get_dtype(config.dtype)
  objective = config.get("objective", "classify")
  if objective not in OBJECTIVES:
    raise ConfigError(f"unknown objective {objective!r} (config.objective); allowed: "
                      f"{list(OBJECTIVES)}")
  text = config.model_name in TEXT_MODELS
  if text == (objective == "classify"):
    raise ConfigError(f"config.objective={objective!r} with config.model_name="
                      f"{config.model_name!r}; allowed: classify for image encoders "
                      f"{sorted(set(MODELS) - set(TEXT_MODELS))}, mlm or contrastive for text "
                      f"encoders {list(TEXT_MODELS)}")
  module.check(config)
  tied = config.model.get("tie_word_embeddings", True)
  if not tied and objective != "mlm":
    raise ConfigError(f"config.model.tie_word_embeddings=False with config.objective="
                      f"{objective!r}; allowed: False only for mlm (it unties BERT's MLM "
                      "decoder from the word embeddings)")
  d = module.feature_dim_of(config.model)
  nesting = nesting_lib.parse(config.mrl.nesting, d)
  extra, _ = nesting_lib.split_at(config.eval.extra_sizes, d, "config.eval.extra_sizes")
  if text:
    tokenizer = text_tokenizer(config)
    head = ("mlm" if tied else "mlm_untied") if objective == "mlm" else "none"
    num_classes = int(config.model.vocab_size) if objective == "mlm" else 0
    return ModelSpec(model_name=config.model_name, encoder=module.describe(config.model),
                     feature_dim=d, head=head, nesting=nesting, head_sizes=nesting,
                     eval_sizes=tuple(sorted(set(nesting) | set(extra))),
                     num_classes=num_classes, objective=objective,
                     tokenizer=tokenizer.fingerprint)
  head_sizes = heads_lib.head_nesting(config.mrl.head, nesting, config.mrl.get("ff_size"), d)
  if config.num_classes < 1:
    raise ConfigError(f"config.num_classes={config.num_classes}; allowed: >= 1")
  trained = head_sizes if config.mrl.head == "ff" else nesting
  eval_sizes = tuple(sorted(set(nesting) | set(extra) | set(trained)))
  return ModelSpec(model_name=config.model_name, encoder=module.describe(config.model),
                   feature_dim=d, head=config.mrl.head, nesting=nesting, head_sizes=head_sizes,
                   eval_sizes=eval_sizes, num_classes=int(config.num_classes))


def _resolve_dual(config) -> ModelSpec:
  """A dual encoder: an image encoder and BERT, projected to a common width, contrastive."""
  get_dtype(config.dtype)
  if config.objective != "contrastive":
    raise ConfigError(f"config.objective={config.objective!r} with config.model_name="
                      f"{DUAL!r}; allowed: contrastive")
  image_name, text_name = config.image_tower.model_name, config.text_tower.model_name
  image = encoder_module(image_name, "config.image_tower.model_name")
  text = encoder_module(text_name, "config.text_tower.model_name")
  if image_name in TEXT_MODELS or text_name not in TEXT_MODELS:
    raise ConfigError(f"config.image_tower.model_name={image_name!r}, "
                      f"config.text_tower.model_name={text_name!r}; allowed: an image encoder "
                      f"{sorted(set(MODELS) - set(TEXT_MODELS))} and a text encoder "
                      f"{list(TEXT_MODELS)}")
  image.check(tower_config(config, "image"))
  text.check(tower_config(config, "text"))
  d_image = image.feature_dim_of(config.image_tower)
  d_text = text.feature_dim_of(config.text_tower)
  width = int(config.model.projection)
  if width < 0 or (not width and d_image != d_text):
    raise ConfigError(f"the towers' widths differ (image {d_image}, text {d_text}) and "
                      f"config.model.projection={width}; allowed: a common width > 0 "
                      "(both towers are projected to it) or 0 when the widths are equal")
  d = width or d_image
  if config.model.freeze not in two_towers.FREEZE:
    raise ConfigError(f"config.model.freeze={config.model.freeze!r}; allowed: "
                      f"{list(two_towers.FREEZE)}")
  nesting = nesting_lib.parse(config.mrl.nesting, d)
  extra, _ = nesting_lib.split_at(config.eval.extra_sizes, d, "config.eval.extra_sizes")
  encoder = two_towers.describe(image.describe(config.image_tower),
                                text.describe(config.text_tower), width)
  return ModelSpec(model_name=DUAL, encoder=encoder, feature_dim=d, head="none",
                   nesting=nesting, head_sizes=nesting,
                   eval_sizes=tuple(sorted(set(nesting) | set(extra))), num_classes=0,
                   objective="contrastive", tokenizer=text_tokenizer(
                       tower_config(config, "text")).fingerprint)


def text_tokenizer(config):
  """config.text's tokenizer, checked against the model's vocabulary (one-line errors)."""
  tokenizer = tokenizers.from_config(config.text, config.input.get("data_dir"))
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ConfigError(f"the tokenizer {config.text.vocab} has {tokenizer.vocab_size} tokens but "
                      f"config.model.vocab_size={config.model.vocab_size}; they must match "
                      "(the embedding table is indexed by token id)")
  return tokenizer


class MatryoshkaModel(nnx.Module):
  """images [B, H, W, C] -> (z [B, d], {m: logits_m [B, C]}) with one encoder pass. uint8
  images are normalised with (pixel_mean, pixel_std) first (models/pixels.py; None: a text
  encoder, whose inputs are token dicts)."""

  def __init__(self, encoder: nnx.Module, heads: heads_lib.MatryoshkaHeads, *,
               pixel_mean: tuple[float, ...] | None, pixel_std: tuple[float, ...] | None):
    self.encoder = encoder
    self.heads = heads
    self.pixel_mean, self.pixel_std = pixel_mean, pixel_std

  def encode(self, images: jax.Array, *, rngs: nnx.Rngs | None = None):
    """(z, aux) of the encoder on (normalised) images."""
    if self.pixel_mean is not None:
      images = pixels.normalize(images, self.pixel_mean, self.pixel_std)
    return self.encoder(images, rngs=rngs)

  def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None):
    z, _ = self.encode(images, rngs=rngs)
    return z, self.heads(z)


class TextEmbedder(nnx.Module):
  """A text encoder trained through its embedding (contrastive objectives): tokens -> (z, aux)."""

  def __init__(self, encoder: nnx.Module):
    self.encoder = encoder

  def __call__(self, tokens: dict, *, rngs: nnx.Rngs | None = None):
    return self.encoder(tokens, rngs=rngs)


def create_model(config, spec: ModelSpec, rngs: nnx.Rngs) -> nnx.Module:
  """The model an objective trains: the encoder of config.model with the Matryoshka heads of
  the spec (classify), with BERT's tied MLM head (mlm), or alone (contrastive)."""
  dtype = get_dtype(config.dtype)
  if spec.model_name == DUAL:
    c = config.contrastive
    sigmoid = c.loss == "sigmoid"
    mean, std = pixels.stats(config.input, config.image_tower.get("in_channels", 3))
    return two_towers.TwoTowers(
        encoder_module(config.image_tower.model_name).build(config.image_tower, dtype=dtype,
                                                            rngs=rngs),
        encoder_module(config.text_tower.model_name).build(config.text_tower, dtype=dtype,
                                                           rngs=rngs),
        projection=int(config.model.projection),
        num_scales=len(spec.head_sizes) if c.per_size_scale else 1, scale_init=c.scale,
        bias_init=c.bias_init if sigmoid else None, freeze=config.model.freeze,
        pixel_mean=mean, pixel_std=std, rngs=rngs)
  encoder = encoder_module(spec.model_name).build(config.model, dtype=dtype, rngs=rngs)
  if spec.objective == "mlm":
    return mlm_lib.MatryoshkaMlm(encoder, spec.head_sizes, tied=spec.head == "mlm", rngs=rngs)
  if spec.objective == "contrastive":
    return TextEmbedder(encoder)
  # Heads in float32 whatever config.dtype: they cost ~nothing next to the encoder and the
  # smallest sizes need the precision (bf16 heads: 49% vs 89% top-1 at m=2 on digits).
  heads = heads_lib.MatryoshkaHeads(spec.feature_dim, spec.num_classes, spec.head_sizes,
                                    efficient=spec.efficient,
                                    init=config.mrl.get("head_init", "lecun_normal"),
                                    bias_init=config.mrl.get("head_bias_init"),
                                    dtype=jnp.float32, rngs=rngs)
  mean, std = ((None, None) if spec.model_name in TEXT_MODELS else
               pixels.stats(config.input, config.model.get("in_channels", 3)))
  return MatryoshkaModel(encoder, heads, pixel_mean=mean, pixel_std=std)


def torchvision_param_names(config, spec: ModelSpec) -> dict[tuple, str]:
  """{param path: the official PyTorch name} of a ResNet (models/torchvision_layout.py)."""
  if spec.model_name != "resnet":
    raise ConfigError("the official PyTorch layout exists for ResNets only; "
                      f"config.model_name={spec.model_name!r}")
  abstract = nnx.eval_shape(lambda: create_model(config, spec, nnx.Rngs(0)))
  return torchvision_layout.param_names(abstract.encoder, spec.head, spec.head_sizes)
