"""eval.py's work: per-size linear, k-NN and retrieval metrics of a checkpoint or of saved features.

Checkpoint mode (DESIGN.md §4): extract the database (train split) and query (eval split)
features once at full dimension, then for every size m (the nesting sizes plus
config.eval.extra_sizes, which were not trained): the head's top-1/top-5 (sizes with a head),
1-NN / k-NN accuracy and retrieval metrics on z[:, :m] truncated then L2-normalised. Robustness
datasets (config.eval.splits, e.g. imagenet_v2, imagenet_a) are queried against the same
database and the same ImageNet-1K heads, with the 200-class logit masks for -A and -R.

Embeddings-only mode: the same neighbour metrics on saved `.npy` features of any model.
Outputs per query dataset: `<out>/results.json`, `results.csv`, `accuracy_vs_dim.png`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mrl_jax import models
from mrl_jax import paths
from mrl_jax import sharding
from mrl_jax import utils
from mrl_jax import validation
from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import class_subsets
from mrl_jax.evaluation import deployment
from mrl_jax.evaluation import extract as extract_lib
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import linear
from mrl_jax.evaluation import metrics
from mrl_jax.evaluation import neighbors
from mrl_jax.evaluation import report

EMBEDDING_FILES = ("database_X.npy", "database_y.npy", "queries_X.npy", "queries_y.npy")


def eval_sizes(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(all sizes to evaluate, the trained ones): nesting sizes + config.eval.extra_sizes."""
  trained = models.head_sizes(config) if config.mrl.head == "ff" else models.nesting_sizes(config)
  extra = validation.parse_ints(config.eval.extra_sizes, "config.eval.extra_sizes")
  d = models.feature_dim(config)
  sizes = sorted(set(models.nesting_sizes(config)) | set(extra) | set(trained))
  return tuple(m for m in sizes if m <= d), tuple(trained)


def _head_logits_fn(model, class_mask):
  """jit: (params, batch_stats, z, z_flipped or None) -> {m: logits_m} (flip TTA: summed;
  a class subset's other logits -inf)."""

  @jax.jit
  def logits_fn(params, batch_stats, z, z_flipped):
    logits = model.head_logits(params, batch_stats, z)
    if z_flipped is not None:
      flipped = model.head_logits(params, batch_stats, z_flipped)
      logits = {m: logits[m] + flipped[m] for m in logits}
    if class_mask is not None:
      logits = {m: jnp.where(jnp.asarray(class_mask), l, -jnp.inf) for m, l in logits.items()}
    return logits

  return logits_fn


def _feature_blocks(queries: extract_lib.Features, block: int):
  """(rows, z [block, d], z_flipped or None) of stored features, the last block zero-padded."""
  n = len(queries.labels)
  for i in range(0, n, block):
    rows = min(block, n - i)
    pad = lambda x: np.pad(np.asarray(x, np.float32), [(0, block - rows), (0, 0)])
    yield rows, pad(queries.z[i:i + block]), (
        None if queries.z_flipped is None else pad(queries.z_flipped[i:i + block]))


def linear_metrics_by_size(model, params, batch_stats, queries: extract_lib.Features, mesh,
                           class_mask: np.ndarray | None = None,
                           block: int = 4096) -> dict[int, dict[str, float]]:
  """Each head's metrics from stored features: linear_top1 / linear_top5, or for multi-label
  queries `prec@1` (top-1 among the true labels) and `class_map` (class-mean AP)."""
  logits_fn = _head_logits_fn(model, class_mask)
  if queries.labels.ndim == 2:
    return _multilabel_linear_metrics(logits_fn, params, batch_stats, queries, mesh, block)

  def sums():
    for i, (rows, z, zf) in enumerate(_feature_blocks(queries, block)):
      labels = np.pad(queries.labels[i * block:i * block + rows], (0, block - rows))
      mask = np.pad(np.ones(rows, np.float32), (0, block - rows))
      yield linear.accuracy_sums(logits_fn(params, batch_stats, z, zf), labels, mask)

  with jax.set_mesh(mesh):
    fractions = linear.head_accuracy(lambda s: s, sums())
  by_size = {}
  for key, value in fractions.items():
    name, m = key.split("@")
    by_size.setdefault(int(m), {})[f"linear_{name}"] = value
  return by_size


