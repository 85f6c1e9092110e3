"""The evaluators: one contract for everything eval.py and the training loop measure.

Features are extracted once per evaluation (`Inputs`: the database split and every query set,
already without unlabelled multi-label queries) and every evaluator reads them. Each evaluator
is built from config.eval and the run's ModelSpec (`from_config`), and its `run(inputs)` yields
`(metric_name, value)` pairs (big_vision's evaluator contract), named
`<query set>/<metric>@<m>` for per-size metrics (`sklearn_digits/linear_top1@8`,
`test/map@10@64`) and `<query set>/<key>` otherwise (`.../adaptive_retrieval`). `collect` turns
them into one results.json body per query set. The training loop runs the same linear evaluator
on its eval split (docs/training_and_evaluation.md); eval.py runs them all.
"""

import dataclasses
from collections.abc import Iterator, Sequence

from absl import logging

from mrl_jax import models
from mrl_jax.evaluation import adaptive_classification
from mrl_jax.evaluation import adaptive_retrieval
from mrl_jax.evaluation import ann
from mrl_jax.evaluation import baselines
from mrl_jax.evaluation import class_subsets
from mrl_jax.evaluation import extract
from mrl_jax.evaluation import fewshot
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import linear
from mrl_jax.evaluation import neighbors


@dataclasses.dataclass
class Inputs:
  """What every evaluator reads: features extracted once, and how to read the heads."""
  query_sets: dict[str, extract.Features]  # {name: features}; the first is the main one
  database: extract.Features | None = None  # None: no neighbour metrics
  heads: linear.HeadLogits | None = None  # None: features without a model (embeddings mode)
  search: knn.ExactSearch | None = None
  num_classes: int | None = None

  @property
  def main(self) -> str:
    return next(iter(self.query_sets))

  def multi_label(self, name: str) -> bool:
    return self.query_sets[name].labels.ndim == 2 or (
        self.database is not None and self.database.labels.ndim == 2)


class Linear:
  """Each head's top-1/top-5 (or prec@1 and class-mean AP) on every query set; ImageNet-A/-R
  logits restricted to their 200 classes; flip TTA when the features carry it."""

  def run(self, inputs: Inputs) -> Iterator[tuple[str, object]]:
    for name, queries in inputs.query_sets.items():
      mask = class_subsets.class_mask(name, inputs.num_classes) if inputs.num_classes else None
      by_size = linear.metrics_by_size(inputs.heads, queries.z, queries.labels,
                                       queries.z_flipped, mask)
      for m, values in by_size.items():
        for key, value in values.items():
          yield f"{name}/{key}@{m}", value


@dataclasses.dataclass
class Neighbors:
  """k-NN accuracy and retrieval metrics at every size; the database is prepared once per size
  and searched by every query set."""
  sizes: tuple[int, ...]
  knn_ks: tuple[int, ...]
  retrieval_ks: tuple[int, ...]

  def run(self, inputs: Inputs) -> Iterator[tuple[str, object]]:
    by_set = neighbors.metrics_by_size(
        inputs.database.z, inputs.database.labels,
        {n: (q.z, q.labels) for n, q in inputs.query_sets.items()}, self.sizes,
        knn_ks=self.knn_ks, retrieval_ks=self.retrieval_ks, search=inputs.search,
        num_classes=inputs.num_classes)
    for name, by_size in by_set.items():
      for m, values in by_size.items():
        for key, value in values.items():
          yield f"{name}/{key}@{m}", value


@dataclasses.dataclass
class AdaptiveRetrieval:
  """Shortlist at Ds, rerank at Dr (and funnels) on the main query set (paper Sec. 5.2)."""
  funnels: list
  retrieval_ks: tuple[int, ...]
  engines: tuple[str, ...] = ("exact",)
  hnsw: ann.HnswParams = ann.HnswParams()
  cache_dir: str | None = None  # where HNSW indexes are cached (None: not cached)

  def run(self, inputs: Inputs) -> Iterator[tuple[str, object]]:
    queries = inputs.query_sets[inputs.main]
    yield f"{inputs.main}/adaptive_retrieval", adaptive_retrieval.evaluate(
        self.funnels, inputs.database.z, inputs.database.labels, queries.z, queries.labels,
        search=inputs.search, num_classes=inputs.num_classes,
        retrieval_ks=[k for k in self.retrieval_ks if k <= 10] or [10], engines=self.engines,
        hnsw=self.hnsw, cache_dir=self.cache_dir)

  @classmethod
  def from_config(cls, ev, feature_dim: int, retrieval_ks, cache_dir=None):
    return cls(adaptive_retrieval.funnels_from_config(ev, feature_dim), tuple(retrieval_ks),
               tuple(ev.get("shortlist_engines", ("exact",))), ann.HnswParams.from_config(ev),
               cache_dir)


