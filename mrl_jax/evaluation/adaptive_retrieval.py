"""Adaptive retrieval (paper Sec. 5.2): shortlist at a small size Ds, rerank at larger sizes.

As the official `retrieval/` code: exact search of the top-K at Ds (truncated, L2-normalised),
then the first K of that order are re-sorted by cosine similarity at Dr (truncated and
L2-normalised again). A funnel chains stages (Dr_1, K_1), (Dr_2, K_2), ...: each re-sorts the
first K_j of the previous order; two-stage retrieval is the one-stage funnel. Metrics are the
neighbour metrics of metrics.py at k <= the last K_j.

Cost per query, in millions of multiply-adds (the paper's MFLOPs; it reproduces the official
CSVs exactly, e.g. 1,281,167 x 16 + 200 x 2048 = 20.91 for Ds=16 -> Dr=2048 on ImageNet-1K):
MFLOPs = (N_db * Ds + sum_j K_j * Dr_j) / 1e6. Wall-clock is measured too, next to exact search
at the largest size, since on accelerators exact search is bound by the top-k selection rather
than by FLOPs (the official `retrieval/faiss_nn.ipynb`: on a GPU, 8-d brute-force search is
only ~3.6x faster than 2048-d).
"""

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import ann
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class Funnel:
  """Shortlist the top shortlist_k at shortlist_size, then re-sort by each (size, k) stage."""
  shortlist_size: int
  stages: tuple[tuple[int, int], ...]  # (rerank size Dr_j, number of candidates K_j)

  @property
  def shortlist_k(self) -> int:
    return self.stages[0][1]

  def mflops(self, num_database: int) -> float:
    return (num_database * self.shortlist_size + sum(k * d for d, k in self.stages)) / 1e6

  def name(self) -> str:
    if len(self.stages) == 1:
      (dr, k), = self.stages
      return f"{self.shortlist_size}->{dr} (K={k})"
    return (f"funnel {self.shortlist_size}->" + "->".join(str(d) for d, _ in self.stages)
            + " (K=" + ",".join(str(k) for _, k in self.stages) + ")")


def funnels_from_config(ev, feature_dim: int) -> list[Funnel]:
  """Every (Ds, Dr, K) of config.eval's shortlist_sizes x rerank_sizes x shortlist_k, then
  config.eval.funnels ((Ds, (Dr1, Dr2, ...), (K1, K2, ...)), ...); one-line errors."""
  dr_list = tuple(ev.rerank_sizes) or (feature_dim,)
  out = [Funnel(ds, ((dr, k),)) for ds in ev.shortlist_sizes for dr in dr_list
         for k in ev.shortlist_k]
  for entry in ev.funnels:
    try:
      ds, drs, ks = entry
      stages = tuple(zip(tuple(drs), tuple(ks), strict=True))
    except (TypeError, ValueError):
      raise ConfigError(f"config.eval.funnels entry {entry!r} is not (Ds, (Dr1, Dr2, ...), "
                        "(K1, K2, ...)) with one K per stage") from None
    if not stages or any(b > a for (_, a), (_, b) in zip(stages, stages[1:])):
      raise ConfigError(f"config.eval.funnels entry {entry!r}: one K per stage, non-increasing")
    out.append(Funnel(ds, stages))
  for f in out:
    for size in (f.shortlist_size, *(d for d, _ in f.stages)):
      if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= feature_dim:
        raise ConfigError(f"adaptive retrieval size {size!r} is outside [1, {feature_dim}] "
                          "(config.eval.shortlist_sizes / rerank_sizes / funnels)")
    for _, k in f.stages:
      if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"adaptive retrieval K={k!r}; allowed: integers >= 1 "
                          "(config.eval.shortlist_k / funnels)")
  return out


