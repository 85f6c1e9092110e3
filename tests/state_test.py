"""state.py: the model is constructed once per config and process, and what is built from that
one construction (graph definitions, abstract state, initial values) is what constructing it
directly gives."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mrl_jax import models
from mrl_jax import optim
from mrl_jax import sharding
from mrl_jax import state as state_lib
from tests.conftest import load_config


def _direct_init(config, spec, tx):
  """The initial TrainState from a fresh construction of the model, as written before caching."""
  def init():
    module = models.create_model(config, spec, nnx.Rngs(config.seed))
    _, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.as_pure(params), nnx.as_pure(batch_stats)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                batch_stats=batch_stats, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(config.seed + 1)))
  return init


@pytest.fixture
def constructions(monkeypatch):
  """Counts constructions of the model (state.py's calls of models.create_model)."""
  calls = []
  create = models.create_model
  monkeypatch.setattr(models, "create_model", lambda *a, **k: calls.append(1) or create(*a, **k))
  monkeypatch.setattr(state_lib, "_built", {})
  monkeypatch.setattr(state_lib, "_inits", {})
  return calls


@pytest.mark.parametrize("path", ["configs/digits_resnet_mrl.py:runlocal",
                                  "configs/image_text_digits.py:runlocal"])
def test_a_run_constructs_the_model_twice_and_its_state_equals_a_direct_construction(
    path, constructions):
  """build_model, the abstract state a checkpoint restores against and the initial state, as
  train.py asks for them (and again, as eval does), cost two constructions, not 4 + 2; the
  state equals, bitwise and in shapes, dtypes and sharding, a jit of the model constructed
  directly."""
  config = load_config(path)
  spec = models.resolve(config)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2}, jax.devices())
  config.sharding.update(strategy="fsdp", fsdp_min_size_mb=0.0)
  _, abstract_params, _ = state_lib.build_model(config, spec)
  tx = optim.make_optimizer(config, spec, abstract_params, optax.constant_schedule(0.1))
  abstract, _ = state_lib.abstract_train_state(config, spec, tx, mesh)
  state, state_sharding = state_lib.create_train_state(config, spec, tx, mesh)
  state_lib.build_model(config, spec)
  state_lib.abstract_train_state(config, spec, tx, mesh)
  assert len(constructions) == 2

  direct = _direct_init(config, spec, tx)
  want_abstract = jax.eval_shape(direct)
  with jax.set_mesh(mesh):
    want = jax.jit(direct, out_shardings=state_sharding)()
  assert jax.tree.structure(abstract) == jax.tree.structure(want_abstract)
  for got, ref, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(want_abstract),
                         jax.tree.leaves(state_sharding), strict=True):
    assert (got.shape, got.dtype, got.sharding) == (ref.shape, ref.dtype, s)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
    assert got.sharding == ref.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in jax.tree.leaves(state))


def test_another_config_is_another_model_and_callers_get_their_own_trees(constructions):
  """A changed field (the seed: other initial values; the width: other shapes) misses the
  cache; a caller changing the trees it was given does not change what the next one gets."""
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  spec = models.resolve(config)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  tx = optax.sgd(0.1)
  first, _ = state_lib.create_train_state(config, spec, tx, mesh)
  config.seed += 1
  reseeded, _ = state_lib.create_train_state(config, spec, tx, mesh)
  assert len(constructions) == 2
  kernel = lambda s: np.asarray(s.params["encoder"]["stem"]["conv"]["kernel"])
  assert not np.array_equal(kernel(first), kernel(reseeded))
  np.testing.assert_array_equal(kernel(reseeded), kernel(jax.jit(_direct_init(config, spec,
                                                                               tx))()))
  config.model.width *= 2
  spec = models.resolve(config)
  before = len(constructions)
  model, params, _ = state_lib.build_model(config, spec)
  assert params["encoder"]["stem"]["conv"]["kernel"].shape[-1] == config.model.width
  params["encoder"].pop("stem")
  again, params_again, _ = state_lib.build_model(config, spec)
  assert again is model and "stem" in params_again["encoder"]
  assert len(constructions) == before + 1


# --- init_from: which encoder comes from where ----------------------------------------------

