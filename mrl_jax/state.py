"""The model and its train state, below both the trainer and the evaluators: build, place, restore.

The NNX model is split once into static graph definitions (one in train mode, one in eval mode:
BatchNorm running averages, no dropout) and pure state. A TrainState holds the step, the
parameters, the BatchNorm statistics, the optimizer state and the RNG; it is built abstractly
first (no allocation), placed by the partition rules of sharding.py, and restored from orbax
checkpoints against that abstract, sharded target, so a checkpoint restores onto any mesh.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.extend import core as jax_core

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import models
from mrl_jax import optim
from mrl_jax import paths
from mrl_jax import sharding
from mrl_jax import utils
from mrl_jax import workdir as workdir_lib
from mrl_jax.errors import ConfigError
from mrl_jax.models import heads as heads_lib
from mrl_jax.models import two_towers


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any  # nnx.State of nnx.Param (pure arrays)
  batch_stats: Any  # nnx.State of nnx.BatchStat (pure arrays)
  opt_state: Any
  rng: jax.Array  # uint32 key data


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: keys jit caches
class Model:
  """The static halves of the split model and its resolved description."""
  spec: models.ModelSpec
  train_graphdef: Any
  eval_graphdef: Any

  @property
  def nesting(self) -> tuple[int, ...]:
    """The sizes that have a head."""
    return self.spec.head_sizes

  def module(self, params, batch_stats, *, train: bool = False):
    """The NNX model with these parameters (train: batch statistics, dropout)."""
    return nnx.merge(self.train_graphdef if train else self.eval_graphdef, params, batch_stats)

  @staticmethod
  def batch_stats_of(module):
    """A module's BatchNorm statistics as a pure tree (updated by a train-mode forward)."""
    return nnx.as_pure(nnx.state(module, nnx.BatchStat))

  def apply(self, params, batch_stats, inputs, *, train: bool = False, rngs=None):
    """(z [B, d], outputs) of the model on inputs (classifiers: {m: logits_m [B, C]});
    train=True also returns the updated BN statistics."""
    module = self.module(params, batch_stats, train=train)
    z, outputs = module(inputs, rngs=rngs)
    if train:
      return z, outputs, self.batch_stats_of(module)
    return z, outputs

  def encode(self, params, batch_stats, inputs):
    """(z [B, d], aux) of the encoder alone, eval mode (text models: aux["layers"]); a dual
    encoder's text tower for token dicts, its image tower for images."""
    module = self.module(params, batch_stats)
    if isinstance(module, two_towers.TwoTowers):
      z = module.embed_text(inputs) if isinstance(inputs, dict) else module.embed_image(inputs)
      return z, {}
    if isinstance(module, models.MatryoshkaModel):
      return module.encode(inputs)
    return module.encoder(inputs)

  def heads(self, params, batch_stats) -> heads_lib.MatryoshkaHeads:
    """The heads module with these parameters (eval mode)."""
    return nnx.merge(self.eval_graphdef, params, batch_stats).heads


def _split(module):
  graphdef, params, batch_stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model has state other than Param/BatchStat: {rest}")
  return graphdef, nnx.as_pure(params), nnx.as_pure(batch_stats)


# Constructing an NNX model is Python work on every layer (ResNet-50: ~1 s on a CPU core, the
# digits ResNet-18: ~0.3 s), and a run needs the model several times: its graph definitions,
# the abstract train state that checkpoints restore against, the initial parameters, again for
# eval. So it is constructed once per process and config, twice in all: abstractly (below) and
# traced into the parameter initialisation (_param_init). Keyed by the whole config, so any
# field that could change the model (or its initial values: the seed) makes a new entry.
_CACHE_SIZE = 8
_built: dict[tuple[str, str], Any] = {}
_inits: dict[tuple[str, str], Any] = {}


def _cached(cache: dict, config, spec, make):
  key = (config.to_json_best_effort(sort_keys=True), repr(spec))
  if key not in cache:
    if len(cache) >= _CACHE_SIZE:
      del cache[next(iter(cache))]
    cache[key] = make()
  return cache[key]


