"""Exact nearest-neighbour search on L2-normalised prefixes, blocked and sharded over devices.

As the official MRL evaluation: truncate to the first m dimensions, L2-normalise database and
queries, and rank by L2 distance, which on unit vectors is ranking by cosine similarity (we
return the cosine, higher = nearer). Database rows stay on device as stored (float32, bfloat16
or float16) with their inverse norms; each block's scores are (q / |q|) . x * (1 / |x|),
computed in float32, so no normalised copy of the database is ever written. The search is exact
and never materialises the Q x N score matrix:
- the database is split by rows over every device of the mesh; each device scans its rows in
  blocks of `block` rows, keeping a running top-k ([query_block, k]) per query;
- selection within a block prunes before any top-k: the block's scores are cut into sub-blocks
  of `sub_block` rows, and only the k sub-blocks with the largest maxima can hold the block's
  top k (any other element is beaten by k sub-block maxima), so the top-k runs over k x
  sub_block candidates instead of the whole block -- exact, ties included (below);
- the per-device top-k lists are merged into the global top-k; queries go through in blocks of
  `query_block`; a database larger than device memory streams from host in chunks of
  `chunk_rows` rows, merged the same way.
Order and ties: results are sorted by score, equal scores by lower database index, as a stable
full sort would (candidates are always kept in index order and `lax.top_k` is stable). Every
score is computed by the same [query_block, m] x [m, block] product whatever the device count or
chunking (XLA rounds a product differently for different shapes), and `block` depends only on
the database size, so duplicate rows score bitwise-equally and results do not depend on the
layout.
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


class ExactSearch:
  """Blocked, sharded exact top-k by cosine similarity of L2-normalised prefixes."""

  def __init__(self, mesh: jax.sharding.Mesh, *, query_block: int = 1024,
               database_block: int = 65536, chunk_rows: int | None = None,
               sub_block: int = 128):
    self.mesh = mesh
    self.query_block = query_block
    self.database_block = database_block
    self.chunk_rows = chunk_rows
    self.sub_block = sub_block
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

  @functools.cache
  def _chunk_topk_fn(self, block: int, per_device: int, k: int) -> Callable:
    """jit: (queries [qb, m], rows [D*per_device, m], inv_norms, offset, valid, running top-k)
    -> running top-k merged with this chunk's."""
    axes = sharding_lib.BATCH_AXES
    num_blocks = per_device // block
    sub = min(self.sub_block, block)
    num_sub = block // sub
    kk = min(k, block)
    kk_sub = min(k, num_sub)
    prune = kk_sub * sub < block  # else the whole block is no larger than the candidates

    def block_topk(scores, index):
      """Top-kk of one block, [qb, block] -> ([qb, kk], [qb, kk]), ties by lower index."""
      if not prune:
        return _topk(scores, jnp.broadcast_to(index, scores.shape), kk)
      qb = scores.shape[0]
      grouped = scores.reshape(qb, num_sub, sub)
      _, best_subs = jax.lax.top_k(grouped.max(-1), kk_sub)
      best_subs = jnp.sort(best_subs, axis=-1)  # index order: ties stay with the lower index
      candidates = jnp.take_along_axis(grouped, best_subs[:, :, None], axis=1).reshape(qb, -1)
      positions = (best_subs[:, :, None] * sub + jnp.arange(sub)).reshape(qb, -1)
      return _topk(candidates, index[positions], kk)

    def local(queries, rows, inv_norms, offset, valid):
      base = offset + jax.lax.axis_index(axes) * per_device

      def body(carry, j):
        start = j * block
        rows_block = jax.lax.dynamic_slice_in_dim(rows, start, block)
        inv_norm = jax.lax.dynamic_slice_in_dim(inv_norms, start, block)
        index = base + start + jnp.arange(block, dtype=jnp.int32)
        scores = (queries @ rows_block.astype(jnp.float32).T) * inv_norm  # [qb, block]
        scores = jnp.where(index < offset + valid, scores, -jnp.inf)
        return _merge(*carry, *block_topk(scores, index), k), None

      # The carry differs per device ("varying" over the mesh axes), as the scores do.
      init = jax.lax.pcast((jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
                            jnp.zeros((queries.shape[0], k), jnp.int32)), axes, to="varying")
      (scores, index), _ = jax.lax.scan(body, init, jnp.arange(num_blocks))
      return scores[None], index[None]

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
  def _inv_norm_fn(self) -> Callable:
    def inv_norm(x):
      norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
      return 1.0 / jnp.maximum(norm, 1e-12)
    return jax.jit(inv_norm, out_shardings=NamedSharding(self.mesh, P(sharding_lib.BATCH_AXES)))

  def _put_rows(self, rows_np: np.ndarray, total_rows: int) -> jax.Array:
    """rows_np [valid, m] -> [total_rows, m] split by rows over the devices; only the padding
    is zeros, so the host never copies the whole database."""
    valid, size = rows_np.shape
    if valid == total_rows and self.num_shards == 1:
      return jax.device_put(np.ascontiguousarray(rows_np), self.rows_sharding)

    def part(index):
      start, stop, _ = index[0].indices(total_rows)
      if stop <= valid:
        return np.ascontiguousarray(rows_np[start:stop])
      out = np.zeros((stop - start, size), rows_np.dtype)
      if start < valid:
        out[:valid - start] = rows_np[start:valid]
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
      inv_norms = self._inv_norm_fn()(rows)
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