_RESNET = "resnet18(width=4,stem=small,in_channels=3)"
_BERT = "bert-tiny(vocab_size=30522,max_len=512,type_vocab_size=2,pool=mean,pooler=False)"


def _signature(encoder, tokenizer=None, **rest):
  out = {"encoder": encoder, "head": "none", "nesting": [8, 16], "num_classes": 0,
         "feature_dim": 16, **rest}
  if tokenizer:
    out.update(objective="contrastive", tokenizer=tokenizer)
  return out


class _Spec:  # what init_plan reads of a ModelSpec
  def __init__(self, signature):
    self.signature = signature


def _init_config(heads=False):
  config = load_config("configs/image_text_digits.py:runlocal")
  config.update(init_from="/runs/source", init_from_heads=heads)
  return config


def test_a_dual_encoders_description_parses_back_into_its_towers():
  encoder = f"two_towers({_RESNET},{_BERT},projection=32)"
  assert state_lib.two_towers.parse_description(encoder) == (_RESNET, _BERT, 32)
  assert state_lib.two_towers.describe(_RESNET, _BERT, 32) == encoder
  assert state_lib.two_towers.parse_description(_RESNET) is None
  assert state_lib.two_towers.parse_description("two_towers(a,b)") is None
  assert state_lib.towers(_signature(encoder, "wp:1")) == {"image": (_RESNET, None),
                                                         "text": (_BERT, "wp:1")}
  assert state_lib.towers(_signature(_BERT, "wp:1")) == {"encoder": (_BERT, "wp:1")}


def test_init_plan_takes_each_encoder_with_the_same_architecture_and_tokenizer():
  dual = _signature(f"two_towers({_RESNET},{_BERT},projection=32)", "wp:1")
  plan = lambda mine, theirs, heads=False: state_lib.init_plan(_init_config(heads),
                                                               _Spec(mine), theirs)
  assert plan(dual, _signature(_RESNET)) == ({"image": "encoder"}, False)
  assert plan(dual, _signature(_BERT, "wp:1")) == ({"text": "encoder"}, False)
  assert plan(dual, dual) == ({"image": "image", "text": "text"}, False)
  assert plan(dual, dual, heads=True) == ({"image": "image", "text": "text"}, True)
  assert plan(_signature(_RESNET), dual) == ({"encoder": "image"}, False)
  assert plan(_signature(_BERT, "wp:1"), dual) == ({"encoder": "text"}, False)
  assert plan(_signature(_RESNET), _signature(_RESNET), heads=True) == (
      {"encoder": "encoder"}, True)
  # One tower matches: it is taken (the run prints which).
  other_text = _signature(f"two_towers({_RESNET},{_BERT[:-1]},num_layers=2)"
                          ",projection=32)", "wp:1")
  assert plan(dual, other_text) == ({"image": "image"}, False)
  # The same architecture read with another tokenizer gives other token ids: not taken.
  with pytest.raises(state_lib.ConfigError, match=r"holds a model with tokenizer='wp:2' but "
                                                  r"the config has tokenizer='wp:1'; nothing"):
    plan(_signature(_BERT, "wp:1"), _signature(_BERT, "wp:2"))
  with pytest.raises(state_lib.ConfigError, match=r"^config.init_from=/runs/source holds "
                                                  r"encoder='bert-tiny.*\(tokenizer wp:2\) but "
                                                  r"the config builds image="):
    plan(dual, _signature(_BERT, "wp:2"))
  with pytest.raises(state_lib.ConfigError, match=r"holds a model with encoder='resnet18"
                                                  r"\(width=4.*; nothing to take$"):
    plan(_signature(_RESNET.replace("width=4", "width=8")), _signature(_RESNET))
  # Heads only from a model of the same signature, each field named.
  for field, value in (("nesting", [8]), ("num_classes", 10), ("head", "mrl"),
                       ("feature_dim", 32)):
    with pytest.raises(state_lib.ConfigError, match=rf"with {field}={re.escape(repr(value))} "
                                                    rf"but the config "
                                                    rf"has {field}=.*; set config.init_from_"
                                                    "heads=False to take only the encoder$"):
      plan(dual, {**dual, field: value}, heads=True)
  with pytest.raises(state_lib.ConfigError, match="set config.init_from_heads=False"):
    plan(dual, _signature(_RESNET), heads=True)