def build_model(config, spec: models.ModelSpec) -> tuple[Model, Any, Any]:
  """(Model, abstract params, abstract batch_stats) without allocating any parameter."""
  model, params, batch_stats = _cached(_built, config, spec, lambda: _build_model(config, spec))
  copy = lambda tree: jax.tree.map(lambda x: x, tree)  # callers get their own containers
  return model, copy(params), copy(batch_stats)


def _build_model(config, spec: models.ModelSpec) -> tuple[Model, Any, Any]:
  abstract = nnx.eval_shape(lambda: models.create_model(config, spec, nnx.Rngs(config.seed)))
  frozen = config.model.get("freeze") if spec.model_name == models.DUAL else ""
  # A locked tower (LiT) runs in eval mode in training too: BatchNorm running statistics, no
  # dropout (its parameters get no update: optim.py).
  train_view = abstract if not frozen else nnx.view(
      abstract, only=nnx.PathContains(frozen), use_running_average=True, deterministic=True,
      raise_if_not_found=False)
  train_graphdef, params, batch_stats = _split(train_view)
  eval_view = nnx.view(abstract, use_running_average=True, deterministic=True,
                       raise_if_not_found=False)
  eval_graphdef, _, _ = _split(eval_view)
  return Model(spec, train_graphdef, eval_graphdef), params, batch_stats


def _param_init(config, spec):
  """A function () -> (params, batch_stats) of initial values: the model's construction traced
  once into a jaxpr, which later traces (abstract state, the jitted init) replay cheaply."""
  def make():
    def params_and_stats():
      _, params, batch_stats = _split(models.create_model(config, spec, nnx.Rngs(config.seed)))
      return params, batch_stats
    closed, shapes = jax.make_jaxpr(params_and_stats, return_shape=True)()
    return closed, jax.tree.structure(shapes)
  closed, treedef = _cached(_inits, config, spec, make)
  return lambda: jax.tree.unflatten(treedef, jax_core.jaxpr_as_fun(closed)())


def _init_fn(config, spec, tx: optax.GradientTransformation):
  param_init = _param_init(config, spec)

  def init():
    params, batch_stats = param_init()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(config.seed + 1)))
  return init


def abstract_train_state(config, spec, tx: optax.GradientTransformation, mesh):
  """(TrainState of ShapeDtypeStructs carrying their shardings, the sharding tree)."""
  abstract = jax.eval_shape(_init_fn(config, spec, tx))
  state_sharding = sharding.state_sharding(abstract, mesh, config.sharding)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sharding)
  return abstract, state_sharding


