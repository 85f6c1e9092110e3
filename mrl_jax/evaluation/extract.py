"""Sharded embedding extraction: the encoder once over a split, full-dimensional z to host.

Every nesting size is evaluated by slicing these features (z[:, :m]); the encoder never runs
per size (MRL's whole point: one forward pass serves every size). Batches are sharded over the mesh; z is returned replicated so every
process gets all of it; padding rows are dropped with the mask. Features are stored as float32
or bfloat16 (config.eval.feature_dtype); labels are int64, never a float type.
"""

import dataclasses
import functools

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from mrl_jax import paths
from mrl_jax import sharding
from mrl_jax import utils
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import metrics

FEATURE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class Features:
  """z [N, d] (and z of the flipped images for TTA) with labels: int64 [N], or for multi-label
  data padded class-id lists int32 [N, L] (-1: none; metrics.label_lists)."""
  z: np.ndarray
  labels: np.ndarray
  z_flipped: np.ndarray | None = None

  def save(self, directory, prefix: str) -> None:
    """`<prefix>_X.npy` [N, d] and `<prefix>_y.npy` int64 [N] (multi-label: [N, L], -1
    padded), process 0 only."""
    if not utils.is_main_process():
      return
    paths.save_npy(paths.join(directory, f"{prefix}_X.npy"), self.z)
    paths.save_npy(paths.join(directory, f"{prefix}_y.npy"), self.labels.astype(np.int64))

  def labelled(self) -> "Features":
    """Without the examples that have no label (multi-label data, e.g. ImageNet-ReaL)."""
    keep = metrics.has_label(self.labels)
    if keep.all():
      return self
    return Features(self.z[keep], self.labels[keep],
                    None if self.z_flipped is None else self.z_flipped[keep])


def feature_dtype(name: str):
  if name not in FEATURE_DTYPES:
    raise ConfigError(f"unknown feature dtype {name!r} (config.eval.feature_dtype); allowed: "
                      f"{sorted(FEATURE_DTYPES)}")
  return FEATURE_DTYPES[name]


@functools.cache
def _encode_fn(model, mesh, flip: bool):
  """jit: (params, batch_stats, batch) -> {z[, z_flipped], label, mask}, all replicated so that
  every process can read the whole batch."""

  def encode(params, batch_stats, batch):
    z, _ = model.apply(params, batch_stats, batch["image"])
    out = {"z": z.astype(np.float32), "label": batch["label"], "mask": batch["mask"]}
    if flip:
      z_flipped, _ = model.apply(params, batch_stats, batch["image"][:, :, ::-1])
      out["z_flipped"] = z_flipped.astype(np.float32)
    return out

  return jax.jit(encode, in_shardings=(None, None, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def extract(model, params, batch_stats, *, source: pipeline.Source, reader: pipeline.Reader,
            split: str, input_cfg, mesh, dtype=np.float32, flip: bool = False,
            max_examples: int | None = None, description: str = "",
            show_progress: bool = True) -> Features:
  """Runs the (eval-mode) encoder over `split` with the eval preprocessing."""
  batch = input_cfg.get("eval_batch_size") or input_cfg.batch_size
  local_batch = batch // jax.process_count()
  n = source.num_examples(split)
  if max_examples:
    n = min(n, max_examples)
  num_batches = pipeline.num_eval_batches(n, local_batch, jax.process_count())
  pp = preprocess.from_config(input_cfg, train=False, channels=source.channels)
  skipped_before = reader.skipped
  batches = pipeline.global_batches(
      reader.eval_batches(split, local_batch=local_batch, num_batches=num_batches, preprocess=pp,
                          process_index=jax.process_index(), process_count=jax.process_count()),
      sharding.batch_sharding(mesh), input_cfg.prefetch)
  encode = _encode_fn(model, mesh, flip)
  parts = {"z": [], "z_flipped": [], "label": []}
  bar = tqdm(total=num_batches * batch, unit="img", desc=description or f"extract {split}",
             disable=not (show_progress and utils.is_main_process()), mininterval=2.0)
  with jax.set_mesh(mesh):
    for b in batches:
      out = jax.device_get(encode(params, batch_stats, b))
      keep = np.asarray(out.pop("mask")) > 0
      for key, value in out.items():
        value = np.asarray(value)[keep]
        parts[key].append(metrics.label_lists(value) if key == "label" and value.ndim == 2
                          else value)
      bar.update(batch)
  bar.close()
  z = np.concatenate(parts["z"])[:n].astype(dtype)
  if reader.skipped > skipped_before:
    utils.warn(f"{split}: skipped {reader.skipped - skipped_before} unreadable image(s) "
               f"(corrupt files); the other {len(z)} are evaluated")
  return Features(
      z=z, labels=_concat_labels(parts["label"])[:n],
      z_flipped=np.concatenate(parts["z_flipped"])[:n].astype(dtype) if flip else None)


def _concat_labels(parts: list[np.ndarray]) -> np.ndarray:
  """int64 [N], or padded lists [N, L] with L the widest part's."""
  if parts[0].ndim == 1:
    return np.concatenate(parts).astype(np.int64)
  width = max(p.shape[1] for p in parts)
  return np.concatenate([np.pad(p, [(0, 0), (0, width - p.shape[1])], constant_values=-1)
                         for p in parts]).astype(np.int32)
