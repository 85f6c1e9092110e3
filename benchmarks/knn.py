r"""Exact 1-NN: mrl_jax's blocked search vs faiss IndexFlatL2, same data, same run.

Database N x 2048 and Q queries of random (Gaussian) features; for each size m the prefixes are
truncated and L2-normalised (as the MRL evaluation does), then both libraries find the nearest
database row of every query. Reports seconds, queries/s and the time ratio (jax / faiss), and
checks that both return the same neighbours (up to float ties).

  python benchmarks/knn.py --num_database=200000 --num_queries=2000 --sizes=8,64,2048
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_database", type=int, default=200_000)
  parser.add_argument("--num_queries", type=int, default=2000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--sizes", default="8,64,2048")
  parser.add_argument("--k", type=int, default=1)
  parser.add_argument("--query_block", type=int, default=1000)
  parser.add_argument("--database_block", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  import faiss  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mrl_jax import sharding  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import knn  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  database = rng.standard_normal((args.num_database, args.dim), dtype=np.float32)
  queries = rng.standard_normal((args.num_queries, args.dim), dtype=np.float32)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  search = knn.ExactSearch(mesh, query_block=args.query_block,
                           database_block=args.database_block)
  device = jax.devices()[0]
  print(f"device: {device.platform} x{jax.device_count()} ({device.device_kind}); "
        f"faiss threads: {faiss.omp_get_max_threads()}; database {args.num_database} x "
        f"{args.dim}, {args.num_queries} queries, k={args.k}", flush=True)
  rows = []
  for m in [int(s) for s in args.sizes.split(",")]:
    prep_faiss, search_faiss, prep_jax, search_jax = [], [], [], []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      db = np.ascontiguousarray(database[:, :m])
      faiss.normalize_L2(db)
      index = faiss.IndexFlatL2(m)
      index.add(db)
      t1 = time.perf_counter()
      q = np.ascontiguousarray(queries[:, :m])
      faiss.normalize_L2(q)
      _, faiss_idx = index.search(q, args.k)
      t2 = time.perf_counter()
      prep_faiss.append(t1 - t0)
      search_faiss.append(t2 - t1)
      del db, index
    search.search(queries, search.prepare(database, m), m, args.k)  # compile
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      prepared = search.prepare(database, m)
      jax.block_until_ready(prepared.chunks[-1].rows)
      t1 = time.perf_counter()
      _, jax_idx = search.search(queries, prepared, m, args.k)
      t2 = time.perf_counter()
      prep_jax.append(t1 - t0)
      search_jax.append(t2 - t1)
      del prepared
    same = float(np.mean(jax_idx[:, 0] == faiss_idx[:, 0]))
    row = dict(m=m, prep_jax=min(prep_jax), search_jax=min(search_jax),
               prep_faiss=min(prep_faiss), search_faiss=min(search_faiss), same=same)
    rows.append(row)
    print(row, flush=True)
  nq = args.num_queries
  print(f"\nDatabase {args.num_database} x {args.dim} (prefix m), {nq} queries, exact {args.k}-NN"
        " on L2-normalised prefixes.\n")
  print("| m | mrl_jax search s | faiss search s | mrl_jax q/s | faiss q/s | search time "
        "jax/faiss | prepare s jax / faiss | total time jax/faiss | same 1-NN |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    total = (r["prep_jax"] + r["search_jax"]) / (r["prep_faiss"] + r["search_faiss"])
    print(f"| {r['m']} | {r['search_jax']:.3f} | {r['search_faiss']:.3f} | "
          f"{nq / r['search_jax']:.0f} | {nq / r['search_faiss']:.0f} | "
          f"{r['search_jax'] / r['search_faiss']:.2f} | {r['prep_jax']:.2f} / "
          f"{r['prep_faiss']:.2f} | {total:.2f} | {r['same']:.4f} |")


if __name__ == "__main__":
  main()
