r"""Adaptive retrieval at scale: shortlist at Ds, rerank at 2048, against exact search at 2048.

A synthetic MRL-like database: `classes` class centres plus noise, both with per-dimension
standard deviation decreasing as (1 + j)^-0.5, so that prefixes carry most of the signal (as
MRL's features do), stored float16. Queries are drawn the same way. Runs
`evaluation/adaptive_retrieval.evaluate` (the code eval.py runs): exact single-shot rows at
every size used, Ds -> 2048 with K = 200, a multi-stage funnel, each with exact shortlists and
optionally faiss HNSW shortlists (the paper's real-world setting), and prints MFLOPs and
measured wall-clock speed-ups side by side.

With --memmap_dir the database is written there as a .npy file and read back memory-mapped
and streamed through the search in chunks of --chunk_rows rows (the rerank gathers only the
candidate rows); the peak anonymous memory of the process (RssAnon, sampled every 20 ms, and
VmHWM, which also counts page-cache pages of the mapped file) is reported.

  python benchmarks/adaptive_retrieval.py --num_database=1000000 --engines=exact,hnsw
  python benchmarks/adaptive_retrieval.py --num_database=4200000 --memmap_dir=/tmp/db4k \
      --chunk_rows=262144 --shortlist_sizes=16 --funnel= --engines=exact
"""

import os
import sys
import threading
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("num_database", 1_000_000, "Database rows.")
flags.DEFINE_integer("num_queries", 1000, "Queries.")
flags.DEFINE_integer("dim", 2048, "Feature dim.")
flags.DEFINE_integer("classes", 1000, "Classes (mAP relevance).")
flags.DEFINE_list("shortlist_sizes", ["8", "16"], "Ds of the Ds -> dim rows (K = --k).")
flags.DEFINE_integer("k", 200, "Shortlist length K.")
flags.DEFINE_multi_string("funnel", ["16:128,2048:800,200"], "A funnel Ds:Dr1,Dr2:K1,K2 "
                          "(repeatable; --funnel= for none).")
flags.DEFINE_list("engines", ["exact"], "Shortlist engines: exact and/or hnsw.")
flags.DEFINE_integer("hnsw_m", 32, "HNSW graph degree M.")
flags.DEFINE_integer("hnsw_ef_construction", 100, "HNSW efConstruction.")
flags.DEFINE_integer("hnsw_ef_search", 256, "HNSW efSearch (at least K).")
flags.DEFINE_string("memmap_dir", None, "Write the database here and stream it memory-mapped.")
flags.DEFINE_integer("chunk_rows", None, "Rows per streamed chunk (with --memmap_dir).")
flags.DEFINE_integer("query_block", 1024, "Queries per search block.")
flags.DEFINE_integer("database_block", 4096, "Database rows per block.")
FLAGS = flags.FLAGS


class PeakMemory:
  """Samples the process's RssAnon (anonymous resident memory) in a thread."""

  def __init__(self, every: float = 0.02):
    self.peak_anon_kb, self._stop, self._every = 0, threading.Event(), every
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  @staticmethod
  def status(key: str) -> int:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

  def _run(self):
    while not self._stop.is_set():
      self.peak_anon_kb = max(self.peak_anon_kb, self.status("RssAnon"))
      time.sleep(self._every)

  def stop(self) -> tuple[float, float]:
    """(peak RssAnon GiB, VmHWM GiB)."""
    self._stop.set()
    self._thread.join()
    return self.peak_anon_kb / 2**20, self.status("VmHWM") / 2**20


def _synthetic(rng, n, d, centers, out=None):
  """Rows of class centre + noise, per-dimension scale (1 + j)^-0.5, float16; written into
  `out` (e.g. a memory map) in slices."""
  scale = (1.0 + np.arange(d, dtype=np.float32)) ** -0.5
  labels = rng.integers(0, len(centers), n)
  out = np.empty((n, d), np.float16) if out is None else out
  for r0 in range(0, n, 32768):
    y = labels[r0:r0 + 32768]
    noise = rng.standard_normal((len(y), d), dtype=np.float32)
    out[r0:r0 + len(y)] = (centers[y] + 0.8 * noise) * scale
  return out, labels


def main(argv):
  del argv
  memory = PeakMemory()
  import jax  # pylint: disable=g-import-not-at-top
  from mrl_jax import sharding  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import adaptive_retrieval  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import ann  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import knn  # pylint: disable=g-import-not-at-top

  n, d = FLAGS.num_database, FLAGS.dim
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((FLAGS.classes, d), dtype=np.float32)
  t0 = time.perf_counter()
  if FLAGS.memmap_dir:
    os.makedirs(FLAGS.memmap_dir, exist_ok=True)
    path = os.path.join(FLAGS.memmap_dir, "database_X.npy")
    labels_path = os.path.join(FLAGS.memmap_dir, "database_y.npy")
    if not os.path.exists(labels_path):  # written once, reused by later runs
      out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
      _, labels = _synthetic(rng, n, d, centers, out)
      out.flush()
      del out
      np.save(labels_path, labels)
    database = np.load(path, mmap_mode="r")
    database_y = np.load(labels_path)
  else:
    database, database_y = _synthetic(rng, n, d, centers)
  queries, queries_y = _synthetic(np.random.default_rng(1), FLAGS.num_queries, d, centers)
  print(f"data: {n} x {d} float16 ({database.nbytes / 2**30:.1f} GiB"
        f"{', memory-mapped' if FLAGS.memmap_dir else ''}) in {time.perf_counter() - t0:.0f} s; "
        f"device {jax.devices()[0].platform} x{jax.device_count()}", flush=True)

  funnels = [adaptive_retrieval.Funnel(int(ds), ((d, FLAGS.k),)) for ds in FLAGS.shortlist_sizes]
  for text in filter(None, FLAGS.funnel):
    ds, drs, ks = text.split(":")
    funnels.append(adaptive_retrieval.Funnel(int(ds), tuple(zip(
        (int(x) for x in drs.split(",")), (int(x) for x in ks.split(","))))))
  search = knn.ExactSearch(sharding.make_mesh({"data": -1, "fsdp": 1}),
                           query_block=FLAGS.query_block, database_block=FLAGS.database_block,
                           chunk_rows=FLAGS.chunk_rows)
  t0 = time.perf_counter()
  rows = adaptive_retrieval.evaluate(
      funnels, database, database_y, queries.astype(np.float32), queries_y, search=search,
      retrieval_ks=(10,), engines=tuple(FLAGS.engines),
      hnsw=ann.HnswParams(FLAGS.hnsw_m, FLAGS.hnsw_ef_construction, FLAGS.hnsw_ef_search),
      cache_dir=FLAGS.memmap_dir)
  total = time.perf_counter() - t0
  peak_anon, hwm = memory.stop()
  print(f"\n{n} x {d} float16 database, {FLAGS.num_queries} queries, {FLAGS.classes} classes; "
        f"evaluate() took {total:.0f} s in all; peak RssAnon {peak_anon:.2f} GiB, VmHWM "
        f"{hwm:.2f} GiB\n")
  print("| retrieval | engine | MFLOPs / query | seconds (1,000 queries) | mAP@10 | "
        "shortlist recall | speed-up MFLOPs | speed-up wall-clock |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['engine']} | {r['mflops']:.1f} | {r['seconds']:.3f} | "
          f"{r['map@10']:.4f} | {r['shortlist_recall']:.3f} | "
          f"{r['mflops_speedup_vs_exact']:.1f}x | {r['wallclock_speedup_vs_exact']:.1f}x |")


if __name__ == "__main__":
  app.run(main)