def _multilabel_linear_metrics(logits_fn, params, batch_stats, queries, mesh, block,
                               budget_bytes: int = 2**30) -> dict[int, dict[str, float]]:
  """prec@1 and class-mean AP per size; the [N, C] scores of as many sizes as fit in
  budget_bytes are kept per pass over the features."""
  n = len(queries.labels)
  with jax.set_mesh(mesh):
    first = logits_fn(params, batch_stats, *next(_feature_blocks(queries, block))[1:])
  sizes = sorted(first)
  num_classes = first[sizes[0]].shape[-1]
  per_pass = max(1, budget_bytes // (4 * n * num_classes))
  out = {}
  for group in [sizes[i:i + per_pass] for i in range(0, len(sizes), per_pass)]:
    scores = {m: np.empty((n, num_classes), np.float32) for m in group}
    done = 0
    with jax.set_mesh(mesh):
      for rows, z, zf in _feature_blocks(queries, block):
        logits = jax.device_get(logits_fn(params, batch_stats, z, zf))
        for m in group:
          scores[m][done:done + rows] = np.asarray(logits[m])[:rows]
        done += rows
    for m in group:
      top = scores[m].argmax(-1)[:, None]
      out[m] = {"prec@1": float(np.mean(metrics.relevance(top, queries.labels)[:, 0])),
                "class_map": metrics.class_mean_average_precision(scores[m], queries.labels)}
      del scores[m]
  return out


# Eval datasets whose labels are not under config.input.label_key: ImageNet-ReaL's reassessed,
# multi-label labels (Beyer et al. 2020), as the ViT / big_vision evaluations read them.
LABEL_KEYS = {"imagenet2012_real": "real_label"}


def _query_datasets(config) -> list[tuple[str, str, str | None]]:
  """(dataset, split, label key) to query: the eval split, then config.eval.splits
  ('name[:split[:label_key]]')."""
  out = [(config.input.dataset, config.eval.get("query_split") or config.input.eval_split, None)]
  for item in filter(None, (s.strip() for s in config.eval.splits.split(","))):
    name, _, rest = item.partition(":")
    split, _, label_key = rest.partition(":")
    out.append((name, split or "test", label_key or LABEL_KEYS.get(name)))
  return out


def evaluate_checkpoint(config, workdir: str, *, checkpoint_step: int | None = None,
                        devices=None) -> dict[str, dict]:
  """Evaluates a trained workdir; returns {dataset: results} and writes the reports."""
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top  (train_lib imports us)
  workdir = paths.path(workdir)
  devices = list(devices) if devices is not None else jax.devices()
  validation.validate_config(config, len(devices), jax.process_count())
  ev = config.eval
  knn_ks = validation.parse_ints(ev.knn_k, "config.eval.knn_k") if ev.knn else ()
  retrieval_ks = validation.parse_ints(ev.retrieval_k, "config.eval.retrieval_k") if ev.knn else ()
  sizes, trained = eval_sizes(config)
  dtype = extract_lib.feature_dtype(ev.feature_dtype)
  query_sets = _query_datasets(config)
  sources = {name: pipeline.open_source(config.input, dataset=name, label_key=key)
             for name, _, key in query_sets}
  for name, split, _ in query_sets:  # Unknown splits fail here, before any compilation.
    sources[name].num_examples(split)
  mesh = sharding.make_mesh(config.mesh, devices)
  model, params, batch_stats, step = train_lib.restore_for_eval(config, workdir, mesh,
                                                                checkpoint_step)
  search = knn.ExactSearch(mesh, query_block=ev.query_block, database_block=ev.database_block,
                           chunk_rows=ev.get("database_chunk_rows"))
  main_source = sources[config.input.dataset]
  main_reader = pipeline.make_reader(config.input, main_source)
  database = None
  if knn_ks or retrieval_ks:
    database = extract_lib.extract(
        model, params, batch_stats, source=main_source, reader=main_reader,
        split=ev.database_split, input_cfg=config.input, mesh=mesh, dtype=dtype,
        max_examples=ev.get("max_database"), description=f"database {ev.database_split}")
  queries, per_size, unlabelled = {}, {}, {}
  for name, split, _ in query_sets:
    source = sources[name]
    reader = main_reader if name == config.input.dataset else pipeline.make_reader(
        config.input, source)
    extracted = extract_lib.extract(
        model, params, batch_stats, source=source, reader=reader, split=split,
        input_cfg=config.input, mesh=mesh, dtype=dtype, flip=ev.flip_tta,
        description=f"queries {name}:{split}")
    queries[name] = extracted.labelled()  # multi-label: images without a label left out
    unlabelled[name] = len(extracted.labels) - len(queries[name].labels)
    if ev.save_features:
      outdir = paths.join(workdir, "eval", name)
      queries[name].save(outdir, split)
      if database is not None and name == config.input.dataset:
        database.save(outdir, ev.database_split)
    per_size[name] = {m: {} for m in sizes}
    if ev.linear:
      mask = class_subsets.class_mask(name, config.num_classes)
      for m, values in linear_metrics_by_size(model, params, batch_stats, queries[name], mesh,
                                              mask).items():
        per_size[name][m].update(values)
  extras = {}
  if database is not None:
    by_query_set = neighbors.metrics_by_size(
        database.z, database.labels, {n: (q.z, q.labels) for n, q in queries.items()}, sizes,
        knn_ks=knn_ks, retrieval_ks=retrieval_ks, search=search, num_classes=config.num_classes)
    for name, by_size in by_query_set.items():
      for m, values in by_size.items():
        per_size[name][m].update(values)
    # Adaptive retrieval/classification, baselines, few-shot: on the main query set.
    extras = deployment.run(config, model, params, batch_stats, database,
                            queries[config.input.dataset], sizes=sizes, trained=trained,
                            search=search, knn_ks=knn_ks, retrieval_ks=retrieval_ks)
  all_results = {}
  for name, split, _ in query_sets:
    results = {
        "model": model.signature, "checkpoint_step": step, "dataset": name, "split": split,
        "multi_label": bool(queries[name].labels.ndim == 2),
        "num_unlabelled_excluded": unlabelled[name],
        "database_split": ev.database_split if database is not None else None,
        "num_queries": int(len(queries[name].labels)),
        "num_database": int(len(database.labels)) if database is not None else 0,
        "flip_tta": bool(ev.flip_tta), "trained_sizes": list(trained),
        "class_subset": None if class_subsets.class_indices(name) is None else 200,
        "sizes": {str(m): per_size[name][m] for m in sizes},
        "adaptive_retrieval": [], "adaptive_classification": [],
    }
    if name == config.input.dataset:
      results.update(extras)
    outdir = paths.join(workdir, "eval", name)
    report.write(outdir, results)
    logging.info("eval %s:%s -> %s", name, split, outdir)
    all_results[name] = results
  return all_results


EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16}