def create_train_state(config, spec, tx: optax.GradientTransformation, mesh):
  """(initial TrainState placed by the partition rules, its sharding tree)."""
  _, state_sharding = abstract_train_state(config, spec, tx, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(_init_fn(config, spec, tx), out_shardings=state_sharding)()
  return state, state_sharding


def restore(config, spec, workdir, mesh, step: int | None = None):
  """(Model, params, batch_stats, step) from the workdir's checkpoint (latest by default).

  The optimizer is rebuilt only for its state's structure (which does not depend on the
  schedule's values), so that the checkpoint restores against a typed, sharded target.
  """
  model, abstract_params, _ = build_model(config, spec)
  tx = optim.make_optimizer(config, spec, abstract_params, optax.constant_schedule(0.0))
  abstract, _ = abstract_train_state(config, spec, tx, mesh)
  ckpt = checkpoint_lib.Checkpointer(paths.join(workdir, "checkpoints"), every_steps=1,
                                     keep=config.keep_checkpoints)
  restored = ckpt.restore(abstract, expected_signature=spec.signature, step=step)
  ckpt.close()
  if restored is None:
    raise ConfigError(f"no checkpoint in {ckpt.directory}; train first (python train.py "
                      f"--config=... --workdir={workdir})")
  state, _, step = restored
  return model, state.params, state.batch_stats, step


def _flat_str(tree) -> dict[tuple[str, ...], Any]:
  """{path of str keys: leaf} of a pytree of dicts / nnx.State (list indices become str)."""
  out = {}
  jax.tree_util.tree_map_with_path(
      lambda path, x: out.__setitem__(tuple(str(getattr(k, "key", k)) for k in path), x), tree)
  return out


def towers(signature: dict) -> dict[str, tuple[str, str | None]]:
  """{parameter prefix: (architecture, tokenizer)} of a checkpoint signature's encoders: one
  `encoder` for a single-encoder model, `image` and `text` for a dual encoder (the tokenizer
  only where the encoder reads text)."""
  tokenizer = signature.get("tokenizer")
  dual = two_towers.parse_description(signature.get("encoder", ""))
  if dual is not None:
    return {"image": (dual[0], None), "text": (dual[1], tokenizer)}
  return {"encoder": (signature.get("encoder"), tokenizer)}


def _describe(parts: dict) -> str:
  return ", ".join(f"{name}={arch!r}" + (f" (tokenizer {tok})" if tok else "")
                   for name, (arch, tok) in parts.items())


def _read_init_checkpoint(config):
  source = paths.path(config.init_from)
  directory = source / "checkpoints" if (source / "checkpoints").is_dir() else source
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=1, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ConfigError(f"no checkpoint in {directory} (config.init_from)")
    saved, meta = ckpt.read(steps[-1])
  finally:
    ckpt.close()
  return directory, steps[-1], saved, meta.get("signature", {})


def init_plan(config, spec, saved_signature: dict) -> tuple[dict[str, str], bool]:
  """({this model's encoder prefix: the checkpoint's prefix it is taken from}, whether the
  heads are taken too), or a one-line ConfigError when config.init_from provides nothing.

  An encoder is taken from any encoder of the checkpoint with the same architecture (and
  tokenizer): a single-encoder run gives a dual encoder's image or text tower, a dual-encoder
  run gives both towers, or one of them to a single-encoder model. Heads (classifiers, the MLM
  head; a dual encoder's projections and temperature) only with config.init_from_heads, from
  a model of the same signature."""
  mine, theirs = towers(spec.signature), towers(saved_signature)
  plan = {name: next(src for src, part in theirs.items() if part == want)
          for name, want in mine.items() if want in theirs.values()}
  if not plan:
    if len(mine) == len(theirs) == 1:  # the common case, in the signature's words
      key = "encoder" if mine["encoder"][0] != theirs["encoder"][0] else "tokenizer"
      raise ConfigError(f"config.init_from={config.init_from} holds a model with {key}="
                        f"{saved_signature.get(key)!r} but the config has {key}="
                        f"{spec.signature[key]!r}; nothing to take")
    raise ConfigError(f"config.init_from={config.init_from} holds {_describe(theirs)} but the "
                      f"config builds {_describe(mine)}; no encoder to take")
  if not config.init_from_heads:
    return plan, False
  for key in ("encoder", "feature_dim", "head", "nesting", "num_classes", "tokenizer"):
    if saved_signature.get(key) != spec.signature.get(key):
      raise ConfigError(
          f"config.init_from={config.init_from} holds a model with {key}="
          f"{saved_signature.get(key)!r} but the config has {key}={spec.signature.get(key)!r}"
          "; set config.init_from_heads=False to take only the encoder")
  return plan, True


def init_from_checkpoint(config, spec, state: TrainState) -> TrainState:
  """The state with its encoders (and, with config.init_from_heads, its heads: everything but
  the encoders) and their BatchNorm statistics taken from config.init_from: a workdir, its
  checkpoints folder, or a converted checkpoint (convert_torch.py, convert_hf.py); `init_plan`
  says which. Fine-tuning, linear-probe and LiT runs start here; the optimizer state, step and
  RNG stay fresh. Prints what it took, counted."""
  directory, step, saved, saved_signature = _read_init_checkpoint(config)
  plan, heads = init_plan(config, spec, saved_signature)
  frozen = config.model.get("freeze") if spec.model_name == models.DUAL else ""
  if frozen and frozen not in plan:
    raise ConfigError(f"config.model.freeze={frozen!r} locks the {frozen} tower but "
                      f"config.init_from={config.init_from} provides only {sorted(plan)}; "
                      "a locked tower must come from a trained one")
  source_params = _flat_str(saved["params"])
  source_stats = _flat_str(saved["batch_stats"])
  taken = {name: [0, 0] for name in (*plan, "heads")}

  def take(source_leaves, count_index):
    def pick(path, leaf):
      key = tuple(str(getattr(k, "key", k)) for k in path)
      if key[0] in plan:
        name, key = key[0], (plan[key[0]], *key[1:])
      elif heads:
        name = "heads"
      else:
        return leaf
      value = source_leaves.get(key)
      if value is None or tuple(value.shape) != tuple(leaf.shape):
        raise ConfigError(f"config.init_from={config.init_from} has no array {'/'.join(key)} "
                          f"of shape {tuple(leaf.shape)} (it has "
                          f"{None if value is None else tuple(value.shape)})")
      taken[name][count_index] += int(np.prod(leaf.shape))
      return jax.device_put(np.asarray(value, leaf.dtype), leaf.sharding)
    return pick

  state = state.replace(
      params=jax.tree_util.tree_map_with_path(take(source_params, 0), state.params),
      batch_stats=jax.tree_util.tree_map_with_path(take(source_stats, 1), state.batch_stats))
  parts = [f"{name} <- {plan.get(name, 'heads')} ({count:,} parameters"
           + (f", {stats:,} BatchNorm statistics)" if stats else ")")
           for name, (count, stats) in taken.items() if count or stats]
  parts += [f"{name} fresh" for name in towers(spec.signature) if name not in plan]
  if not heads and spec.model_name == models.DUAL:
    parts.append("projections and temperature fresh")
  elif not heads and spec.head != "none":
    parts.append("heads fresh")
  utils.console(f"Initialising from {directory} step {step}: " + "; ".join(parts))
  return state


# --- converted checkpoints (convert_torch.py, convert_hf.py) ------------------------------------

def flat_paths(tree) -> dict[tuple[str, ...], Any]:
  """{path of keys: leaf} of a params / batch_stats tree."""
  out = {}
  jax.tree_util.tree_map_with_path(
      lambda path, x: out.__setitem__(tuple(k.key for k in path), x), tree)
  return out


def fill_paths(tree, values: dict):
  """The tree with every leaf replaced by values[path] (cast to the leaf's dtype)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.asarray(values[tuple(k.key for k in path)]).astype(x.dtype), tree)


def check_new_checkpoints(workdir) -> None:
  ckpt_dir = paths.join(workdir, "checkpoints")
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise ConfigError(f"{ckpt_dir} already holds checkpoints; convert into a new --workdir")


def save_converted(config, spec, params, batch_stats, workdir, source: str) -> None:
  """A step-0 checkpoint of converted weights (fresh optimizer state) and config.json: what
  eval.py evaluates, train.py fine-tunes from and config.init_from points at."""
  workdir = paths.path(workdir)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  tx = optim.make_optimizer(config, spec, params, optax.constant_schedule(0.0))
  state, _ = create_train_state(config, spec, tx, mesh)
  place = lambda values, like: jax.tree.map(lambda v, x: jax.device_put(v, x.sharding),
                                           values, like)
  state = state.replace(params=place(params, state.params),
                        batch_stats=place(batch_stats, state.batch_stats))
  workdir_lib.check(workdir, config)
  ckpt = checkpoint_lib.Checkpointer(paths.join(workdir, "checkpoints"), every_steps=1,
                                     keep=config.keep_checkpoints)
  ckpt.save(0, state, {"signature": spec.signature, "step": 0, "data_position": 0,
                       "converted_from": source}, force=True)
  ckpt.close()
  workdir_lib.record(workdir, config)
