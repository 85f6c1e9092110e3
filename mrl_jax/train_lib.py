"""The trainer: the jit-compiled sharded MRL train step and the train loop.

The step is `jax.jit` over a pure function of (TrainState, batch): merge -> one encoder forward
-> every head -> Matryoshka loss -> grads -> optax update. It is compiled once with explicit
in/out shardings and donates the state. The per-step RNG is `fold_in(key, step)`, so a resumed
run draws the same random numbers as an uninterrupted one. Building, placing and restoring the
model and its state live in state.py; the periodic evaluation is the evaluators' linear one on
the eval split (evaluation/evaluators.py), as in eval.py.
"""

import dataclasses
import signal
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import distributed
from mrl_jax import losses
from mrl_jax import models
from mrl_jax import objectives
from mrl_jax import optim
from mrl_jax import paths
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import utils
from mrl_jax import validation
from mrl_jax import lock as lock_lib
from mrl_jax import workdir as workdir_lib
from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError
from mrl_jax.errors import NonFiniteError


# Per-size eval metrics summary.json keeps: head accuracy (classify), masked-token accuracy
# (mlm), Spearman with human similarity ratings (text), retrieval and zero-shot (image-text).
SUMMARY_METRICS = ("top1", "top5", "prec1", "mlm_acc", "spearman", "recall@1_i2t",
                   "recall@1_t2i", "zeroshot_top1")
CONSOLE_METRICS = ("top1", "prec1", "mlm_acc", "spearman", "zeroshot_top1", "recall@1_t2i")


def dry_run(config, workdir) -> dict:
  """Builds the model abstractly, prints the parameter table and one line per encoder (a dual
  encoder's two towers), writes model_summary.json."""
  spec = validation.validate_model(config)
  _, params, batch_stats = state_lib.build_model(config, spec)
  print(utils.parameter_table(params))
  encoders = state_lib.towers(spec.signature)
  counts = {name: utils.count_params(params[name]) for name in encoders}
  summary = {
      "encoder": spec.encoder,
      "model_name": spec.model_name,
      "feature_dim": spec.feature_dim,
      "num_classes": spec.num_classes,
      "nesting_sizes": list(spec.nesting),
      "head_sizes": list(spec.head_sizes),
      "head": spec.head,
      "num_params_encoder": sum(counts.values()),
      # the heads: classifiers (classify), BERT's MLM transform and bias (mlm), a dual
      # encoder's projections, temperature and bias, or none
      "num_params_heads": utils.count_params(params) - sum(counts.values()),
      "num_batch_stats": utils.count_params(batch_stats),
      "dtype": config.dtype,
      "objective": spec.objective,
  }
  if spec.model_name == models.DUAL:
    summary["towers"] = {name: {"encoder": encoders[name][0], "num_params": counts[name]}
                         for name in encoders}
  summary["num_params_total"] = summary["num_params_encoder"] + summary["num_params_heads"]
  utils.write_json(paths.join(workdir, "model_summary.json"), summary)
  for name, (arch, _) in encoders.items():
    print(f"{name} {arch}: {counts[name]:,} params")
  heads = ("projections, temperature" + (" and bias" if "bias" in params else "")
           if spec.model_name == models.DUAL else f"heads {spec.head} at {list(spec.head_sizes)}")
  print(f"feature_dim {spec.feature_dim}; {heads}: {summary['num_params_heads']:,} params")
  return summary


def make_train_step(config, model: state_lib.Model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh, state_sharding, objective=None):
  """The jitted `train_step(state, batch) -> (state, metrics)`; metrics are replicated.

  `objective` (objectives/, default: the spec's) says what the loss of a batch is."""
  objective = objective or objectives.create(config, model.spec)
  weights = jnp.asarray(losses.nesting_weights(config.mrl.weights, objective.sizes),
                        jnp.float32)
  accum = config.optim.grad_accum_steps
  skip_nonfinite = True  # Non-finite steps never touch the state; the host stops or goes on.

  def loss_fn(params, batch_stats, batch, rng, step_weights):
    dropout_rng, objective_rng = jax.random.split(rng)
    module = model.module(params, batch_stats, train=True)
    loss, metrics = objective.loss(module, batch, rngs=nnx.Rngs(dropout=dropout_rng),
                                   weights=step_weights, rng=objective_rng)
    return loss, (model.batch_stats_of(module), metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: state_lib.TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    sample_rng, dropout_rng = jax.random.split(rng)
    step_weights = losses.sample_nesting_weights(
        sample_rng, weights, config.mrl.sizes_per_step, keep_smallest=config.mrl.keep_smallest,
        keep_largest=config.mrl.keep_largest)
    if accum == 1:
      (loss, (batch_stats, metrics)), grads = grad_fn(
          state.params, state.batch_stats, batch, dropout_rng, step_weights)
    else:
      # Micro-batch j takes rows j, j + accum, ...: every micro-batch spans all devices.
      def micro(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, jax.P(None, sharding.BATCH_AXES)))

      def body(carry, xs):
        grads_sum, batch_stats = carry
        i, micro_batch = xs
        (loss, (batch_stats, metrics)), grads = grad_fn(
            state.params, batch_stats, micro_batch, jax.random.fold_in(dropout_rng, i),
            step_weights)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, batch_stats), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, batch_stats), (loss, metrics) = jax.lax.scan(
          body, (zeros, state.batch_stats), (jnp.arange(accum), jax.tree.map(micro, batch)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss.mean()
      metrics = jax.tree.map(jnp.mean, metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if skip_nonfinite:
      kept = state.replace(step=state.step + 1)
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    metrics = dict(metrics, loss=loss, finite=finite, lr=schedule(state.step),
                   l2_grads=optax.global_norm(grads), l2_params=optax.global_norm(params),
                   l2_updates=optax.global_norm(updates))
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)),
                 donate_argnums=0)


