"""Learning-rate schedules, weight-decay masks and optimizer updates against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mrl_jax import optim
from mrl_jax.errors import ConfigError
from tests.conftest import build_model
from tests.conftest import load_config


def _schedule_config(name, batch=512, **schedule):
  config = load_config("configs/digits_resnet_mrl.py")
  config.input.batch_size = batch
  config.schedule.update(**{"name": name, "base_lr": 0.1, "lr_batch_size": 256,
                            "warmup_epochs": 0.0, **schedule})
  return config


def _lrs(config, steps, steps_per_epoch=10, total_steps=100):
  schedule = optim.make_schedule(config, steps_per_epoch, total_steps)
  return [float(schedule(s)) for s in steps]


def test_warmup_then_cosine_linear_constant_by_hand():
  # lr = 0.1 * 512 / 256 = 0.2; 1 epoch (10 steps) of linear warmup from 0; 90 decay steps.
  steps = [0, 5, 10, 55, 100]
  assert _lrs(_schedule_config("cosine", warmup_epochs=1.0), steps) == pytest.approx(
      [0.0, 0.1, 0.2, 0.2 * 0.5 * (1 + np.cos(np.pi * 45 / 90)), 0.0], abs=1e-7)
  assert _lrs(_schedule_config("linear", warmup_epochs=1.0), steps) == pytest.approx(
      [0.0, 0.1, 0.2, 0.1, 0.0], abs=1e-7)
  assert _lrs(_schedule_config("constant", warmup_epochs=1.0), steps) == pytest.approx(
      [0.0, 0.1, 0.2, 0.2, 0.2], abs=1e-7)
  # end_lr_factor: cosine's floor (alpha) and the linear end.
  assert _lrs(_schedule_config("cosine", end_lr_factor=0.1), [100])[0] == pytest.approx(0.02)
  assert _lrs(_schedule_config("linear", end_lr_factor=0.1), [50])[0] == pytest.approx(0.11)


@pytest.mark.parametrize("batch, peak", [(1024, 0.425), (4096, 1.7)])
def test_one_cycle_is_ffcvs_cyclic_schedule_per_step(batch, peak):
  """FFCV train_imagenet.py get_cyclic_lr: np.interp(epoch, [0, 2, 40], [1e-4 lr, lr, 0]),
  interpolated per iteration within an epoch; lr 0.425 per 1024 images (MRL README: 2 GPUs x
  512, --lr.lr=0.425) is FFCV's 1.7 at 8 x 512 (rn50_40_epochs.yaml)."""
  config = load_config(f"configs/resnet50_imagenet.py:mrl,batch_size={batch}")
  spe = 1_281_167 // batch
  total = 40 * spe
  steps = [0, spe // 2, spe, 2 * spe, 21 * spe + spe // 3, total - 1, total]
  want = [np.interp(s / spe, [0, 2, 40], [1e-4 * peak, peak, 0.0]) for s in steps]
  # optax evaluates the line in float32: ~1e-8 absolute near the 1e-4 x lr start.
  assert _lrs(config, steps, spe, total) == pytest.approx(want, rel=1e-5, abs=2e-8)


def _r50():
  config = load_config("configs/resnet50_imagenet.py:mrl,runlocal")
  spec, _, params, _ = build_model(config)
  return config, spec, params


def _decayed(config, spec, params) -> dict[str, bool]:
  mask = optim.decay_mask(config, spec, params)
  out = {}
  jax.tree_util.tree_map_with_path(
      lambda p, v: out.__setitem__("/".join(str(k.key) for k in p), bool(v)), mask)
  return out


def test_official_decay_rule_skips_only_parameters_named_bn():
  """train_imagenet.py: bn_params = [v for k, v in named_parameters() if 'bn' in k]."""
  config, spec, params = _r50()
  assert config.optim.weight_decay_rule == "official"
  decayed = _decayed(config, spec, params)
  assert not decayed["encoder/stem/bn/scale"]  # bn1.weight
  assert not decayed["encoder/blocks/0/conv3/bn/bias"]  # layer1.0.bn3.bias
  assert decayed["encoder/blocks/0/shortcut/bn/scale"]  # layer1.0.downsample.1.weight
  assert decayed["encoder/blocks/3/conv2/conv/kernel"]  # layer2.0.conv2.conv.weight (BlurPool)
  assert decayed["heads/head_8/bias"]  # fc.nesting_classifier_0.bias
  num_bn = sum(1 for k in decayed if "/bn/" in k and "shortcut" not in k)
  assert sum(not v for v in decayed.values()) == num_bn == 2 * (1 + 16 * 3)


def test_kernels_rule_skips_norms_and_biases():
  config, spec, params = _r50()
  config.optim.weight_decay_rule = "kernels"
  decayed = _decayed(config, spec, params)
  assert not decayed["encoder/blocks/0/shortcut/bn/scale"] and not decayed["heads/head_8/bias"]
  assert decayed["encoder/stem/conv/kernel"] and decayed["heads/head_8/kernel"]


def _two_params():
  return {"w": jnp.asarray([[3.0, 4.0]]), "b": jnp.asarray([1.0])}


def _update(config, params, grads_list, lr):
  tx = optim.make_optimizer(config, None, params, optax.constant_schedule(lr))
  state = tx.init(params)
  for grads in grads_list:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _opt_config(name, **optim_fields):
  config = load_config("configs/digits_resnet_mrl.py")
  config.optim.update(name=name, weight_decay_rule="all", nesterov=False, **optim_fields)
  return config


def test_sgd_is_pytorchs_coupled_weight_decay_with_momentum():
  """torch.optim.SGD: d = g + wd p; buf = m buf + d; p -= lr buf."""
  p, g1, g2 = _two_params(), {"w": jnp.asarray([[0.5, -1.0]]), "b": jnp.asarray([2.0])}, {
      "w": jnp.asarray([[1.0, 1.0]]), "b": jnp.asarray([-1.0])}
  got = _update(_opt_config("sgd", momentum=0.9, weight_decay=0.1), p, [g1, g2], lr=0.5)
  for k in p:
    w0 = np.asarray(p[k])
    d1 = np.asarray(g1[k]) + 0.1 * w0
    w1 = w0 - 0.5 * d1
    buf2 = 0.9 * d1 + np.asarray(g2[k]) + 0.1 * w1
    np.testing.assert_allclose(np.asarray(got[k]), w1 - 0.5 * buf2, rtol=1e-6)


def test_lars_scales_each_layer_by_its_trust_ratio():
  """You et al. 2017: p -= lr * eta |p| / |g + wd p| * (g + wd p), one step, no momentum."""
  p, g = _two_params(), {"w": jnp.asarray([[0.6, 0.8]]), "b": jnp.asarray([0.5])}
  got = _update(_opt_config("lars", momentum=0.0, weight_decay=0.01, trust_coefficient=0.002),
                p, [g], lr=1.0)
  for k in p:
    w, d = np.asarray(p[k]), np.asarray(g[k]) + 0.01 * np.asarray(p[k])
    ratio = 0.002 * np.linalg.norm(w) / np.linalg.norm(d)
    np.testing.assert_allclose(np.asarray(got[k]), w - ratio * d, rtol=1e-5)


def test_global_norm_clipping_rescales_all_gradients_together():
  p = _two_params()
  g = {"w": jnp.asarray([[6.0, 0.0]]), "b": jnp.asarray([8.0])}  # global norm 10
  got = _update(_opt_config("sgd", momentum=0.0, weight_decay=0.0, clip_grad_norm=1.0), p, [g],
                lr=1.0)
  for k in p:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(p[k]) - np.asarray(g[k]) / 10,
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_weight_decay_mask_reaches_every_optimizer(name):
  """With the `kernels` rule the [1, 2] kernel decays and the [1] bias does not, in each
  optimizer's own update (one step, no momentum), by hand:
  sgd   p -= lr (g + wd p [decayed])
  adamw p -= lr (g / (|g| + eps) + wd p [decayed])   (first Adam step: m_hat = g, v_hat = g^2)
  lars  p -= lr * tc |p| / |d| * d with d = g + wd p  (decayed, trust ratio)
        p -= lr * g                                   (masked: neither decay nor trust ratio)
  Applying the decay to every parameter (the mask dropped) moves the bias and fails this."""
  p, g = _two_params(), {"w": jnp.asarray([[0.6, 0.8]]), "b": jnp.asarray([0.5])}
  config = _opt_config(name, momentum=0.0, weight_decay=0.1, trust_coefficient=0.002,
                       eps=1e-8)
  config.optim.weight_decay_rule = "kernels"
  got = _update(config, p, [g], lr=0.5)
  w, gw, b, gb = (np.asarray(x, np.float64) for x in (p["w"], g["w"], p["b"], g["b"]))
  if name == "sgd":
    want_w, want_b = w - 0.5 * (gw + 0.1 * w), b - 0.5 * gb
  elif name == "adamw":
    want_w = w - 0.5 * (gw / (np.abs(gw) + 1e-8) + 0.1 * w)
    want_b = b - 0.5 * gb / (np.abs(gb) + 1e-8)
  else:
    d = gw + 0.1 * w
    want_w = w - 0.5 * 0.002 * np.linalg.norm(w) / np.linalg.norm(d) * d
    want_b = b - 0.5 * gb
  np.testing.assert_allclose(np.asarray(got["w"]), want_w, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got["b"]), want_b, rtol=1e-5)


