"""One inference API for every model: load a workdir, embed inputs at any size.

  from mrl_jax import inference
  model = inference.load("runs/text")                 # a workdir, or a converted checkpoint's
  z = model.embed(["a sentence", "another"], dim=64)  # float32 [2, 64], unit rows
  q = model.embed(texts, dim=256, quantize="int8", calibration=corpus)  # int8 [N, 256]
  b = model.embed(images, dim=32, quantize="binary")  # uint8 [N, 4], sign bits (image models)
  # a dual encoder (ALIGN / CLIP) embeds either: strings -> text tower, images -> image tower

`embed` runs the encoder once (eval mode, batches sharded over the devices) and returns the
first `dim` coordinates of z, L2-renormalised (dim=None: all d), stored as float32, int8
(per-dimension calibrated; quantize.py) or packed sign bits. int8 needs its calibration said:
`calibration=` representative inputs or `ranges=` ([2, dim] per-dimension min / max), so that
an input's codes never depend on what else is in the call (ranges taken from the inputs
themselves would turn a single text into all -128). Text models take strings (tokenized as in
training: config.text; a blank text is [CLS] [SEP], as sentence-transformers embeds it); image
models take uint8 images [N, H, W, C] or encoded image bytes, with the config's eval
preprocessing. No inputs give an empty [0, dim] array. eval.py's text evaluation embeds through
this class.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from mrl_jax import models
from mrl_jax import paths
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import validation
from mrl_jax.data import preprocess
from mrl_jax.data import text
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import quantize as quantize_lib


def config_from_workdir(workdir) -> ml_collections.ConfigDict:
  """The run's config from <workdir>/config.json (lists back to tuples)."""
  path = paths.join(workdir, "config.json")
  if not path.exists():
    raise ConfigError(f"no config.json in {workdir}: not a training or converted workdir")
  nested: dict = {}
  for key, value in paths.read_json(path).items():
    node = nested
    *parents, last = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = _tuples(value)
  return ml_collections.ConfigDict(nested)


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load(workdir, *, config=None, step: int | None = None, devices=None) -> "Embedder":
  """The Embedder of a workdir's checkpoint (latest, or `step`); config defaults to the
  workdir's config.json."""
  config = config or config_from_workdir(workdir)
  devices = list(devices) if devices is not None else jax.devices()
  spec = validation.validate_model(config)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices)
  model, params, batch_stats, _ = state_lib.restore(config, spec, paths.path(workdir), mesh,
                                                    step)
  return Embedder(config, spec, model, params, batch_stats, mesh)