@dataclasses.dataclass
class RunInfo:
  """Sizes derived from the dataset at run time (configs do not hard-code dataset sizes)."""
  num_train_examples: int
  steps_per_epoch: int
  total_steps: int


def run_info(config, source: pipeline.Source) -> RunInfo:
  n = source.num_examples(config.input.train_split)
  steps_per_epoch = max(1, n // config.input.batch_size)
  total = optim.steps_from(config, "total", steps_per_epoch)
  return RunInfo(n, steps_per_epoch, max(1, total))


class _StopSignal:
  """SIGTERM / SIGINT -> save a checkpoint at the current step and exit cleanly.

  One process: a Python handler sets a flag that is checked after every step. Several processes
  (jax.distributed): JAX's preemption service catches SIGTERM on any host and agrees on a step at
  which `reached_preemption_sync_point` is True on every host, as orbax's preemption policy and
  MaxText use it; a SIGINT (Ctrl-C) on one host is shared at log steps with an all-gather.
  """

  def __init__(self):
    self.received = None
    self._previous = {}
    self.distributed = jax.process_count() > 1

  def __enter__(self):
    signals = (signal.SIGINT,) if self.distributed else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def stop_reason(self, step: int, log_step: bool) -> str | None:
    if not self.distributed:
      return self.received
    if multihost_utils.reached_preemption_sync_point(step):
      return "a preemption notice (SIGTERM)"
    if log_step and utils.multihost_any(self.received is not None):
      return self.received or "SIGINT on another process"
    return None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False,
                       devices=None) -> dict:
  """Trains (resuming from the workdir's latest checkpoint) and returns the summary dict.

  `devices` (default: all) lets a caller run on a subset, e.g. 1 of 8 simulated CPU devices.
  """
  workdir = paths.path(workdir)
  devices = list(devices) if devices is not None else jax.devices()
  num_devices = len(devices)
  spec = validation.validate(config, num_devices, jax.process_count())
  if spec.model_name == models.DUAL and config.model.get("freeze") and not config.get(
      "init_from"):
    raise ConfigError(f"config.model.freeze={config.model.freeze!r} without config.init_from "
                      "would lock a randomly initialised tower; set config.init_from to a "
                      "trained run (or converted checkpoint) holding that tower")
  # One job per workdir, before any expensive work (opening or preparing the dataset) and
  # before anything in the workdir is touched.
  with lock_lib.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, spec, devices, overwrite=overwrite)