@dataclasses.dataclass
class AdaptiveClassification:
  """Cascades of the heads with fitted thresholds, and the oracle (paper Sec. 5.1)."""
  sizes: tuple[int, ...]
  holdout: float
  seeds: int
  caps: tuple[int, ...]

  def run(self, inputs: Inputs) -> Iterator[tuple[str, object]]:
    queries = inputs.query_sets[inputs.main]
    conf, pred = linear.predictions(inputs.heads, queries.z, queries.z_flipped)
    yield f"{inputs.main}/adaptive_classification", adaptive_classification.evaluate(
        conf, pred, queries.labels, list(self.sizes), holdout=self.holdout, seeds=self.seeds,
        caps=self.caps)


@dataclasses.dataclass
class Baselines:
  """SVD / PCA / random representations of this model's features at every nesting size."""
  kinds: tuple[str, ...]
  sizes: tuple[int, ...]
  knn_ks: tuple[int, ...]
  retrieval_ks: tuple[int, ...]
  probe_steps: int
  probe_l2: float

  def run(self, inputs: Inputs) -> Iterator[tuple[str, object]]:
    yield f"{inputs.main}/baselines", baselines.evaluate(
        self.kinds, inputs.database, inputs.query_sets[inputs.main], sizes=self.sizes,
        full_classifier=inputs.heads.full_classifier() if inputs.heads else None,
        search=inputs.search, knn_ks=self.knn_ks, retrieval_ks=self.retrieval_ks,
        num_classes=inputs.num_classes, probe_steps=self.probe_steps, probe_l2=self.probe_l2)


@dataclasses.dataclass
class FewShot:
  """n-shot nearest-class-mean accuracy per size (paper Sec. 4.2.2)."""
  sizes: tuple[int, ...]
  shots: tuple[int, ...]
  draws: int

  def run(self, inputs: Inputs) -> Iterator[tuple[str, object]]:
    database, queries = inputs.database, inputs.query_sets[inputs.main]
    yield f"{inputs.main}/fewshot", fewshot.evaluate(
        database.z, database.labels, queries.z, queries.labels, self.sizes, self.shots,
        draws=self.draws, num_classes=inputs.num_classes)


SINGLE_LABEL_ONLY = (AdaptiveClassification, Baselines, FewShot)


def from_config(ev, spec: models.ModelSpec, *, heads: bool = True,
                cache_dir: str | None = None) -> list:
  """The evaluators config.eval enables, in results order; `heads=False` (features without a
  model) leaves out those that read the heads; `cache_dir` keeps HNSW indexes."""
  knn_ks = tuple(ev.knn_k) if ev.knn else ()
  retrieval_ks = tuple(ev.retrieval_k) if ev.knn else ()
  out = []
  if ev.linear and heads:
    out.append(Linear())
  if knn_ks or retrieval_ks:
    out.append(Neighbors(spec.eval_sizes, knn_ks, retrieval_ks))
    if ev.adaptive_retrieval:
      out.append(AdaptiveRetrieval.from_config(ev, spec.feature_dim, retrieval_ks, cache_dir))
    if ev.baselines:  # at every nesting size, also for an FF-d (standard) model
      out.append(Baselines(tuple(ev.baselines), spec.nesting, knn_ks, retrieval_ks,
                           ev.probe_steps, ev.probe_l2))
    if ev.fewshot_shots:
      out.append(FewShot(spec.eval_sizes, tuple(ev.fewshot_shots), ev.fewshot_draws))
  if ev.adaptive_classification and heads and len(spec.head_sizes) > 1 and (
      knn_ks or retrieval_ks):
    out.append(AdaptiveClassification(spec.head_sizes, ev.ac_holdout, ev.ac_seeds,
                                      tuple(ev.ac_caps)))
  return out


def run(evaluators: Sequence, inputs: Inputs) -> Iterator[tuple[str, object]]:
  """Every evaluator's (metric_name, value) pairs; single-label evaluations are skipped, with a
  warning, on multi-label data."""
  for evaluator in evaluators:
    if isinstance(evaluator, SINGLE_LABEL_ONLY) and inputs.multi_label(inputs.main):
      logging.warning("multi-label data: %s skipped (a single-label evaluation)",
                      type(evaluator).__name__)
      continue
    yield from evaluator.run(inputs)


def collect(pairs: Iterator[tuple[str, object]], sizes: Sequence[int]) -> dict[str, dict]:
  """{query set: {"sizes": {str(m): {metric: value}}, key: value, ...}} from run()'s pairs."""
  out = {}
  for name, value in pairs:
    query_set, metric = name.split("/", 1)
    body = out.setdefault(query_set, {"sizes": {str(m): {} for m in sizes}})
    if "@" in metric and metric.rsplit("@", 1)[1].isdigit():
      key, m = metric.rsplit("@", 1)
      body["sizes"].setdefault(m, {})[key] = value
    else:
      body[metric] = value
  return out