@functools.cache
def _encode_fn(model, mesh):
  """jit: (params, batch_stats, inputs) -> z float32, replicated (inputs sharded on batch)."""
  def encode(params, batch_stats, inputs):
    z, _ = model.encode(params, batch_stats, inputs)
    return z.astype(jnp.float32)
  return jax.jit(encode, in_shardings=(None, None, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


class Embedder:
  """embed(inputs, dim=m, quantize=None | 'int8' | 'binary') for a restored model."""

  def __init__(self, config, spec: models.ModelSpec, model, params, batch_stats, mesh, *,
               batch_size: int | None = None):
    self.config, self.spec, self.model = config, spec, model
    self.params, self.batch_stats, self.mesh = params, batch_stats, mesh
    shards = sharding.num_batch_shards(mesh)
    batch = batch_size or config.input.get("eval_batch_size") or config.input.batch_size
    self.batch_size = max(shards, -(-batch // shards) * shards)
    self.text = spec.model_name in models.TEXT_MODELS
    self.dual = spec.model_name == models.DUAL  # strings -> text tower, images -> image tower
    self._text_pp = None

  @property
  def feature_dim(self) -> int:
    return self.spec.feature_dim

  def _text_batches(self, texts):
    if self._text_pp is None:
      self._text_pp = text.from_config(self.config, task="embed", keys=("text",), train=False)
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i in range(0, len(texts), self.batch_size):
      chunk = texts[i:i + self.batch_size]
      out = self._text_pp([{"text": t} for t in chunk], np.arange(i, i + len(chunk)), 0)
      yield len(chunk), {k.removeprefix("text_"): v for k, v in out.items()}

  @property
  def in_channels(self) -> int:
    """The channels the image encoder (a dual encoder's image tower) takes."""
    return (self.config.image_tower if self.dual else self.config.model).get("in_channels", 3)

  def _image_batches(self, images):
    first = images[0]
    channels = np.asarray(first).shape[-1] if not isinstance(first, bytes) else self.in_channels
    if channels != self.in_channels:
      raise ConfigError(f"the images have {channels} channels (shape {np.shape(first)}) but the "
                        f"image tower takes {self.in_channels}; pass "
                        "[N, H, W, C] uint8 images with its channels, or encoded image bytes")
    pp = preprocess.from_config(self.config.input, train=False, channels=channels)
    for i in range(0, len(images), self.batch_size):
      chunk = images[i:i + self.batch_size]
      yield len(chunk), np.stack([pp(tf.constant(x), tf.constant([0, i + j], tf.int64)).numpy()
                                  for j, x in enumerate(chunk)])

  def encode(self, inputs) -> np.ndarray:
    """Full-size z [N, d] float32 (not normalised) of texts or images ([0, d] for none)."""
    if not isinstance(inputs, str) and len(inputs) == 0:
      return np.zeros((0, self.feature_dim), np.float32)
    strings = isinstance(inputs, str) or isinstance(inputs[0], str)
    if strings and not (self.text or self.dual):
      raise ConfigError("this is an image model: embed takes images (uint8 [N, H, W, C] or "
                        "encoded image bytes), not strings")
    if self.text and not strings:
      raise ConfigError("this is a text model: embed takes strings")
    batches = self._text_batches(inputs) if strings else self._image_batches(inputs)
    encode = _encode_fn(self.model, self.mesh)
    batch_sharding = sharding.batch_sharding(self.mesh)

    def to_global(x):  # every process holds the whole batch: it serves its devices' rows
      return jax.make_array_from_callback(x.shape, batch_sharding, lambda index: x[index])

    parts = []
    with jax.set_mesh(self.mesh):
      for n, batch in batches:
        pad = self.batch_size - n  # one compiled shape: the last batch is padded
        batch = jax.tree.map(lambda x: to_global(
            np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))), batch)
        parts.append(np.asarray(encode(self.params, self.batch_stats, batch))[:n])
    return np.concatenate(parts)

  def embed(self, inputs, dim: int | None = None, quantize: str | None = None,
            ranges: np.ndarray | None = None, calibration=None) -> np.ndarray:
    """The first `dim` coordinates of z, L2-renormalised, as float32 / int8 / packed bits.

    int8 takes its per-dimension ranges from `ranges` ([2, dim]: quantize.int8_ranges of
    representative embeddings at this dim) or from the embeddings of `calibration` (inputs
    like `inputs`, at least 2); without either it is refused."""
    quantize_lib.check_kind(quantize)
    dim = self.feature_dim if dim is None else dim
    if not 1 <= dim <= self.feature_dim:
      raise ConfigError(f"dim={dim} is outside [1, {self.feature_dim}] (the feature dim)")
    if quantize == "int8":
      if ranges is None and calibration is None:
        raise ConfigError("quantize='int8' needs calibration: pass calibration=<representative "
                          "inputs> or ranges=<[2, dim] per-dimension min and max>, so that an "
                          "input's codes do not depend on the rest of the call")
      if ranges is None:
        ranges = quantize_lib.int8_ranges(embeddings_at(self.encode(calibration), dim))
      quantize_lib.check_ranges(ranges, dim)
    return embeddings_at(self.encode(inputs), dim, quantize, ranges)


def embeddings_at(z: np.ndarray, dim: int, quantize: str | None = None,
                  ranges: np.ndarray | None = None) -> np.ndarray:
  """z [N, d] -> the renormalised size-dim prefix, stored as `quantize` (Embedder.embed)."""
  x = np.asarray(z[:, :dim], np.float32)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x if quantize is None else quantize_lib.quantize(x, quantize, ranges)
