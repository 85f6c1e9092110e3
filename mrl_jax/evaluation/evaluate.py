"""eval.py's work: evaluate a checkpoint or saved features, or export a checkpoint's features.

Checkpoint mode: restore the checkpoint (state.py), extract the database (train split) and
query (eval split, plus the robustness datasets of config.eval.splits, e.g. imagenet_v2,
imagenet_a) features once at full dimension, and run the evaluators config.eval enables
(evaluators.py) on them: per size m (the nesting sizes plus config.eval.extra_sizes, which were
not trained) the head's metrics (sizes with a head), 1-NN / k-NN accuracy and retrieval metrics
on z[:, :m] truncated then L2-normalised, and on the main query set adaptive retrieval and
classification, baselines and few-shot accuracy. Robustness datasets are queried against the
same database and the same ImageNet-1K heads, with the 200-class logit masks for -A and -R.

Embeddings-only mode: the neighbour and adaptive-retrieval evaluators on saved `.npy` features
of any model (embeddings.py: this project's layout or the official dumps, memory-mapped).
Outputs per query dataset: `<out>/results.json`, `results.csv`, `accuracy_vs_dim.png`.
"""

import functools
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from mrl_jax import inference
from mrl_jax import models
from mrl_jax import paths
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import validation
from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import adaptive_retrieval
from mrl_jax.evaluation import class_subsets
from mrl_jax.evaluation import embeddings
from mrl_jax.evaluation import evaluators
from mrl_jax.evaluation import extract as extract_lib
from mrl_jax.evaluation import image_text as image_text_eval
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import linear
from mrl_jax.evaluation import report
from mrl_jax.evaluation import text as text_eval

# Eval datasets whose labels are not under config.input.label_key: ImageNet-ReaL's reassessed,
# multi-label labels (Beyer et al. 2020), as the ViT / big_vision evaluations read them.
LABEL_KEYS = {"imagenet2012_real": "real_label"}


def _query_datasets(config) -> list[tuple[str, str, str | None]]:
  """(dataset, split, label key) to query: the eval split, then config.eval.splits
  ('name[:split[:label_key]]')."""
  out = [(config.input.dataset, config.eval.get("query_split") or config.input.eval_split, None)]
  for item in config.eval.splits:
    name, _, rest = item.partition(":")
    split, _, label_key = rest.partition(":")
    out.append((name, split or "test", label_key or LABEL_KEYS.get(name)))
  return out


def _search(ev, mesh) -> knn.ExactSearch:
  return exact_search(mesh, ev.query_block, ev.database_block, ev.get("database_chunk_rows"))


@functools.lru_cache(maxsize=8)
def exact_search(mesh, query_block: int, database_block: int, chunk_rows: int | None
                 ) -> knn.ExactSearch:
  """One search per mesh and blocking in a process: its jitted programs (one per size and
  block shape) are traced and compiled once, not again at every periodic eval of a run."""
  return knn.ExactSearch(mesh, query_block=query_block, database_block=database_block,
                         chunk_rows=chunk_rows)