@functools.cache
def _rerank_fn(size: int, keep: int):
  """jit: (queries [qb, d], candidate rows [qb, K, d], candidate ids [qb, K]) -> the ids of the
  `keep` most similar at `size`, most similar first (top_k: ~3x cheaper than a full sort on CPU;
  ties keep the shortlist order, as a stable sort). Rows read from a host array."""

  def cosine(q, x):
    x = x[..., :size].astype(jnp.float32)
    return knn.dot_rows(q, x) / jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-12)

  @jax.jit
  def rerank(queries, rows, ids):
    scores = knn.score_groups(cosine, knn.normalize_prefix(queries, size), rows)
    _, order = jax.lax.top_k(scores, keep)
    return jnp.take_along_axis(ids, order, axis=-1)

  return rerank


@functools.cache
def _device_rerank_fn(size: int, keep: int):
  """jit: (queries [qb, d], candidate ids [qb, K], prepared rows, inverse norms) -> as
  `_rerank_fn`, gathering the candidates' rows on the device from a database prepared at
  `size` (its stored norms: no row is normalised again)."""

  @jax.jit
  def rerank(queries, ids, rows, inv_norms):
    q = knn.normalize_prefix(queries, size)
    scores = knn.score_rows(q, ids, rows, inv_norms)
    _, order = jax.lax.top_k(scores, keep)
    return jnp.take_along_axis(ids, order, axis=-1)

  return rerank


def rerank(queries: np.ndarray, database: np.ndarray, candidates: np.ndarray, stages,
           block: int = 256, prepared=None) -> np.ndarray:
  """Applies the funnel stages to candidate lists [Q, K0]; returns [Q, K_last] database ids.

  Stage j re-sorts the first K_j and keeps only the K_{j+1} the next stage reads. `prepared`
  (size -> knn.PreparedDatabase on one device, in one chunk; or None): gather the candidates'
  rows on the device from the database prepared at the stage's size; otherwise from
  `database` on the host (a memory map reads only those rows)."""
  order = candidates
  for j, (size, k) in enumerate(stages):
    keep = stages[j + 1][1] if j + 1 < len(stages) else k
    top = order[:, :k]
    on_device = prepared(size) if prepared is not None else None
    out = np.empty((len(top), keep), top.dtype)
    for q0 in range(0, len(top), block):
      ids, q = top[q0:q0 + block], np.asarray(queries[q0:q0 + block, :size], np.float32)
      n = len(ids)
      if n < block:  # pad the last block: one compiled shape per stage
        ids, q = np.pad(ids, [(0, block - n), (0, 0)]), np.pad(q, [(0, block - n), (0, 0)])
      if on_device is not None:
        chunk, = on_device.chunks
        result = _device_rerank_fn(size, keep)(q, ids.astype(np.int32), chunk.rows,
                                               chunk.inv_norms)
      else:
        result = _rerank_fn(size, keep)(q, database[ids, :size], ids)
      out[q0:q0 + n] = np.asarray(result)[:n]
    order = out
  return order


SHORTLIST_ENGINES = ("exact", "hnsw")


def check_engines(engines: Sequence[str]) -> None:
  for engine in engines:
    if engine not in SHORTLIST_ENGINES:
      raise ConfigError(f"shortlist engine {engine!r} (config.eval.shortlist_engines); "
                        f"allowed: {list(SHORTLIST_ENGINES)}")