def _train_and_evaluate(config, workdir, spec, devices, *, overwrite: bool) -> dict:
  num_devices = len(devices)
  source = pipeline.open_source(config.input)
  validation.validate_source(config, spec, source)
  if spec.objective == "classify" and source.num_classes and (
      source.num_classes != config.num_classes):
    raise ConfigError(f"config.num_classes={config.num_classes} but dataset {source.name!r} has "
                      f"{source.num_classes} classes")
  objective = objectives.create(config, spec)
  workdir_lib.check(workdir, config, overwrite=overwrite)
  info = run_info(config, source)
  mesh = sharding.make_mesh(config.mesh, devices)
  model, abstract_params, _ = state_lib.build_model(config, spec)
  schedule = optim.make_schedule(config, info.steps_per_epoch, info.total_steps)
  tx = optim.make_optimizer(config, spec, abstract_params, schedule)
  ckpt = checkpoint_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                                     every_steps=config.checkpoint_every_steps,
                                     keep=config.keep_checkpoints)
  abstract_state, state_sharding = state_lib.abstract_train_state(config, spec, tx, mesh)
  restored = ckpt.restore(abstract_state, expected_signature=spec.signature)
  start_step = 0
  if restored is not None:
    state, _, start_step = restored
    logging.info("resumed from step %d (%s)", start_step, ckpt.directory)
    utils.console(f"Resuming from checkpoint step {start_step} in {ckpt.directory}")
  else:
    state, _ = state_lib.create_train_state(config, spec, tx, mesh)
    if config.get("init_from"):
      state = state_lib.init_from_checkpoint(config, spec, state)
  workdir_lib.record(workdir, config)
  meta = {"signature": spec.signature, "global_batch": config.input.batch_size,
          "reader": config.input.reader, "num_processes": jax.process_count()}

  writer = utils.metric_writer(workdir, resume_step=start_step or None)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in utils.flatten_config(config).items()
                          if isinstance(v, (int, float, str, bool))})
    if utils.is_main_process():
      paths.write_text(paths.join(workdir, "parameters.txt"),
                       utils.parameter_table(state.params) + "\n")

  train_step = make_train_step(config, model, tx, schedule, mesh, state_sharding, objective)
  reader = pipeline.make_reader(config.input, source)
  train_pp = objective.train_preprocess(source, info.steps_per_epoch)
  local_batch = config.input.batch_size // jax.process_count()
  train_batches = pipeline.global_batches(
      reader.train_batches(config.input.train_split, local_batch=local_batch,
                           start_batch=start_step, seed=config.seed,
                           train_preprocess=train_pp, process_index=jax.process_index(),
                           process_count=jax.process_count(),
                           shuffle_buffer=config.input.shuffle_buffer),
      sharding.batch_sharding(mesh), config.input.prefetch)

  def save(step, force):
    if step in ckpt.all_steps():  # e.g. a forced save right after an interval save
      return False
    saved = ckpt.save(step, state, dict(meta, step=step, data_position=step), force=force)
    if saved:
      logging.info("checkpoint saved at step %d", step)
    return saved

  step = start_step
  last_metrics, pending = {}, None
  train_seconds, train_steps_timed = 0.0, 0
  log_time, last_log_step = time.perf_counter(), step
  first_step_done = None
  stopped_by = None
  input_wait, input_watch = 0.0, _InputWatch()
  try:
    with _StopSignal() as stop, jax.set_mesh(mesh):
      while step < info.total_steps:
        waited = time.perf_counter()
        batch = next(train_batches)
        input_wait += time.perf_counter() - waited
        state, metrics = train_step(state, batch)
        step += 1
        if pending is not None:  # Checked one step late, so the device never waits for the host.
          _check_finite(config, *pending)
        pending = (step, metrics)
        is_log_step = (step % config.log_every_steps == 0 or step == info.total_steps
                       or step == start_step + 1)
        if is_log_step:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(config, step, values)
          elapsed = time.perf_counter() - log_time
          steps_done = step - last_log_step
          if step > start_step + 1:  # Exclude the compiling first step from throughput.
            train_seconds += elapsed
            train_steps_timed += steps_done
          # examples per second (images for image models; texts / text pairs for text ones)
          values["images_per_second"] = steps_done * config.input.batch_size / max(elapsed, 1e-9)
          values["step_time"] = elapsed / max(steps_done, 1)
          # The share of the wall time the loop waited for the next batch: the device idles
          # for (most of) it, as the step is dispatched asynchronously and checked one late.
          values["input_wait"] = min(input_wait / max(elapsed, 1e-9), 1.0)
          if step > start_step + 1:
            input_watch.check(step, values["input_wait"], reader.skipped)
          last_metrics = values
          writer.write_scalars(step, {f"train/{k}": v for k, v in values.items() if k != "finite"})
          if first_step_done is None:
            first_step_done = time.perf_counter()
            eta = None
          else:  # wall-clock per step since the (compiling) first step: evals and saves count
            eta = ((time.perf_counter() - first_step_done) / (step - start_step - 1)
                   * (info.total_steps - step))
          _print_train_line(step, info.total_steps, values, objective.sizes, eta)
          log_time, last_log_step, input_wait = time.perf_counter(), step, 0.0
        if config.eval_every_steps and step % config.eval_every_steps == 0 and (
            step < info.total_steps):
          _log_eval(step, objective.evaluate(model, state, source, reader, mesh), writer)
          log_time, input_wait = time.perf_counter(), 0.0
        save(step, force=step == info.total_steps)
        stopped_by = stop.stop_reason(step, is_log_step)
        if stopped_by:
          break
      if pending is not None:
        _check_finite(config, *pending)
    ckpt.wait()
    if stopped_by is not None:
      save(step, force=True)
      ckpt.close()
  except BaseException:
    ckpt.abort()  # complete checkpoints stay behind; orbax's threads stop before exit
    raise
  if stopped_by is not None:
    writer.flush()
    utils.console(f"Received {stopped_by}: saved a checkpoint at step {step} in "
                  f"{ckpt.directory}. Rerun the same command to resume.")
    return {"final_step": step, "preempted": True}

  final_eval = objective.evaluate(model, state, source, reader, mesh)
  _log_eval(step, final_eval, writer)
  input_watch.check_skipped(step, reader.skipped)
  ckpt.close()
  writer.flush()
  summary = {
      "final_step": step,
      "train_loss": last_metrics.get("loss"),
      "eval": {str(m): {name: value for (name, size), value in _per_size(final_eval).items()
                        if size == m and name.rpartition("/")[2] in SUMMARY_METRICS}
               for m in objective.sizes},
      "images_per_second": (train_steps_timed * config.input.batch_size / train_seconds
                            if train_seconds else last_metrics.get("images_per_second")),
      "input_wait": last_metrics.get("input_wait"),
      "skipped_images": reader.skipped,
      "num_devices": num_devices,
      "num_processes": jax.process_count(),
      "processes": list(distributed.process_table()),
      "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape))),
      "dataset": source.name,
      "eval_split": config.input.eval_split,
      "model": spec.signature,
  }
  utils.write_json(paths.join(workdir, "summary.json"), summary)
  return summary


