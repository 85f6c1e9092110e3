"""Exact nearest-neighbour search on L2-normalised prefixes, blocked and sharded over devices.

As the official MRL evaluation: truncate to the first m dimensions, L2-normalise database and
queries, and rank by L2 distance, which on unit vectors is ranking by cosine similarity (we
return the cosine, higher = nearer). Database rows stay on device as stored (float32, bfloat16
or float16) with their inverse norms, so no normalised copy of the database is ever written.

Selecting the top k out of N scores costs far more than computing them when m is small (an
8-d score is 8 multiply-adds; a top-k pass over it is a data-dependent sort). So the search
computes every score once, in a matmul, but only keeps maxima, and selects on those:
1. each device scans its rows in blocks of `block` rows: scores of a query block against a
   block ([query_block, block], a matmul at full float32 precision), reduced on the fly to the
   maximum of every sub-block of `sub_block` consecutive rows; nothing else is kept;
2. the top k of a query's scores lie in the k sub-blocks with the largest maxima (any other
   row is beaten by k sub-block maxima), and those k sub-blocks lie in the k super-blocks
   (`group` sub-blocks) with the largest maxima; two small top-k's on maxima pick them;
3. the k x sub_block candidate rows are gathered and scored again (one fixed formula per
   pair, below) and the top k of those is the device's answer; the devices' answers are
   merged, queries go through in blocks of `query_block`, and a database larger than device
   memory streams from host in chunks of `chunk_rows` rows, merged the same way.
Order and ties: results are sorted by score, equal scores by lower database index, as a stable
full sort would (candidates are kept in index order and `lax.top_k` is stable). Every pair in
a search is scored by one formula whatever its place (the float32 sum over the prefix of
q_i x_i, times 1/|x|: `score_rows`), so duplicate rows score bitwise-equally and keep index
order. Pruning uses the matmul's scores, which round differently in the last bits, and a
different device count may round a reduction differently: two distinct rows whose scores
agree to ~1e-7 may swap at the k-th place, as they may between any two float
implementations (faiss, numpy).

On a CPU the search costs 1.5-2.5x the matmul alone at m <= 64, is 3.5-5x faster than
faiss's flat index there and about as fast at m = 2048 (benchmarks/knn.py, BENCHMARKS.md).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mrl_jax import sharding as sharding_lib


def normalize_prefix(x: jax.Array, size: int) -> jax.Array:
  """x[:, :size] / ||x[:, :size]||, in float32 (zero vectors stay zero)."""
  x = x[:, :size].astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


def _topk(scores, index, k):
  """Top-k of candidate lists; on equal scores the earlier candidate wins (top_k is stable)."""
  top, pos = jax.lax.top_k(scores, k)
  return top, jnp.take_along_axis(index, pos, axis=-1)


def _merge(scores_a, index_a, scores_b, index_b, k):
  """Top-k of two candidate lists; on equal scores `a` (the lower indices) wins."""
  return _topk(jnp.concatenate([scores_a, scores_b], axis=-1),
               jnp.concatenate([index_a, index_b], axis=-1), k)


def _select(values: jax.Array, k: int) -> jax.Array:
  """Positions of the k largest values per row, ascending (so later ties keep index order)."""
  _, positions = jax.lax.top_k(values, k)
  return jnp.sort(positions, axis=-1)


def _expand(ids: jax.Array, width: int) -> jax.Array:
  """[qb, n] group ids -> [qb, n * width] ids of their members, ascending if ids are."""
  return (ids[:, :, None] * width + jnp.arange(width, dtype=ids.dtype)).reshape(ids.shape[0], -1)


def _divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


# Elements of the gathered [queries, C, m] block scored at once: 1 MiB of float32, in cache.
_SCORE_ELEMENTS = 1 << 18


def score_groups(fn, queries, *per_query):
  """fn(q [g, m], *args [g, ...]) -> [g, C] over groups of g queries whose [g, C, m] block
  stays in cache (a [b, C, m] product at once is ~3x slower at m = 2048); g depends on C and m
  only, so a row's score does not depend on how many queries there are."""
  b, size = queries.shape
  num = per_query[0].shape[1]
  # At least 4: XLA CPU compiles a group of 1 (a unit dimension) ~8x slower.
  g = max(4, 1 << max(0, (_SCORE_ELEMENTS // max(1, num * size)).bit_length() - 1))
  pad = -b % g
  pad_rows = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x
  groups = [pad_rows(x).reshape(-1, g, *x.shape[1:]) for x in (queries, *per_query)]
  return jax.lax.map(lambda args: fn(*args), tuple(groups)).reshape(-1, num)[:b]


def dot_rows(q, x):
  """[g, C] sum_i x_i q_i in float32 for q [g, m], x [g, C, m]: elementwise products summed
  along each row in one fixed order (tree_sum) round the same wherever the row sits (a
  matrix-vector product does not), so duplicate rows score bitwise-equally."""
  return tree_sum(x.astype(jnp.float32) * q[:, None, :])


def tree_sum(x: jax.Array) -> jax.Array:
  """Sum over the last axis in a fixed pairwise order: zero-padded to a power of two, then
  halved by elementwise adds, whose rounding cannot depend on the other dimensions. XLA's
  reduce may vectorise a short axis differently for differently shaped operands: duplicate
  rows in two database chunks (candidate lists of different lengths) scored one ulp apart on
  an AMD EPYC host, and lost their index order."""
  width = 1 << max(0, x.shape[-1] - 1).bit_length()
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  return x[..., 0]


def score_rows(queries, positions, rows, inv_norms):
  """[b, C] cosine of each normalised query [b, m] with the rows at `positions` [b, C],
  gathering only those rows: the one scoring formula of the search's rescoring and of
  adaptive retrieval's rerank."""
  return score_groups(lambda q, pos: dot_rows(q, rows[pos]) * inv_norms[pos],
                      queries, positions)


class ExactSearch:
  """Blocked, sharded exact top-k by cosine similarity of L2-normalised prefixes."""

  def __init__(self, mesh: jax.sharding.Mesh, *, query_block: int = 1024,
               database_block: int = 4096, chunk_rows: int | None = None,
               sub_block: int = 32, group: int = 16):
    self.mesh = mesh
    self.query_block = query_block
    self.database_block = database_block
    self.chunk_rows = chunk_rows
    self.sub_block = sub_block
    self.group = group
    self.num_shards = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
    self.rows_sharding = NamedSharding(mesh, P(sharding_lib.BATCH_AXES, None))
    self.replicated = NamedSharding(mesh, P())

  def block_rows(self, num_database: int) -> int:
    """Rows per block: a function of the database size only (not of devices or chunks), a
    multiple of the sub-block once it exceeds one."""
    block = max(1, min(self.database_block, 1 << max(num_database - 1, 0).bit_length()))
    if block > self.sub_block:
      block = -(-block // self.sub_block) * self.sub_block
    return block

  def _per_device(self, rows: int, block: int) -> int:
    """Rows each device holds: its share, padded to whole blocks (padding scores -inf)."""
    return -(-math.ceil(rows / self.num_shards) // block) * block

  def _candidates(self, queries, rows, inv_norms, limit, block, k):
    """[qb, k * sub] ascending positions of the device's rows that hold its top k (steps 1-2
    of the module docstring); rows at positions >= limit are padding."""
    qb, size = queries.shape
    sub = self._sub_rows(block)
    per_block = block // sub  # sub-blocks per block
    group = _divisor_at_most(per_block, self.group)  # sub-blocks per super-block
    columns = jnp.arange(block)

    def block_maxima(_, j):
      start = j * block
      x = jax.lax.dynamic_slice_in_dim(rows, start, block).astype(jnp.float32)
      inv_norm = jax.lax.dynamic_slice_in_dim(inv_norms, start, block)
      scores = jnp.dot(queries, x.T, precision=jax.lax.Precision.HIGHEST) * inv_norm
      scores = jnp.where(start + columns < limit, scores, -jnp.inf)
      maxima = scores.reshape(qb, per_block, sub).max(axis=-1)
      return None, (maxima, maxima.reshape(qb, per_block // group, group).max(-1))

    # [blocks, qb, per_block] sub-block maxima, [blocks, qb, per_block / group] super-block's
    _, (maxima, super_maxima) = jax.lax.scan(
        block_maxima, None, jnp.arange(rows.shape[0] // block))
    num_sub = maxima.shape[0] * per_block  # > k (else the caller does not prune)
    if num_sub // group > k:  # the k best super-blocks hold the k best sub-blocks
      super_maxima = super_maxima.transpose(1, 0, 2).reshape(qb, -1)  # in index order
      ids = _expand(_select(super_maxima, k), group)
    else:
      ids = jnp.broadcast_to(jnp.arange(num_sub), (qb, num_sub))
    values = maxima[ids // per_block, jnp.arange(qb)[:, None], ids % per_block]
    best = jnp.take_along_axis(ids, _select(values, k), 1)
    return _expand(best, sub)

  def _sub_rows(self, block: int) -> int:
    return min(self.sub_block, block)

  @staticmethod
  def _rescore(queries, rows, inv_norms, positions, limit):
    """[qb, C] float32 scores of the rows at `positions` [qb, C] (score_rows: one formula for
    every pair whatever C or the layout); -inf at padding rows."""
    scores = score_rows(queries, positions, rows, inv_norms)
    return jnp.where(positions < limit, scores, -jnp.inf)

  @functools.cache
  def _chunk_topk_fn(self, block: int, per_device: int, k: int) -> Callable:
    """jit: (queries [qb, m], rows [D*per_device, m], inv_norms, offset, valid, running top-k)
    -> running top-k merged with this chunk's."""
    axes = sharding_lib.BATCH_AXES
    prune = k * self._sub_rows(block) < per_device  # else every row is a candidate

    def local(queries, rows, inv_norms, offset, valid):
      base = offset + jax.lax.axis_index(axes) * per_device  # index of the device's first row
      limit = offset + valid - base
      if prune:
        positions = self._candidates(queries, rows, inv_norms, limit, block, k)
      else:
        positions = jnp.broadcast_to(jnp.arange(per_device, dtype=jnp.int32),
                                     (queries.shape[0], per_device))
      scores = self._rescore(queries, rows, inv_norms, positions, limit)
      if scores.shape[1] < k:  # a device with fewer rows than k: pad (never chosen)
        pad = [(0, 0), (0, k - scores.shape[1])]
        scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
        positions = jnp.pad(positions, pad, constant_values=per_device)
      scores, positions = _topk(scores, positions, k)
      return scores[None], (base + positions)[None]

    search = jax.shard_map(local, mesh=self.mesh,
                           in_specs=(P(), P(axes, None), P(axes), P(), P()),
                           out_specs=(P(axes), P(axes)))

    @jax.jit
    def fn(queries, rows, inv_norms, offset, valid, running_scores, running_index):
      scores, index = search(queries, rows, inv_norms, offset, valid)  # [D, qb, k]
      qb = queries.shape[0]
      scores = scores.transpose(1, 0, 2).reshape(qb, -1)  # device order = index order
      index = index.transpose(1, 0, 2).reshape(qb, -1)
      scores, index = _topk(scores, index, k)
      return _merge(running_scores, running_index, scores, index, k)

    return fn

  @functools.cache
  def _normalize_fn(self, size: int, out_sharding) -> Callable:
    return jax.jit(lambda x: normalize_prefix(x, size), out_shardings=out_sharding)

  @functools.cache
  def _inv_norm_fn(self, block: int) -> Callable:
    """jit: rows -> 1 / |row|, a block at a time (a float32 copy of a whole float16 shard
    would triple its memory)."""
    def inv_norm(x):
      norm = jax.lax.map(lambda b: jnp.linalg.norm(b.astype(jnp.float32), axis=-1),
                         x.reshape(-1, block, x.shape[1])).reshape(-1)
      return 1.0 / jnp.maximum(norm, 1e-12)
    return jax.jit(inv_norm, out_shardings=NamedSharding(self.mesh, P(sharding_lib.BATCH_AXES)))

  def _put_rows(self, rows_np: np.ndarray, total_rows: int) -> jax.Array:
    """rows_np [valid, m] -> [total_rows, m] on the devices, split by rows, zeros after the
    valid rows; built one device share at a time (no host copy of the whole database)."""
    valid, size = rows_np.shape

    def part(index):
      start, stop, _ = index[0].indices(total_rows)
      if stop <= valid:  # a share of real rows: a view when the rows are contiguous
        return np.ascontiguousarray(rows_np[start:stop])
      out = np.zeros((stop - start, size), rows_np.dtype)
      if start < valid:
        out[:min(stop, valid) - start] = rows_np[start:min(stop, valid)]
      return out

    return jax.make_array_from_callback((total_rows, size), self.rows_sharding, part)

  def _chunks(self, database: np.ndarray, size: int):
    """(offset, rows) of the database in chunks of chunk_rows (one chunk if unset)."""
    n = database.shape[0]
    step = self.chunk_rows or n
    return ((c0, database[c0:c0 + step, :size]) for c0 in range(0, n, step))

  def prepare(self, database: np.ndarray, size: int) -> "PreparedDatabase":
    """Truncated, device-resident chunks of the database (and their norms) for one size.

    Holds all chunks on device: use it when the database fits (chunk_rows unset); `search`
    streams chunks from host otherwise.
    """
    block = self.block_rows(database.shape[0])
    chunks = [self._prepare_chunk(rows, offset, block)
              for offset, rows in self._chunks(database, size)]
    return PreparedDatabase(size=size, num_rows=database.shape[0], chunks=chunks)

  def _prepare_chunk(self, rows_np, offset, block):
    valid = rows_np.shape[0]
    per_device = self._per_device(valid, block)
    with jax.set_mesh(self.mesh):
      rows = self._put_rows(rows_np, per_device * self.num_shards)
      inv_norms = self._inv_norm_fn(block)(rows)
    return _Chunk(offset=offset, valid=valid, block=block, per_device=per_device, rows=rows,
                  inv_norms=inv_norms)

  def search(self, queries: np.ndarray, database, size: int, k: int,
             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k] float32, indices [Q, k] int64) of the k nearest database rows.

    `database` is a host array [N, d] (prepared chunk by chunk, streamed) or the result of
    `prepare(database, size)`. `progress(n)` is called with the number of queries finished.
    """
    if isinstance(database, PreparedDatabase):
      if database.size != size:
        raise ValueError(f"database prepared for size {database.size}, searched at {size}")
      num_database, chunks = database.num_rows, iter(database.chunks)
    else:
      num_database = database.shape[0]
      block = self.block_rows(num_database)
      chunks = (self._prepare_chunk(rows, offset, block)
                for offset, rows in self._chunks(database, size))
    if not 1 <= k <= num_database:
      raise ValueError(f"k={k} must be in [1, {num_database}] (the database size)")
    num_queries = queries.shape[0]
    starts = list(range(0, num_queries, self.query_block))
    running = [None] * len(starts)
    previous = None
    with jax.set_mesh(self.mesh):
      for chunk in chunks:
        fn = self._chunk_topk_fn(chunk.block, chunk.per_device, k)
        last = chunk.offset + chunk.valid >= num_database
        for b, q0 in enumerate(starts):
          q_np = np.asarray(queries[q0:q0 + self.query_block, :size], np.float32)
          n = len(q_np)  # the last block is padded: one compiled shape
          q_np = np.pad(q_np, [(0, self.query_block - n), (0, 0)])
          q = self._normalize_fn(size, self.replicated)(jax.device_put(q_np, self.replicated))
          if running[b] is None:
            running[b] = jax.device_put(
                (np.full((self.query_block, k), -np.inf, np.float32),
                 np.zeros((self.query_block, k), np.int32)), self.replicated)
          running[b] = fn(q, chunk.rows, chunk.inv_norms, np.int32(chunk.offset),
                          np.int32(chunk.valid), *running[b])
          if progress is not None and last:
            progress(n)
        # Dispatch is asynchronous: without this wait the loop would copy every chunk to the
        # device before the first is searched. Waiting for the previous chunk's results keeps
        # two chunks in memory (one searched while the next is copied).
        jax.block_until_ready(previous)
        previous = list(running)
    sizes = [min(self.query_block, num_queries - q0) for q0 in starts]
    scores = np.concatenate([np.asarray(s)[:n] for (s, _), n in zip(running, sizes)])
    index = np.concatenate([np.asarray(i)[:n] for (_, i), n in zip(running, sizes)])
    return scores, index.astype(np.int64)


@dataclasses.dataclass
class _Chunk:
  offset: int  # index of the chunk's first row in the database
  valid: int  # real rows (the rest is padding)
  block: int
  per_device: int
  rows: jax.Array  # [per_device * num_shards, size] as stored, split by rows
  inv_norms: jax.Array  # [per_device * num_shards] 1 / |row|


@dataclasses.dataclass
class PreparedDatabase:
  """A database truncated to `size`, on device with its inverse norms (ExactSearch.prepare)."""
  size: int
  num_rows: int
  chunks: list[_Chunk]