def _np_adam_moments(grads_list, b1, b2, eps):
  """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps) at each step, per parameter."""
  m = v = 0.0
  out = []
  for t, g in enumerate(grads_list, start=1):
    g = np.asarray(g, np.float64)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    out.append((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
  return out


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_adamw_and_lamb_over_two_steps_equal_a_numpy_transcription(name):
  """Two steps (the betas only show from the second), b1 0.5, b2 0.8, eps 0.1, decay 0.1 on the
  kernel only (`kernels` rule):
  adamw: p -= lr (u + wd p [decayed])                   (Loshchilov & Hutter 2019)
  lamb:  p -= lr |p| / |u + wd p| (u + wd p [decayed])   (You et al. 2020, per parameter)
  with u the bias-corrected Adam direction. The bias has two entries, not parallel to its
  gradients: LAMB's trust ratio would hide a decay of a one-entry parameter."""
  p = {"w": jnp.asarray([[3.0, 4.0]]), "b": jnp.asarray([1.0, -2.0])}
  grads = [{"w": jnp.asarray([[0.6, -0.8]]), "b": jnp.asarray([0.5, 0.5])},
           {"w": jnp.asarray([[-0.2, 0.4]]), "b": jnp.asarray([1.5, -0.3])}]
  config = _opt_config(name, b1=0.5, b2=0.8, eps=0.1, weight_decay=0.1)
  config.optim.weight_decay_rule = "kernels"
  got = _update(config, p, grads, lr=0.5)
  for k in p:
    w = np.asarray(p[k], np.float64)
    for u in _np_adam_moments([g[k] for g in grads], 0.5, 0.8, 0.1):
      d = u + (0.1 * w if k == "w" else 0.0)
      ratio = np.linalg.norm(w) / np.linalg.norm(d) if name == "lamb" else 1.0
      w = w - 0.5 * ratio * d
    np.testing.assert_allclose(np.asarray(got[k]), w, rtol=1e-5, err_msg=k)


def test_sgd_nesterov_is_pytorchs_over_two_steps():
  """torch.optim.SGD(nesterov=True): buf = m buf + g; p -= lr (g + m buf)."""
  p = _two_params()
  g1, g2 = {"w": jnp.asarray([[0.5, -1.0]]), "b": jnp.asarray([2.0])}, {
      "w": jnp.asarray([[1.0, 1.0]]), "b": jnp.asarray([-1.0])}
  config = _opt_config("sgd", momentum=0.9, weight_decay=0.0)
  config.optim.nesterov = True
  got = _update(config, p, [g1, g2], lr=0.5)
  for k in p:
    w, buf = np.asarray(p[k], np.float64), 0.0
    for g in (g1, g2):
      g = np.asarray(g[k], np.float64)
      buf = 0.9 * buf + g
      w = w - 0.5 * (g + 0.9 * buf)
    np.testing.assert_allclose(np.asarray(got[k]), w, rtol=1e-6)


def test_steps_override_epochs_and_epochs_round_to_steps():
  sched = load_config("configs/digits_resnet_mrl.py").schedule
  sched.update(warmup_steps=7, warmup_epochs=2.0)
  assert optim.steps_from(sched, "warmup", 10) == 7
  sched.update(warmup_steps=None, warmup_epochs=0.26)
  assert optim.steps_from(sched, "warmup", 10) == 3  # 2.6 rounds up
  sched.update(warmup_epochs=0.0)
  assert optim.steps_from(sched, "warmup", 10, default=5) == 5


def test_warmup_longer_than_the_run_is_clamped_and_one_cycle_peaks_inside_it():
  """warmup_epochs=50 of a 100-step run at 10 steps/epoch: warmup ends at step 99, so lr rises
  to the peak by the last step; one_cycle with the peak epoch past the end peaks at step 99."""
  config = _schedule_config("constant", warmup_epochs=50.0)
  assert _lrs(config, [98, 99]) == pytest.approx([0.2 * 98 / 99, 0.2])
  assert _lrs(config, [0], total_steps=1) == pytest.approx([0.2])  # a 1-step run: no warmup
  config = _schedule_config("one_cycle", peak_epoch=20.0, end_lr_factor=0.0)
  config.schedule.start_lr_factor = 0.5
  assert _lrs(config, [0, 99, 100]) == pytest.approx([0.1, 0.2, 0.0], abs=1e-7)


def test_lit_freezes_exactly_the_locked_tower():
  """config.model.freeze names a tower: its parameters get zero updates (no decay either);
  the other tower trains. Only a two-tower model freezes."""
  config = _opt_config("sgd", momentum=0.0, weight_decay=0.1)
  config.model.freeze = "image"
  params = {"image": _two_params(), "text": _two_params()}
  grads = {"image": {"w": jnp.ones((1, 2)), "b": jnp.ones(1)},
           "text": {"w": jnp.ones((1, 2)), "b": jnp.ones(1)}}
  two_towers = type("Spec", (), {"model_name": "two_towers"})()
  for spec, frozen in ((two_towers, True), (None, False)):
    tx = optim.make_optimizer(config, spec, params, optax.constant_schedule(0.5))
    updates, _ = tx.update(grads, tx.init(params), params)
    got = optax.apply_updates(params, updates)
    for k in ("w", "b"):
      want_text = np.asarray(params["text"][k]) - 0.5 * (1 + 0.1 * np.asarray(params["text"][k]))
      np.testing.assert_allclose(np.asarray(got["text"][k]), want_text, rtol=1e-6)
      image = np.asarray(got["image"][k])
      if frozen:
        np.testing.assert_array_equal(image, np.asarray(params["image"][k]))
      else:
        np.testing.assert_allclose(image, want_text, rtol=1e-6)


def test_one_cycle_peaks_no_earlier_than_step_1_and_lr_batch_size_must_be_positive():
  config = _schedule_config("one_cycle", peak_epoch=0.0, end_lr_factor=0.0)
  assert _lrs(config, [0, 1]) == pytest.approx([0.0, 0.2])
  config = _schedule_config("constant", lr_batch_size=1)
  assert _lrs(config, [0]) == pytest.approx([0.1 * 512])
  config.schedule.lr_batch_size = 0
  with pytest.raises(ConfigError, match="lr_batch_size=0 must be > 0"):
    optim.make_schedule(config, 10, 100)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_with_momentum_and_decay_over_two_steps_equals_optax_definition(nesterov):
  """optax.lars = add_decayed_weights -> scale_by_trust_ratio -> scale_by_learning_rate ->
  trace(momentum, nesterov), transcribed: d = g + wd p; s = -lr tc |p| / |d| d;
  buf = s + m buf; p += s + m buf (nesterov) or buf. Gradients not parallel to the
  parameters, so that the decay changes the direction."""
  p = _two_params()
  grads = [{"w": jnp.asarray([[1.0, -0.5]]), "b": jnp.asarray([0.5])},
           {"w": jnp.asarray([[-0.3, 0.9]]), "b": jnp.asarray([-1.5])}]
  config = _opt_config("lars", momentum=0.5, weight_decay=0.1, trust_coefficient=0.01)
  config.optim.nesterov = nesterov
  got = _update(config, p, grads, lr=0.5)
  for k in p:
    w, buf = np.asarray(p[k], np.float64), 0.0
    for g in grads:
      d = np.asarray(g[k], np.float64) + 0.1 * w
      s = -0.5 * 0.01 * np.linalg.norm(w) / np.linalg.norm(d) * d
      buf = s + 0.5 * buf
      w = w + (s + 0.5 * buf if nesterov else buf)
    np.testing.assert_allclose(np.asarray(got[k]), w, rtol=1e-5, err_msg=k)
