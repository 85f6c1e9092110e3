r"""Exact top-k search: mrl_jax's ExactSearch vs the same matmul alone vs faiss IndexFlatIP.

One run, one database: N x 2048 Gaussian features stored float16 (so 1M rows fit next to
faiss's float32 copy), Q queries. For each size m the prefixes are truncated and L2-normalised
(as the MRL evaluation does) and the top-k found by
- ExactSearch (blocked scan, sub-block maxima, exact rescoring; evaluation/knn.py);
- "matmul alone": the same blocked scan over the same device arrays computing every score
  q . x / |x| and keeping only each query's maximum - the arithmetic without any selection,
  the floor the selection is measured against;
- faiss IndexFlatIP on a float32 normalised copy (BLAS GEMM + heap selection).
Reports seconds per search (min over repeats), the ratios, and how many of the top-k agree.

  python benchmarks/knn.py --num_database=1000000 --num_queries=1000 --sizes=8,16,64,2048
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("num_database", 1_000_000, "Database rows.")
flags.DEFINE_integer("num_queries", 1000, "Queries.")
flags.DEFINE_integer("dim", 2048, "Feature dim (the largest size).")
flags.DEFINE_list("sizes", ["8", "16", "64", "2048"], "Sizes m.")
flags.DEFINE_integer("k", 10, "Neighbours per query.")
flags.DEFINE_integer("query_block", 1024, "ExactSearch query block.")
flags.DEFINE_integer("database_block", 4096, "ExactSearch database block.")
flags.DEFINE_integer("repeats", 2, "Timed repeats (the minimum is reported).")
FLAGS = flags.FLAGS


def _best(fn, repeats):
  out, times = None, []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, min(times)


def _matmul_alone(search, prepared, queries, size):
  """Seconds of the blocked scan computing every score and keeping one max per query."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import knn  # pylint: disable=g-import-not-at-top
  chunk, = prepared.chunks
  block, qb = chunk.block, search.query_block

  @jax.jit
  def scan(q, rows, inv_norms):
    def step(best, j):
      x = jax.lax.dynamic_slice_in_dim(rows, j * block, block).astype(jnp.float32)
      inv = jax.lax.dynamic_slice_in_dim(inv_norms, j * block, block)
      scores = jnp.dot(q, x.T, precision=jax.lax.Precision.HIGHEST) * inv
      return jnp.maximum(best, scores.max(axis=1)), None
    return jax.lax.scan(step, jnp.full((q.shape[0],), -jnp.inf),
                        jnp.arange(rows.shape[0] // block))[0]

  blocks = []
  for q0 in range(0, len(queries), qb):
    q = np.asarray(queries[q0:q0 + qb, :size], np.float32)
    blocks.append(knn.normalize_prefix(jnp.asarray(np.pad(q, [(0, qb - len(q)), (0, 0)])), size))
  run = lambda: jax.block_until_ready([scan(q, chunk.rows, chunk.inv_norms) for q in blocks])
  run()  # compile
  return run


def main(argv):
  del argv
  import faiss  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mrl_jax import sharding  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import knn  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n, d, k = FLAGS.num_database, FLAGS.dim, FLAGS.k
  database = np.empty((n, d), np.float16)
  for r0 in range(0, n, 65536):
    database[r0:r0 + 65536] = rng.standard_normal((min(65536, n - r0), d), dtype=np.float32)
  queries = rng.standard_normal((FLAGS.num_queries, d), dtype=np.float32)
  search = knn.ExactSearch(sharding.make_mesh({"data": -1, "fsdp": 1}),
                           query_block=FLAGS.query_block, database_block=FLAGS.database_block)
  device = jax.devices()[0]
  print(f"device: {device.platform} x{jax.device_count()}; faiss threads "
        f"{faiss.omp_get_max_threads()}; database {n} x {d} float16, {len(queries)} queries, "
        f"k={k}", flush=True)
  rows = []
  for m in [int(s) for s in FLAGS.sizes]:
    index = faiss.IndexFlatIP(m)
    for r0 in range(0, n, 65536):
      x = np.ascontiguousarray(database[r0:r0 + 65536, :m], np.float32)
      faiss.normalize_L2(x)
      index.add(x)
    q = np.ascontiguousarray(queries[:, :m])
    faiss.normalize_L2(q)
    index.search(q[:10], k)
    (_, faiss_ids), faiss_s = _best(lambda: index.search(q, k), FLAGS.repeats)
    index.reset()  # frees its float32 copy before ours is made
    prepared = search.prepare(database, m)
    search.search(queries, prepared, m, k)  # compile
    (_, ids), exact_s = _best(lambda: search.search(queries, prepared, m, k), FLAGS.repeats)
    _, alone_s = _best(_matmul_alone(search, prepared, queries, m), FLAGS.repeats)
    prepared = None  # frees the device copy before the next size
    agree = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, faiss_ids)])
    row = dict(m=m, exact=exact_s, alone=alone_s, faiss=faiss_s, agree=float(agree))
    rows.append(row)
    print(row, flush=True)
  print(f"\nDatabase {n} x {d} (float16, prefix m), {len(queries)} queries, exact top-{k} on "
        "L2-normalised prefixes; seconds per search of all queries.\n")
  print("| m | ExactSearch s | matmul alone s | faiss IndexFlatIP s | exact / matmul alone | "
        "faiss / exact | top-k agreement with faiss |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['m']} | {r['exact']:.3f} | {r['alone']:.3f} | {r['faiss']:.3f} | "
          f"{r['exact'] / r['alone']:.2f} | {r['faiss'] / r['exact']:.2f} | {r['agree']:.4f} |")


if __name__ == "__main__":
  app.run(main)
