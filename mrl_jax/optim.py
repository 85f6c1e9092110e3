"""Optimizer and learning-rate schedule from config.optim / config.schedule (optax).

- sgd: PyTorch-style SGD (weight decay added to the gradient before momentum), as the official
  MRL/FFCV ResNet-50 recipe. adamw: decoupled weight decay. lars: optax.lars. lamb: optax.lamb
  (ALIGN's optimizer).
- Weight decay (config.optim.weight_decay_rule): `kernels` skips BatchNorm/LayerNorm parameters
  and biases (every parameter with fewer than two dimensions); `official` is the official MRL /
  FFCV rule, no decay for parameters whose PyTorch name contains "bn" (so the shortcut's
  BatchNorm, `downsample.1`, and the heads' biases are decayed); `all` decays everything.
- Schedules: `cosine` / `linear` decay after linear warmup, `constant`, and `one_cycle`: FFCV's
  cyclic schedule used by the official recipe, np.interp(epoch, [0, peak_epoch, epochs],
  [start_lr_factor * lr, lr, end_lr_factor * lr]) with the epoch fractional within an epoch
  (FFCV interpolates per iteration between epoch boundaries, which is the same line).
- lr = base_lr * batch_size / lr_batch_size (linear scaling).
"""

import jax
import optax

from mrl_jax import models
from mrl_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
SCHEDULES = ("cosine", "linear", "one_cycle", "constant")
DECAY_RULES = ("kernels", "official", "all")


def steps_from(config, name: str, steps_per_epoch: int, default=None) -> int | None:
  """`{name}_steps` if set, else `{name}_epochs` * steps_per_epoch (rounded), else default."""
  steps = config.get(f"{name}_steps")
  if steps is not None:
    return int(steps)
  epochs = config.get(f"{name}_epochs")
  if epochs:
    return int(round(float(epochs) * steps_per_epoch))
  return default


def make_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  sched = config.schedule
  if sched.name not in SCHEDULES:
    raise ConfigError(f"unknown schedule {sched.name!r} (config.schedule.name); "
                      f"allowed: {list(SCHEDULES)}")
  if sched.lr_batch_size <= 0:
    raise ConfigError(f"config.schedule.lr_batch_size={sched.lr_batch_size} must be > 0")
  lr = sched.base_lr * config.input.batch_size / sched.lr_batch_size
  if sched.name == "one_cycle":
    peak = max(1, min(int(round(sched.peak_epoch * steps_per_epoch)), total_steps - 1))
    return optax.join_schedules([
        optax.linear_schedule(lr * sched.get("start_lr_factor", 0.0), lr, peak),
        optax.linear_schedule(lr, lr * sched.end_lr_factor, max(total_steps - peak, 1)),
    ], [peak])
  warmup = steps_from(sched, "warmup", steps_per_epoch, default=0)
  warmup = min(warmup, max(total_steps - 1, 0))
  end = lr * sched.end_lr_factor
  if sched.name == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                              end_value=end)
  main = (optax.linear_schedule(lr, end, max(total_steps - warmup, 1)) if sched.name == "linear"
          else optax.constant_schedule(lr))
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(config, spec, params):
  """True for the parameters that get weight decay, by config.optim.weight_decay_rule."""
  rule = config.optim.weight_decay_rule
  if rule not in DECAY_RULES:
    raise ConfigError(f"unknown weight decay rule {rule!r} (config.optim.weight_decay_rule); "
                      f"allowed: {list(DECAY_RULES)}")
  if rule == "all":
    return jax.tree.map(lambda p: True, params)
  if rule == "kernels":
    return jax.tree.map(lambda p: p.ndim >= 2, params)
  names = models.torchvision_param_names(config, spec)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: "bn" not in names[tuple(k.key for k in path)], params)


def make_optimizer(config, spec, params,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  opt = config.optim
  if opt.name not in OPTIMIZERS:
    raise ConfigError(f"unknown optimizer {opt.name!r} (config.optim.name); "
                      f"allowed: {list(OPTIMIZERS)}")
  mask = decay_mask(config, spec, params)
  chain = []
  if opt.clip_grad_norm:
    chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
  if opt.name == "sgd":
    if opt.weight_decay:
      chain.append(optax.add_decayed_weights(opt.weight_decay, mask))
    chain.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  elif opt.name == "adamw":
    chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=mask))
  elif opt.name == "lamb":  # You et al. 2020, as ALIGN trains (Adam + layer-wise trust ratio)
    chain.append(optax.lamb(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                            weight_decay=opt.weight_decay, mask=mask))
  else:
    chain.append(optax.lars(schedule, weight_decay=opt.weight_decay, weight_decay_mask=mask,
                            trust_coefficient=opt.trust_coefficient, trust_ratio_mask=mask,
                            momentum=opt.momentum, nesterov=opt.nesterov))
  tx = optax.chain(*chain)
  frozen = (config.model.get("freeze") if getattr(spec, "model_name", None) == "two_towers"
            else "")
  if not frozen:
    return tx
  # LiT: the locked tower's parameters get exactly zero updates (no decay either).
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if path[0].key == frozen else "trained", params)
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