def evaluate_checkpoint(config, workdir, *, checkpoint_step: int | None = None,
                        devices=None) -> dict[str, dict]:
  """Evaluates a trained workdir; returns {dataset: results} and writes the reports."""
  workdir = paths.path(workdir)
  devices = list(devices) if devices is not None else jax.devices()
  spec = validation.validate(config, len(devices), jax.process_count())
  if spec.objective != "classify":  # text and image-text models
    return evaluate_text_checkpoint(config, spec, workdir, checkpoint_step=checkpoint_step,
                                    devices=devices)
  ev = config.eval
  dtype = extract_lib.feature_dtype(ev.feature_dtype)
  query_sets = _query_datasets(config)
  sources = {name: pipeline.open_source(config.input, dataset=name, label_key=key)
             for name, _, key in query_sets}
  for name, split, _ in query_sets:  # Unknown splits fail here, before any compilation.
    sources[name].num_examples(split)
  mesh = sharding.make_mesh(config.mesh, devices)
  model, params, batch_stats, step = state_lib.restore(config, spec, workdir, mesh,
                                                       checkpoint_step)
  readers = {name: pipeline.make_reader(config.input, source) for name, source in
             sources.items()}
  todo = evaluators.from_config(ev, spec, cache_dir=str(
      paths.join(workdir, "eval", config.input.dataset)))
  database = None
  if any(not isinstance(e, evaluators.Linear) for e in todo):
    database = extract_lib.extract(
        model, params, batch_stats, source=sources[config.input.dataset],
        reader=readers[config.input.dataset], split=ev.database_split, input_cfg=config.input,
        mesh=mesh, dtype=dtype, max_examples=ev.get("max_database"),
        description=f"database {ev.database_split}")
  queries, unlabelled = {}, {}
  for name, split, _ in query_sets:
    extracted = extract_lib.extract(
        model, params, batch_stats, source=sources[name], reader=readers[name], split=split,
        input_cfg=config.input, mesh=mesh, dtype=dtype, flip=ev.flip_tta,
        description=f"queries {name}:{split}")
    queries[name] = extracted.labelled()  # multi-label: images without a label left out
    unlabelled[name] = len(extracted.labels) - len(queries[name].labels)
    if ev.save_features:
      outdir = paths.join(workdir, "eval", name)
      queries[name].save(outdir, split)
      if database is not None and name == config.input.dataset:
        database.save(outdir, ev.database_split)
  inputs = evaluators.Inputs(query_sets=queries, database=database,
                             heads=linear.HeadLogits(model, params, batch_stats, mesh),
                             search=_search(ev, mesh), num_classes=spec.num_classes)
  bodies = evaluators.collect(evaluators.run(todo, inputs), spec.eval_sizes)
  all_results = {}
  for name, split, _ in query_sets:
    results = {
        "model": spec.signature, "checkpoint_step": step, "dataset": name, "split": split,
        "multi_label": bool(queries[name].labels.ndim == 2),
        "num_unlabelled_excluded": unlabelled[name],
        "database_split": ev.database_split if database is not None else None,
        "num_queries": int(len(queries[name].labels)),
        "num_database": int(len(database.labels)) if database is not None else 0,
        "flip_tta": bool(ev.flip_tta), "trained_sizes": list(spec.head_sizes),
        "class_subset": None if class_subsets.class_indices(name) is None else 200,
        "adaptive_retrieval": [], "adaptive_classification": [],
        **bodies.get(name, {"sizes": {str(m): {} for m in spec.eval_sizes}}),
    }
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
  if dtype not in EXPORT_DTYPES:
    raise ConfigError(f"--export_dtype={dtype!r}; allowed: {sorted(EXPORT_DTYPES)}")
  devices = list(devices) if devices is not None else jax.devices()
  spec = validation.validate(config, len(devices), jax.process_count())
  d = spec.feature_dim
  if size is not None and not 1 <= size <= d:
    raise ConfigError(f"--export_size={size} is outside [1, {d}] (the feature dim)")
  if spec.objective != "classify":
    return _export_retrieval_pairs(config, spec, workdir, out, size or d, EXPORT_DTYPES[dtype],
                                   checkpoint_step, devices)
  source = pipeline.open_source(config.input)
  reader = pipeline.make_reader(config.input, source)
  mesh = sharding.make_mesh(config.mesh, devices)
  model, params, batch_stats, _ = state_lib.restore(config, spec, paths.path(workdir), mesh,
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


def _export_retrieval_pairs(config, spec, workdir, out, size, dtype, checkpoint_step, devices):
  """Text and image-text models: the first retrieval set's corpus as the database (documents,
  or a dual encoder's images; label = its index) and its queries (label = the index of their
  document / image), so embeddings-only mode measures retrieval (topk_hit@k = Recall@k with one
  relevant item; mAP@k) and adaptive retrieval across modalities on exported features."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model, params, batch_stats, _ = state_lib.restore(config, spec, paths.path(workdir), mesh,
                                                    checkpoint_step)
  embedder = inference.Embedder(config, spec, model, params, batch_stats, mesh)
  sets = ([s for s in image_text_eval.parse_sets(config.eval.image_text_sets)
           if s[0] == "retrieval"] + [s for s in text_eval.parse_sets(config.eval.text_sets)
                                      if s[0] == "retrieval"])
  if not sets:
    raise ConfigError("--export_embeddings of a text or image-text model exports a retrieval "
                      "set; config.eval.text_sets / image_text_sets has none")
  _, dataset, split = sets[0]
  if spec.model_name == models.DUAL:
    corpus, queries, owner = image_text_eval.read_images_and_captions(config.input, dataset,
                                                                      split)
  else:
    data = text_eval.read_split(config.input, dataset, split, ("query", "document"))
    corpus, queries, owner = data["document"], data["query"], np.arange(len(data["query"]))
  parts = {"database": (corpus, np.arange(len(corpus))), "queries": (queries, owner)}
  rows = {}
  for part, (inputs, labels) in parts.items():
    z = embedder.encode(inputs)[:, :size].astype(dtype)
    extract_lib.Features(z, np.asarray(labels, np.int64)).save(out, part)
    rows[f"{part}_X.npy"] = len(labels)
  return rows


def evaluate_embeddings(location: embeddings.Location | str, sizes: Sequence[int], out: str,
                        *, knn_ks: Sequence[int] = (1,), retrieval_ks: Sequence[int] = (10,),
                        query_block: int = 1024, database_block: int = 4096,
                        database_chunk_rows: int | None = None, adaptive=None,
                        devices=None) -> dict:
  """Neighbour metrics (and, with `adaptive`, adaptive retrieval) of saved features, no model:
  writes the reports to `out`. `location`: a folder or embeddings.locate(...); `adaptive`: the
  adaptive-retrieval fields of config.eval (shortlist_sizes, rerank_sizes, shortlist_k,
  funnels, shortlist_engines, hnsw_*) as a ConfigDict."""
  if isinstance(location, str):
    location = embeddings.locate(location)
  sizes = tuple(sizes)
  if len(set(sizes)) != len(sizes):
    raise ConfigError(f"--sizes={list(sizes)} has a duplicate")
  parts = embeddings.load(location, max_size=max(sizes) if sizes else None)
  database, queries = parts["database"], parts["queries"]
  d = database.z.shape[1]
  for m in sizes:
    if not 1 <= m <= d:
      raise ConfigError(f"size {m} is outside [1, {d}] (--sizes; d of the saved features)")
  sizes = tuple(sorted(sizes))
  todo = [evaluators.Neighbors(sizes, tuple(knn_ks), tuple(retrieval_ks))]
  if adaptive is not None:
    validation.validate_eval_adaptive(adaptive, d)
    x_dir = str(paths.path(location.files["database"][0]).parent)
    todo.append(evaluators.AdaptiveRetrieval.from_config(adaptive, d, retrieval_ks, x_dir))
  devices = list(devices) if devices is not None else jax.devices()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices)
  inputs = evaluators.Inputs(
      query_sets={"queries": queries}, database=database,
      search=exact_search(mesh, query_block, database_block, database_chunk_rows))
  body = evaluators.collect(evaluators.run(todo, inputs), sizes)
  results = {
      "model": None, "checkpoint_step": None, "dataset": location.name,
      "split": "queries", "database_split": "database",
      "num_queries": int(len(queries.labels)), "num_database": int(len(database.labels)),
      "flip_tta": False, "trained_sizes": list(sizes),
      "adaptive_retrieval": [], "adaptive_classification": [], **body["queries"],
  }
  report.write(out, results)
  return results


# --- text models -------------------------------------------------------------------------------

def text_evaluators(config, spec) -> list:
  """The evaluators of config.eval.text_sets (evaluation/text.py), in that order."""
  ev = config.eval
  out = []
  for kind, dataset, *splits in text_eval.parse_sets(ev.text_sets):
    if kind == "similarity":
      out.append(text_eval.Similarity(dataset, splits[0]))
    elif kind == "retrieval":
      out.append(text_eval.Retrieval(dataset, splits[0]))
    elif kind == "mlm":
      if spec.objective != "mlm":
        raise ConfigError(f"config.eval.text_sets has {kind}:{dataset}:{splits[0]} but the "
                          f"model has no MLM head (config.objective={spec.objective!r})")
      out.append(text_eval.MaskedLM(dataset, splits[0]))
    else:
      knn_ks = tuple(ev.knn_k) if ev.knn else ()
      retrieval_ks = tuple(ev.retrieval_k) if ev.knn else ()
      inner = [evaluators.Neighbors(spec.eval_sizes, knn_ks, retrieval_ks)]
      if ev.adaptive_retrieval:
        inner.append(evaluators.AdaptiveRetrieval.from_config(ev, spec.feature_dim,
                                                              retrieval_ks))
      out.append(text_eval.LabelledNeighbors(dataset, splits[0], splits[1], tuple(inner)))
  return out


def image_text_evaluators(config, spec) -> list:
  """The evaluators of config.eval.image_text_sets (evaluation/image_text.py), in order."""
  ev = config.eval
  out = []
  for kind, dataset, *splits in image_text_eval.parse_sets(ev.image_text_sets):
    if kind == "retrieval":
      out.append(image_text_eval.Retrieval(dataset, splits[0]))
    elif kind == "zeroshot":
      out.append(image_text_eval.ZeroShot(dataset, splits[0]))
    elif kind == "crossmodal":
      out.append(image_text_eval.CrossModal(
          dataset, splits[0], tuple(adaptive_retrieval.funnels_from_config(ev,
                                                                           spec.feature_dim))))
    else:
      knn_ks = tuple(ev.knn_k) if ev.knn else ()
      retrieval_ks = tuple(ev.retrieval_k) if ev.knn else ()
      out.append(image_text_eval.ImageNeighbors(
          dataset, splits[0], splits[1],
          (evaluators.Neighbors(spec.eval_sizes, knn_ks, retrieval_ks),)))
  return out


def text_metrics(config, spec, model, params, batch_stats, mesh, *, quantize: bool = True):
  """[(name, value)] of every text (and, dual encoders, image-text) evaluator on a model
  state (eval.py and the in-training evaluation of contrastive runs)."""
  embedder = inference.Embedder(config, spec, model, params, batch_stats, mesh)
  inputs = text_eval.TextInputs(embedder=embedder, config=config, sizes=spec.eval_sizes,
                                search=_search(config.eval, mesh),
                                quantize=tuple(config.eval.quantize) if quantize else ())
  todo = text_evaluators(config, spec)
  if spec.model_name == models.DUAL:
    todo += image_text_evaluators(config, spec)
  return list(evaluators.run(todo, inputs))



def evaluate_text_checkpoint(config, spec, workdir, *, checkpoint_step=None, devices=None
                             ) -> dict[str, dict]:
  """eval.py for text models: every text set's per-size metrics in
  <workdir>/eval/<dataset>/results.json (+ CSV and plot)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model, params, batch_stats, step = state_lib.restore(config, spec, workdir, mesh,
                                                       checkpoint_step)
  pairs = text_metrics(config, spec, model, params, batch_stats, mesh)
  bodies = evaluators.collect(iter(pairs), spec.eval_sizes)
  all_results = {}
  for name, body in bodies.items():
    body["sizes"] = {m: metrics for m, metrics in body["sizes"].items() if metrics}
    computed = {key for metrics in body["sizes"].values() for key in metrics}
    # The quantised kinds this set was evaluated in (text similarity and retrieval sets).
    kinds = [kind for kind in config.eval.quantize
             if any(key.endswith(f"_{kind}") for key in computed)]
    results = {"model": spec.signature, "checkpoint_step": step, "dataset": name,
               "objective": spec.objective, "trained_sizes": list(spec.head_sizes),
               "quantize": kinds, "adaptive_retrieval": [],
               "adaptive_classification": [], **body}
    report.write(paths.join(workdir, "eval", name), results)
    all_results[name] = results
  return all_results