def export_embeddings(config, workdir, out, *, size: int | None = None, dtype: str = "float32",
                      checkpoint_step: int | None = None, devices=None) -> dict[str, int]:
  """Writes the checkpoint's features in the layout embeddings-only mode reads: database (the
  config.eval.database_split) and queries (the eval split), truncated to `size` if given, as
  float32 or float16, labels int64. Returns {file name: rows}."""
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top  (train_lib imports us)
  if dtype not in EXPORT_DTYPES:
    raise ConfigError(f"--export_dtype={dtype!r}; allowed: {sorted(EXPORT_DTYPES)}")
  d = models.feature_dim(config)
  if size is not None and not 1 <= size <= d:
    raise ConfigError(f"--export_size={size} is outside [1, {d}] (the feature dim)")
  devices = list(devices) if devices is not None else jax.devices()
  validation.validate_config(config, len(devices), jax.process_count())
  source = pipeline.open_source(config.input)
  reader = pipeline.make_reader(config.input, source)
  mesh = sharding.make_mesh(config.mesh, devices)
  model, params, batch_stats, _ = train_lib.restore_for_eval(config, paths.path(workdir), mesh,
                                                             checkpoint_step)
  splits = {"database": config.eval.database_split,
            "queries": config.eval.get("query_split") or config.input.eval_split}
  rows = {}
  for part, split in splits.items():
    features = extract_lib.extract(
        model, params, batch_stats, source=source, reader=reader, split=split,
        input_cfg=config.input, mesh=mesh, description=f"{part} {split}",
        max_examples=config.eval.get("max_database") if part == "database" else None)
    features.z = features.z[:, :size or d].astype(EXPORT_DTYPES[dtype])
    features.save(out, part)
    rows[f"{part}_X.npy"] = len(features.labels)
  return rows


