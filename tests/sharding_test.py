"""Mesh construction, partition rules (replicate / FSDP) and gradient accumulation."""

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from mrl_jax import optim
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax.errors import ConfigError
from tests.conftest import build_model
from tests.conftest import load_config


@pytest.mark.parametrize("mesh, devices, shape", [
    ({"data": -1, "fsdp": 1}, 8, (8, 1)), ({"data": -1, "fsdp": 2}, 8, (4, 2)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4)), ({"data": 1, "fsdp": 1}, 1, (1, 1)),
])
def test_mesh_shape_resolves_minus_one(mesh, devices, shape):
  assert sharding.mesh_shape(mesh, devices) == shape


@pytest.mark.parametrize("mesh, message", [
    ({"data": 3, "fsdp": 1}, "has 3 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, "more than one -1 axis"),
    ({"data": -1, "fsdp": 3}, "8 devices are not divisible by the fixed axes' product 3"),
    ({"data": -1, "model": 2}, "unknown mesh axis 'model'"),
])
def test_bad_mesh_is_a_one_line_error(mesh, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(mesh, 8)


def _expected_shard_shape(shape, fsdp, min_bytes, itemsize=4):
  """The FSDP rule, restated: arrays >= min_bytes split their largest dim divisible by fsdp."""
  shape = list(shape)
  if np.prod(shape) * itemsize < min_bytes:
    return tuple(shape)
  divisible = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not divisible:
    return tuple(shape)
  dim = max(divisible, key=lambda i: (shape[i], i))
  shape[dim] //= fsdp
  return tuple(shape)


@pytest.mark.parametrize("min_size_mb", [0.0, 0.01])
def test_fsdp_shards_params_and_optimizer_state_by_the_rule(min_size_mb):
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  config.sharding.update(strategy="fsdp", fsdp_min_size_mb=min_size_mb)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  spec, _, abstract_params, _ = build_model(config)
  tx = optim.make_optimizer(config, spec, abstract_params, optim.make_schedule(config, 10, 10))
  state, _ = state_lib.create_train_state(config, spec, tx, mesh)
  params = jax.tree_util.tree_flatten_with_path(state.params)[0]
  traces = [s for s in jax.tree.leaves(state.opt_state,
                                       is_leaf=lambda x: isinstance(x, optax.TraceState))
            if isinstance(s, optax.TraceState)]
  assert len(traces) == 1
  momenta = jax.tree.leaves(traces[0].trace)  # sgd momentum: the same tree as the params
  sharded = 0
  for (path, p), mu in zip(params, momenta, strict=True):
    want = _expected_shard_shape(p.shape, 4, min_size_mb * 2**20)
    assert p.addressable_shards[0].data.shape == want, jax.tree_util.keystr(path)
    assert mu.addressable_shards[0].data.shape == want  # optimizer state follows its param
    sharded += want != p.shape
  assert sharded > 0
  if min_size_mb:  # 10 KiB threshold: small biases/BN params stay replicated
    bias = state.params["encoder"]["stem"]["bn"]["bias"]
    assert bias.addressable_shards[0].data.shape == bias.shape


def test_replicate_strategy_keeps_every_param_whole():
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  spec, _, abstract_params, _ = build_model(config)
  tx = optim.make_optimizer(config, spec, abstract_params, optim.make_schedule(config, 10, 10))
  state, _ = state_lib.create_train_state(config, spec, tx, mesh)
  for p in jax.tree.leaves(state.params):
    assert p.addressable_shards[0].data.shape == p.shape


def test_unknown_strategy_is_refused():
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1})
  with pytest.raises(ConfigError, match="unknown sharding strategy 'zero3'"):
    sharding.state_sharding({"w": np.zeros((4, 4))}, mesh,
                            ConfigDict(dict(strategy="zero3", fsdp_min_size_mb=0.0)))


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch_step(data_dir, tmp_path):
  """ViT (no BatchNorm, so micro-batches see the same function): 2 x 16 == 1 x 32."""
  losses = {}
  for accum in (1, 2):
    config = load_config("configs/digits_resnet_mrl.py:runlocal")
    config.input.data_dir = data_dir
    config.model_name = "vit"
    config.model.update(variant="Ti/8", image_size=8, in_channels=1, pool="gap", num_layers=2)
    config.mrl.nesting = "halving:24"
    config.eval.extra_sizes = ()
    config.optim.update(name="adamw", weight_decay=0.01, grad_accum_steps=accum)
    config.schedule.update(name="constant", base_lr=1e-3, warmup_epochs=0.0)
    config.update(total_steps=4, log_every_steps=1, checkpoint_every_steps=4)
    workdir = str(tmp_path / f"accum{accum}")
    train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:8])
    with open(f"{workdir}/metrics.jsonl") as f:
      losses[accum] = [__import__("json").loads(l)["train/loss"] for l in f if "train/loss" in l]
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)
