"""Text evaluation at every nesting size, on the evaluator contract (`run(inputs)` yields
`(<set>/<metric>@<m>, value)`).

config.eval.text_sets lists what to measure, each 'kind:dataset:split[:...]':
- `similarity:lee_similarity:test` - Spearman correlation between the cosine of the two texts'
  size-m embeddings and the human rating (`text_a`, `text_b`, `score`): `spearman@m`;
- `retrieval:wiki_passages:test` - each `query` retrieves its own `document` among all the
  split's documents: `ndcg@10@m`, `mrr@10@m`, `recall@{1,5,10}@m` (metrics.ranking_metrics);
- `neighbors:polarity_sentences:train:test` - labelled texts: the image evaluators' k-NN,
  mAP@k, precision/recall and (config.eval.adaptive_retrieval) adaptive retrieval, database =
  the first split, queries = the second;
- `mlm:wiki_passages:test` - masked-token accuracy per size (MLM models).
Similarity and retrieval are also reported with the corpus stored quantised (config.eval.quantize:
'int8', 'binary'; quantize.py, with float rescoring for retrieval), as `<metric>_<kind>@m`,
with `bytes_per_vector_<kind>@m`. Texts are read from the TFDS split by the configured reader
and embedded once at full size through inference.Embedder; every size slices them.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from mrl_jax import sharding
from mrl_jax.data import pipeline
from mrl_jax.data import text as text_lib
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import evaluators
from mrl_jax.evaluation import extract
from mrl_jax.evaluation import metrics
from mrl_jax.evaluation import quantize as quantize_lib

KINDS = {"similarity": 3, "retrieval": 3, "neighbors": 4, "mlm": 3}


def split_spec(item: str) -> list[str]:
  """'kind:dataset:split' -> its parts; the ':' of a split slice ('train[:100]') stays."""
  return re.split(r":(?![^\[]*\])", item)


def parse_sets(text_sets) -> list[tuple[str, ...]]:
  """config.eval.text_sets -> [(kind, dataset, split[, split])]; one-line errors."""
  if isinstance(text_sets, str):
    raise ConfigError(f"config.eval.text_sets={text_sets!r} is not a tuple; e.g. "
                      "('similarity:lee_similarity:test',)")
  out = []
  for item in text_sets:
    parts = tuple(split_spec(item))
    if parts[0] not in KINDS or len(parts) != KINDS[parts[0]]:
      raise ConfigError(f"config.eval.text_sets entry {item!r}; allowed: "
                        "similarity:<dataset>:<split>, retrieval:<dataset>:<split>, "
                        "neighbors:<dataset>:<database split>:<query split>, "
                        "mlm:<dataset>:<split>")
    out.append(parts)
  return out


class _Raw:
  """A 'preprocess' that hands the raw strings on (so both readers read a split in order)."""

  def __init__(self, keys):
    self.keys = tuple(keys)

  def __call__(self, records, positions, seed):
    del positions, seed
    out = {}
    for k in self.keys:
      out[k] = np.empty(len(records), object)  # one entry per record, whatever it holds
      for i, r in enumerate(records):
        out[k][i] = r[k]
    return out


def read_split(input_cfg, dataset: str, split: str, keys) -> dict[str, list]:
  """{key: values} of every example of a split, in dataset order (strings decoded)."""
  source = pipeline.open_source(input_cfg, dataset=dataset)
  features = source.builder().info.features
  missing = [k for k in keys if k not in features]
  if missing:
    raise ConfigError(f"dataset {dataset!r} has no feature {missing[0]!r} (config.eval."
                      f"text_sets); available: {sorted(features.keys())}")
  n = source.num_examples(split)
  reader = pipeline.make_reader(input_cfg, source)
  out = {k: [] for k in keys}
  batch = 256
  strings = {k for k in keys if isinstance(features[k], tfds.features.Text)}
  for b in reader.eval_batches(split, local_batch=batch, num_batches=-(-n // batch),
                               preprocess=_Raw(keys), process_index=0, process_count=1):
    keep = np.asarray(b["mask"]) > 0
    for k in keys:
      out[k] += [v.decode() if k in strings and isinstance(v, bytes) else v
                 for v in b[k][keep]]
  return {k: v[:n] for k, v in out.items()}


@dataclasses.dataclass
class TextInputs:
  """What the text evaluators read: an Embedder, the config (for readers), the sizes, and the
  extras the image evaluators need for labelled text (search, the MLM model state)."""
  embedder: object  # inference.Embedder
  config: object
  sizes: tuple[int, ...]
  search: object = None  # knn.ExactSearch
  quantize: tuple[str, ...] = ()


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Similarity:
  dataset: str
  split: str

  def run(self, inputs: TextInputs):
    data = read_split(inputs.config.input, self.dataset, self.split, ("text_a", "text_b", "score"))
    za, zb = inputs.embedder.encode(data["text_a"]), inputs.embedder.encode(data["text_b"])
    scores = np.asarray(data["score"], np.float64)
    for m in inputs.sizes:
      for kind in (None, *inputs.quantize):
        cos = quantize_lib.pair_cosines(za[:, :m], zb[:, :m], kind)
        suffix = f"_{kind}" if kind else ""
        yield f"{self.dataset}/spearman{suffix}@{m}", metrics.spearman(cos, scores)
        if kind:
          yield (f"{self.dataset}/bytes_per_vector{suffix}@{m}",
                 quantize_lib.bytes_per_vector(kind, m))


@dataclasses.dataclass
class Retrieval:
  dataset: str
  split: str
  recall_ks: tuple[int, ...] = (1, 5, 10)

  def run(self, inputs: TextInputs):
    data = read_split(inputs.config.input, self.dataset, self.split, ("query", "document"))
    zq, zd = inputs.embedder.encode(data["query"]), inputs.embedder.encode(data["document"])
    k = max(10, *self.recall_ks)
    own = np.arange(len(zq))[:, None]
    for m in inputs.sizes:
      for kind in (None, *inputs.quantize):
        if kind is None and inputs.search is not None:  # exact, blocked and sharded
          _, ids = inputs.search.search(zq, zd, m, min(k, len(zd)))
        else:
          ids = quantize_lib.search(zq[:, :m], zd[:, :m], k, kind)
        hit = ids == own
        ranks = np.where(hit.any(1), hit.argmax(1) + 1, np.inf)
        suffix = f"_{kind}" if kind else ""
        for name, value in metrics.ranking_metrics(ranks, self.recall_ks).items():
          yield f"{self.dataset}/{name}{suffix}@{m}", value
        if kind:
          yield (f"{self.dataset}/bytes_per_vector{suffix}@{m}",
                 quantize_lib.bytes_per_vector(kind, m))


@dataclasses.dataclass
class LabelledNeighbors:
  """The image evaluators (k-NN, retrieval metrics, adaptive retrieval) on labelled texts."""
  dataset: str
  database_split: str
  query_split: str
  evaluators: tuple  # evaluators.Neighbors / AdaptiveRetrieval

  def run(self, inputs: TextInputs):
    source = pipeline.open_source(inputs.config.input, dataset=self.dataset)
    if not source.label_key:
      raise ConfigError(f"dataset {self.dataset!r} has no label (config.eval.text_sets "
                        "neighbors:...); it needs a ClassLabel feature")
    key = source.text_keys[0]
    parts = {}
    for name, split in (("database", self.database_split), ("queries", self.query_split)):
      data = read_split(inputs.config.input, self.dataset, split, (key, source.label_key))
      parts[name] = extract.Features(inputs.embedder.encode(data[key]),
                                     np.asarray(data[source.label_key], np.int64))
    sub = evaluators.Inputs(query_sets={self.dataset: parts["queries"]},
                            database=parts["database"], search=inputs.search,
                            num_classes=source.num_classes)
    for evaluator in self.evaluators:
      yield from evaluator.run(sub)


@dataclasses.dataclass
class MaskedLM:
  """Masked-token accuracy of an MLM model per size on a text split (fixed masks)."""
  dataset: str
  split: str

  def run(self, inputs: TextInputs):
    e = inputs.embedder
    source = pipeline.open_source(inputs.config.input, dataset=self.dataset)
    reader = pipeline.make_reader(inputs.config.input, source)
    for name, value in mlm_accuracy(inputs.config, e.model, e.params, e.batch_stats, source,
                                    reader, self.split, e.mesh).items():
      yield f"{self.dataset}/{name}", value


@functools.cache
def _mlm_sums_fn(model):
  """jit: (params, batch_stats, batch) -> masked-weighted sums of hits and CE at every eval
  size (trained or not: the head is tied)."""

  @jax.jit
  def sums(params, batch_stats, batch):
    _, logits = model.module(params, batch_stats)(batch, sizes=model.spec.eval_sizes)
    weights = batch["masked_weights"] * batch["mask"][:, None]
    out = {"count": weights.sum()}
    for m, l in logits.items():
      logp = jax.nn.log_softmax(l.astype(jnp.float32))
      target = jnp.take_along_axis(logp, batch["masked_ids"][..., None], -1)[..., 0]
      out[f"mlm_acc@{m}"] = ((jnp.argmax(l, -1) == batch["masked_ids"]) * weights).sum()
      out[f"mlm_loss@{m}"] = (-target * weights).sum()
    return out

  return sums


def mlm_accuracy(config, model, params, batch_stats, source, reader, split, mesh
                 ) -> dict[str, float]:
  """{mlm_acc@m, mlm_loss@m} over `split` (eval mode, fixed masks), summed over processes."""
  batch_size = config.input.get("eval_batch_size") or config.input.batch_size
  local_batch = batch_size // jax.process_count()
  num_batches = pipeline.num_eval_batches(source.num_examples(split), local_batch,
                                          jax.process_count())
  pp = text_lib.from_config(config, task="mlm", keys=config.text.features[:1], train=False)
  batches = pipeline.global_batches(
      reader.eval_batches(split, local_batch=local_batch, num_batches=num_batches,
                          preprocess=pp, process_index=jax.process_index(),
                          process_count=jax.process_count()),
      sharding.batch_sharding(mesh), config.input.prefetch)

  sums = _mlm_sums_fn(model)
  total = None
  with jax.set_mesh(mesh):
    for batch in batches:
      part = sums(params, batch_stats, batch)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
  total = {k: float(np.asarray(v)) for k, v in jax.device_get(total).items()}
  count = max(total.pop("count"), 1.0)
  return {k: v / count for k, v in total.items()}