def load_embeddings(directory: str) -> dict[str, np.ndarray]:
  """The four .npy files of embeddings-only mode, validated (one-line errors)."""
  arrays = {}
  for name in EMBEDDING_FILES:
    path = paths.join(directory, name)
    if not path.exists():
      raise ConfigError(f"missing {path}; embeddings-only mode needs "
                        f"{', '.join(EMBEDDING_FILES)} in --embeddings")
    try:
      arrays[name[:-4]] = paths.load_npy(path)
    except ValueError as e:
      raise ConfigError(f"{path} is not a plain numeric .npy array ({e})") from None
  for part in ("database", "queries"):
    x, y = arrays[f"{part}_X"], arrays[f"{part}_y"]
    if x.ndim != 2:
      raise ConfigError(f"{part}_X.npy has shape {x.shape}; allowed: [N, d]")
    if y.ndim != 1:
      raise ConfigError(f"{part}_y.npy has shape {y.shape}; allowed: [N] integer labels")
    if len(x) != len(y):
      raise ConfigError(f"{part}_X.npy has {len(x)} rows but {part}_y.npy has {len(y)} labels; "
                        "they must match")
    if not np.issubdtype(y.dtype, np.integer):
      raise ConfigError(f"{part}_y.npy has dtype {y.dtype}; labels must be integers (save them "
                        "with y.astype(np.int64))")
    if len(y) and y.min() < 0:
      raise ConfigError(f"{part}_y.npy has a negative label {int(y.min())}; allowed: >= 0")
    if not np.issubdtype(x.dtype, np.floating):
      raise ConfigError(f"{part}_X.npy has dtype {x.dtype}; features must be floating point")
    finite = np.isfinite(x)
    if not finite.all():
      row = int(np.argwhere(~finite)[0][0])
      raise ConfigError(f"{part}_X.npy has a NaN/inf value (first in row {row}); features must "
                        "be finite")
  d_db, d_q = arrays["database_X"].shape[1], arrays["queries_X"].shape[1]
  if d_db != d_q:
    raise ConfigError(f"database_X.npy has d={d_db} but queries_X.npy has d={d_q}; they must "
                      "match")
  return arrays


def evaluate_embeddings(directory: str, sizes: Sequence[int], out: str, *,
                        knn_ks: Sequence[int] = (1,), retrieval_ks: Sequence[int] = (10,),
                        query_block: int = 1024, database_block: int = 65536,
                        database_chunk_rows: int | None = None, devices=None) -> dict:
  """Neighbour metrics of saved features (no model): writes the reports to `out`."""
  arrays = load_embeddings(directory)
  d = arrays["database_X"].shape[1]
  for m in sizes:
    if not 1 <= m <= d:
      raise ConfigError(f"size {m} is outside [1, {d}] (--sizes; d of the saved features)")
  if len(set(sizes)) != len(sizes):
    raise ConfigError(f"--sizes={list(sizes)} has a duplicate")
  devices = list(devices) if devices is not None else jax.devices()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices)
  search = knn.ExactSearch(mesh, query_block=query_block, database_block=database_block,
                           chunk_rows=database_chunk_rows)
  per_size = neighbors.metrics_by_size(
      arrays["database_X"], arrays["database_y"],
      {"queries": (arrays["queries_X"], arrays["queries_y"])}, sorted(sizes), knn_ks=knn_ks,
      retrieval_ks=retrieval_ks, search=search)["queries"]
  results = {
      "model": None, "checkpoint_step": None, "dataset": str(paths.path(directory)),
      "split": "queries", "database_split": "database",
      "num_queries": int(len(arrays["queries_y"])), "num_database": int(len(arrays["database_y"])),
      "flip_tta": False, "trained_sizes": sorted(sizes),
      "sizes": {str(m): per_size[m] for m in sorted(sizes)},
      "adaptive_retrieval": [], "adaptive_classification": [],
  }
  report.write(out, results)
  return results
