"""The random parts of the train step: sampled nesting sizes, ViT dropout, and their exact
resume."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import optim
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax import validation
from tests.conftest import digits_config
from tests.conftest import load_config


def _vit(config):
  """A one-layer ViT-Ti/8 on the 8x8 digits (one patch + CLS), dropout 0.5."""
  config.model_name = "vit"
  config.model.update(variant="Ti/8", image_size=8, num_layers=1, dropout_rate=0.5)
  return config


@functools.cache
def _setup(kind: str):
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  config.optim.update(weight_decay=0.0, momentum=0.0, nesterov=False)  # plain SGD
  config.schedule.update(name="constant", warmup_epochs=0.0)  # lr > 0 from the first step
  config.mrl.update(sizes_per_step=2, keep_smallest=False, keep_largest=False)
  if kind == "vit":
    _vit(config)
  spec = validation.validate(config, 1, 1)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  model, abstract_params, _ = state_lib.build_model(config, spec)
  schedule = optim.make_schedule(config, 10, 100)
  tx = optim.make_optimizer(config, spec, abstract_params, schedule)
  state, state_sharding = state_lib.create_train_state(config, spec, tx, mesh)
  step = train_lib.make_train_step(config, model, tx, schedule, mesh, state_sharding)
  return model, state, step, mesh


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(128, 8, 8, 1)).astype(np.float32),
          "label": rng.integers(0, 10, 128).astype(np.int32)}


def test_sizes_per_step_updates_exactly_that_many_heads_and_varies_them():
  """sizes_per_step=2 of 6 heads, none kept: each step moves exactly 2 heads' kernels (plain
  SGD, no decay: the other heads get no gradient), different steps pick different pairs, and
  neither end is always picked."""
  model, state, step, mesh = _setup("resnet")
  chosen = []
  with jax.set_mesh(mesh):
    kernels = lambda s: {m: np.array(s.params["heads"][f"head_{m}"]["kernel"])
                         for m in model.nesting}  # copies: the step donates its input state
    for i in range(6):
      before = kernels(state)
      new_state, _ = step(state, _batch(i))
      after = kernels(new_state)
      moved = tuple(m for m in model.nesting if not np.array_equal(before[m], after[m]))
      assert len(moved) == 2, moved
      chosen.append(moved)
      state = new_state
  assert len(set(chosen)) > 1
  # None kept (config.mrl.keep_smallest/keep_largest=False reach the step): the smallest and
  # the largest head each sit out some step.
  assert any(model.nesting[0] not in c for c in chosen), chosen
  assert any(model.nesting[-1] not in c for c in chosen), chosen


def test_vit_dropout_is_random_in_training_and_off_in_eval():
  model, state, _, _ = _setup("vit")
  images = _batch(0)["image"][:16]
  apply = lambda key, train: np.asarray(model.apply(
      state.params, state.batch_stats, images, train=train, rngs=nnx.Rngs(dropout=key))[0])
  a, b = apply(jax.random.key(1), True), apply(jax.random.key(2), True)
  assert not np.allclose(a, b, atol=1e-4)  # another key, other units dropped
  np.testing.assert_array_equal(a, apply(jax.random.key(1), True))  # same key, same mask
  e1, e2 = apply(jax.random.key(1), False), apply(jax.random.key(2), False)
  np.testing.assert_array_equal(e1, e2)  # eval: deterministic
  assert not np.allclose(a, e1, atol=1e-4)


@pytest.mark.slow
def test_resume_is_bitwise_with_sampled_sizes_and_dropout(data_dir, tmp_path):
  """A ViT with dropout and sizes_per_step=2, constant lr: 2 steps, then resumed to 4, gives
  bitwise the parameters of 4 uninterrupted steps (the step's RNG derives from the step)."""
  def config(steps):
    c = _vit(digits_config(data_dir, steps))
    c.mrl.update(sizes_per_step=2, keep_smallest=False, keep_largest=False)
    c.schedule.update(name="constant", warmup_epochs=0.0)
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
    return c

  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_lib.train_and_evaluate(config(4), straight, devices=jax.devices()[:1])
  train_lib.train_and_evaluate(config(2), resumed, devices=jax.devices()[:1])
  summary = train_lib.train_and_evaluate(config(4), resumed, devices=jax.devices()[:1])
  assert summary["final_step"] == 4

  def params(workdir):
    ckpt = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", every_steps=1, keep=9)
    try:
      return ckpt.read(4)[0]["params"]
    finally:
      ckpt.close()

  for x, y in zip(jax.tree.leaves(params(straight)), jax.tree.leaves(params(resumed)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _reference_sgd_step(model, params, batch_stats, images, labels, *, lr, weight_decay,
                        label_smoothing, accum):
  """One plain-SGD step written from the definitions, not from the project's loss or optimizer:
  per-size CE against (1 - eps) onehot + eps / C (log_softmax), summed over sizes, mean over the
  batch; the gradient averaged over micro-batches j = rows j, j + accum, ...; PyTorch-style
  decay on kernels only (ndim >= 2: no BatchNorm parameters, no biases)."""
  def loss(p, x, y):
    _, logits, _ = model.apply(p, batch_stats, x, train=True)
    total = 0.0
    for l in logits.values():
      c = l.shape[-1]
      t = (1.0 - label_smoothing) * jax.nn.one_hot(y, c) + label_smoothing / c
      total += -(t * jax.nn.log_softmax(l.astype(np.float32))).sum(-1).mean()
    return total

  grad_fn = jax.jit(jax.grad(loss))
  grads = [grad_fn(params, images[j::accum], labels[j::accum]) for j in range(accum)]
  grad = jax.tree.map(lambda *g: sum(g) / accum, *grads)
  return jax.tree.map(lambda p, g: p - lr * (g + weight_decay * p * (p.ndim >= 2)), params,
                      grad)


def _np_smoothed_ce(logits, labels, eps):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  c = logits.shape[-1]
  t = np.full(logits.shape, eps / c)
  t[np.arange(len(labels)), labels] += 1.0 - eps
  return float(-(t * logp).sum(-1).mean())


def _sgd_step(devices, accum, fsdp=False, objective=None):
  """(model, state, jitted step, mesh) of the digits ResNet under plain SGD, lr 0.1, decay 0.01
  on kernels, label smoothing 0.1; fsdp: every parameter sharded over a 2-way fsdp axis."""
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  if fsdp:
    config.sharding.update(strategy="fsdp", fsdp_min_size_mb=0.0)
  config.optim.update(momentum=0.0, nesterov=False, weight_decay=0.01,
                      weight_decay_rule="kernels", grad_accum_steps=accum)
  config.schedule.update(name="constant", base_lr=0.1, lr_batch_size=128, warmup_epochs=0.0)
  config.input.batch_size = 128
  config.loss.label_smoothing = 0.1
  spec = validation.validate(config, devices, 1)
  fsdp_size = 2 if fsdp else 1
  mesh = sharding.make_mesh({"data": devices // fsdp_size, "fsdp": fsdp_size},
                            jax.devices()[:devices])
  model, abstract_params, _ = state_lib.build_model(config, spec)
  schedule = optim.make_schedule(config, 10, 100)
  tx = optim.make_optimizer(config, spec, abstract_params, schedule)
  state, state_sharding = state_lib.create_train_state(config, spec, tx, mesh)
  step = train_lib.make_train_step(config, model, tx, schedule, mesh, state_sharding,
                                   objective(spec) if objective else None)
  return model, state, step, mesh


@pytest.mark.parametrize("devices, accum, fsdp", [(1, 1, False), (8, 2, False), (8, 1, True)])
def test_one_step_equals_an_independent_sgd_step(devices, accum, fsdp):
  """The jitted, sharded step on 1 and 8 devices (data, or data x fsdp), with and without
  accumulation, equals one SGD step written from the definitions (label smoothing 0.1, weight
  decay 0.01 on kernels): an error the same on every layout (smoothing not reaching the loss,
  the decay mask not applied, micro-batch gradients summed instead of averaged) fails here. The
  logged per-size losses equal numpy's smoothed CE of the model's logits."""
  model, state, step, mesh = _sgd_step(devices, accum, fsdp)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  batch = _batch(7)
  copy = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)
  params, batch_stats = copy(state.params), copy(state.batch_stats)  # the step donates state
  want = _reference_sgd_step(model, params, batch_stats, batch["image"], batch["label"],
                             lr=0.1, weight_decay=0.01, label_smoothing=0.1, accum=accum)
  with jax.set_mesh(mesh):
    new_state, metrics = step(state, batch)
  for (path, got), ref in zip(jax.tree_util.tree_leaves_with_path(new_state.params),
                              jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
  # What the loop logs, from the reference: SGD's update is -lr * (gradient + decay), so the
  # gradient is (old - new) / lr - decay.
  norm = lambda tree: float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                        for x in jax.tree.leaves(tree))))
  grad = jax.tree.map(lambda p, w: (np.asarray(p, np.float64) - np.asarray(w)) / 0.1
                      - 0.01 * np.asarray(p) * (p.ndim >= 2), params, want)
  assert int(new_state.step) == 1 and bool(metrics["finite"])
  (count,) = jax.tree.leaves(new_state.opt_state)  # the schedule's step count: updated too
  assert int(count) == 1
  for x, sharding_ in zip(jax.tree.leaves(new_state), jax.tree.leaves(state_sharding),
                          strict=True):
    assert x.sharding == sharding_  # the state comes out placed as it went in
  assert float(metrics["lr"]) == pytest.approx(0.1, rel=1e-6)
  assert float(metrics["l2_params"]) == pytest.approx(norm(want), rel=1e-5)
  assert float(metrics["l2_updates"]) == pytest.approx(
      norm(jax.tree.map(lambda p, w: np.asarray(w, np.float64) - np.asarray(p), params, want)),
      rel=1e-3)
  assert float(metrics["l2_grads"]) == pytest.approx(norm(grad), rel=1e-3)
  # The step donates its input state: the old buffers are freed, not kept beside the new ones.
  assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
  if accum == 1:
    _, logits, stats = model.apply(params, batch_stats, batch["image"], train=True)
    for got, ref in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(stats),
                        strict=True):  # BatchNorm's running statistics, updated by the step
      np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    per_size = [_np_smoothed_ce(logits[m], batch["label"], 0.1) for m in model.nesting]
    for m, want_m in zip(model.nesting, per_size):
      assert float(metrics[f"loss@{m}"]) == pytest.approx(want_m, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(sum(per_size), rel=1e-5)  # weights 1


def test_a_non_finite_step_leaves_the_state_and_counts_the_step():
  """A NaN in one kernel makes the loss and gradients NaN: the step reports finite=False and
  returns the state it was given (parameters, statistics, optimizer state) with step + 1."""
  _, state, step, mesh = _sgd_step(1, 1)
  poisoned = "['heads']['head_8']['kernel']"
  state = state.replace(params=jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[0, 0].set(jnp.nan) if jax.tree_util.keystr(path) == poisoned else x,
      state.params))
  before = jax.tree.map(np.asarray, (state.params, state.batch_stats, state.opt_state))
  with jax.set_mesh(mesh):
    new_state, metrics = step(state, _batch(7))
  assert not bool(metrics["finite"]) and int(new_state.step) == 1
  after = jax.tree.map(np.asarray, (new_state.params, new_state.batch_stats,
                                    new_state.opt_state))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(x, y)


class _NanGradient:
  """An objective whose loss, sqrt(|w - w|) of one kernel, is 0 while its gradient is NaN."""

  def __init__(self, spec):
    self.sizes = spec.head_sizes

  def loss(self, module, batch, **_):
    del batch
    kernel = module.heads.head_8.kernel[...]
    return jnp.sum(jnp.sqrt(jnp.abs(kernel - kernel))), {}


def test_a_finite_loss_with_a_non_finite_gradient_is_a_non_finite_step():
  """A step is finite only if the loss and every gradient are: a finite loss alone is not."""
  _, state, step, mesh = _sgd_step(1, 1, objective=_NanGradient)
  before = jax.tree.map(np.asarray, state.params)
  with jax.set_mesh(mesh):
    new_state, metrics = step(state, _batch(7))
  assert float(metrics["loss"]) == 0.0 and not bool(metrics["finite"])
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(new_state.params), strict=True):
    np.testing.assert_array_equal(x, np.asarray(y))