def evaluate(funnels: Sequence[Funnel], database_z, database_y, queries_z, queries_y, *,
             search: knn.ExactSearch, num_classes: int | None = None,
             retrieval_ks: Sequence[int] = (10,), engines: Sequence[str] = ("exact",),
             hnsw: ann.HnswParams = ann.HnswParams(), cache_dir: str | None = None
             ) -> list[dict]:
  """One row per funnel and shortlist engine, plus one exact single-shot row per size used,
  with metrics, MFLOPs, wall-clock (shortlist + reranking) and the shortlist's recall of the
  exact shortlist.

  With `search.chunk_rows` below the database size the database (a memory-mapped array is
  fine) is streamed through the search chunk by chunk, and the rerank reads only the
  candidates' rows; the timed pass then also includes compilation (a warm-up pass would read
  the whole database once more)."""
  check_engines(engines)
  counts = metrics_lib.relevant_counts(database_y, queries_y, num_classes)
  n_db, n_q = len(database_y), len(queries_y)
  n_blocks = -(-n_q // search.query_block)
  streamed = bool(search.chunk_rows) and search.chunk_rows < n_db
  prepared, exact = {}, {}

  def prepared_at(size):
    if size not in prepared:
      prepared[size] = search.prepare(database_z, size)
    return prepared[size]

  def timed_search(size, k):
    """(ids, seconds) of the exact search at (size, k), run once and reused."""
    if (size, k) not in exact:
      if streamed:
        db = database_z
      else:  # compile outside the timer: queries go in padded blocks of one shape
        db = prepared_at(size)
        search.search(queries_z[:1], db, size, k)
      t0 = time.perf_counter()
      _, ids = search.search(queries_z, db, size, k)
      exact[size, k] = ids, time.perf_counter() - t0
    return exact[size, k]

  def hnsw_shortlist(size, k):
    index = ann.build(database_z, size, hnsw, cache_dir)
    ann.search(index, queries_z[:1], size, k, hnsw)  # warm-up
    t0 = time.perf_counter()
    ids = ann.search(index, queries_z, size, k, hnsw)
    return ids, time.perf_counter() - t0

  rows = []
  single_sizes = sorted({d for f in funnels for d in (f.shortlist_size, f.stages[-1][0])})
  max_k = max(retrieval_ks)
  for size in single_sizes:  # exact search at one size: the reference points
    ids, seconds = timed_search(size, max_k)
    rows.append(_row(f"{size} (single-shot)", "single_shot", size, (), n_db * size / 1e6,
                     seconds, n_blocks, database_y[ids], queries_y, counts, retrieval_ks))
    rows[-1].update(engine="exact", shortlist_recall=1.0)
  for engine in engines:
    for f in funnels:
      key = f.shortlist_size, f.shortlist_k
      if engine == "exact":
        ids, seconds = timed_search(*key)
      else:
        ids, seconds = hnsw_shortlist(*key)
      # One device holding the whole database: gather there; else from the host array.
      on_device = None if streamed or search.num_shards > 1 else prepared_at
      # Compiles, and prepares each stage's database, outside the timer (as the shortlist's).
      rerank(queries_z[:1], database_z, ids[:1], f.stages, prepared=on_device)
      t0 = time.perf_counter()
      final = rerank(queries_z, database_z, ids, f.stages, prepared=on_device)
      seconds += time.perf_counter() - t0
      ks = [k for k in retrieval_ks if k <= f.stages[-1][1]]
      name = f.name() if engine == "exact" else f"{f.name()} [hnsw]"
      rows.append(_row(name, "funnel" if len(f.stages) > 1 else "adaptive",
                       f.shortlist_size, f.stages, f.mflops(n_db), seconds, n_blocks,
                       database_y[final], queries_y, counts, ks))
      rows[-1].update(engine=engine, shortlist_recall=ann.recall(ids, timed_search(*key)[0]))
  exact = {r["shortlist_size"]: r for r in rows if r["kind"] == "single_shot"}
  largest = max(exact)
  for r in rows:  # speed-up against exact search at the largest size, both ways
    r["mflops_speedup_vs_exact"] = exact[largest]["mflops"] / r["mflops"]
    r["wallclock_speedup_vs_exact"] = exact[largest]["seconds"] / r["seconds"]
  return rows


def _row(name, kind, shortlist_size, stages, mflops, seconds, n_blocks, neighbor_labels,
         query_labels, counts, ks) -> dict:
  metric = metrics_lib.retrieval_metrics(neighbor_labels, query_labels, counts, ks)
  return {"name": name, "kind": kind, "shortlist_size": shortlist_size,
          "stages": [list(s) for s in stages], "mflops": mflops, "seconds": seconds,
          "ms_per_query_block": 1e3 * seconds / n_blocks,
          "top1": float(np.mean(metrics_lib.relevance(neighbor_labels[:, :1], query_labels))),
          **metric}