INPUT_WAIT_WARN = 0.2  # share of the loop's wall time spent waiting for the next batch


def _check_finite(config, step: int, metrics) -> None:
  finite = bool(np.asarray(jax.device_get(metrics["finite"])))
  if finite:
    return
  values = jax.device_get(metrics)
  per_size = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(values.items())
                       if k.startswith("loss@"))
  message = (f"non-finite loss or gradient at step {step} (loss={float(values['loss']):.4g}; "
             f"{per_size}); the update was not applied")
  if config.on_nonfinite == "skip":
    utils.warn(f"{message}; continuing (config.on_nonfinite='skip')")
    return
  raise NonFiniteError(f"{message}. Stopping (config.on_nonfinite='stop'); the last good "
                       "checkpoint is kept.")


def _print_train_line(step, total, values, nesting, eta_seconds) -> None:
  sizes = [nesting[0], nesting[-1]] if len(nesting) > 1 else list(nesting)
  # top1 (classify), prec1 (multi-label), mlm_acc (mlm), acc (contrastive: in-batch top-1)
  hit = next(h for h in ("top1", "prec1", "mlm_acc", "acc") if f"{h}@{sizes[0]}" in values)
  parts = " ".join(f"{hit}@{m}={values[f'{hit}@{m}']:.3f}" for m in sizes)
  unit = "img/s" if hit in ("top1", "prec1") else "ex/s"
  utils.console(f"step {step}/{total} loss={values['loss']:.4f} {parts} lr={values['lr']:.4g} "
                f"{values['images_per_second']:.0f} {unit} input-wait "
                f"{values['input_wait']:.0%} eta {format_duration(eta_seconds)}")


class _InputWatch:
  """One warning when the loop first waits for input more than INPUT_WAIT_WARN of the time
  (the accelerators idle: more input cores are needed), one when the first unreadable image is
  skipped; the train line carries the wait share, summary.json the skipped count."""

  def __init__(self):
    self.warned_wait = False
    self.warned_skip = False

  def check(self, step: int, wait_share: float, skipped: int) -> None:
    self.check_skipped(step, skipped)
    if wait_share > INPUT_WAIT_WARN and not self.warned_wait:
      self.warned_wait = True
      utils.warn(f"input-bound: the train loop waited for input {wait_share:.0%} of the time "
                 f"before step {step} (warning above {INPUT_WAIT_WARN:.0%}); give the input "
                 "pipeline more host cores (config.input.num_workers) or see docs/data.md "
                 "(faster preprocessing, re-encoding)")

  def check_skipped(self, step: int, skipped: int) -> None:
    if skipped and not self.warned_skip:
      self.warned_skip = True
      utils.warn(f"skipped {skipped} unreadable image(s) (corrupt files) by step {step}, "
                 "counted in summary.json (skipped_images); the run goes on")


def format_duration(seconds: float | None) -> str:
  """'1h02m', '3m05s', '12s'; '--' when unknown (before the first timed step)."""
  if seconds is None:
    return "--"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _per_size(results: dict) -> dict[tuple[str, int], float]:
  """{(name, m): value} of the per-size metrics "name@m" (name may hold a set: "set/metric")."""
  out = {}
  for key, value in results.items():
    name, _, size = key.rpartition("@")
    if name and size.isdigit():
      out[name, int(size)] = value
  return out


def _log_eval(step, results, writer) -> None:
  writer.write_scalars(step, {f"val/{k}": v for k, v in results.items()})
  hits = sorted((m, name, v) for (name, m), v in _per_size(results).items()
                if name.rpartition("/")[2] in CONSOLE_METRICS)
  if hits:  # (no line when no evaluation set is configured)
    utils.console(f"eval step {step}: " + " ".join(f"{h}@{m}={v:.4f}" for m, h, v in hits))
