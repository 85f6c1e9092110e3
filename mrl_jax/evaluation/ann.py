"""An approximate shortlist (faiss HNSW) for adaptive retrieval, as the paper's real-world timings.

The paper measures adaptive retrieval's wall-clock with HNSW shortlists (Sec. 5.2, Appendix
I; the official `retrieval/faiss_nn.ipynb` builds `faiss.IndexHNSWFlat`). Here the index is
built on the L2-normalised Ds-prefix with inner-product metric (the same ranking as exact
search), cached as a file next to the features (building it costs far more than searching), and
only the shortlist uses it: the rerank stays exact.
"""

import dataclasses
import hashlib
import os

import numpy as np

from mrl_jax import paths

_BUILD_ROWS = 1 << 16  # rows normalised and added at once (bounded memory for a memmap)


@dataclasses.dataclass(frozen=True)
class HnswParams:
  m: int = 32  # graph degree (faiss's M)
  ef_construction: int = 200
  ef_search: int = 256  # at least the shortlist K is used

  @classmethod
  def from_config(cls, ev) -> "HnswParams":
    """From config.eval's `hnsw_<field>` entries; absent ones keep the defaults above."""
    return cls(**{f.name: ev[f"hnsw_{f.name}"] for f in dataclasses.fields(cls)
                  if f"hnsw_{f.name}" in ev})


def _normalized(x: np.ndarray, size: int) -> np.ndarray:
  x = np.ascontiguousarray(x[:, :size], np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cache_name(database: np.ndarray, size: int, params: HnswParams) -> str:
  """A file name that changes with the data (its size and a sample of rows) and the params."""
  n = len(database)
  sample = np.asarray(database[np.linspace(0, n - 1, min(n, 64)).astype(np.int64), :size])
  digest = hashlib.sha1(sample.tobytes() + str(database.shape).encode()).hexdigest()[:12]
  return (f"hnsw_ds{size}_M{params.m}_efc{params.ef_construction}_n{n}_{digest}.faiss")


def build(database: np.ndarray, size: int, params: HnswParams, cache_dir: str | None = None):
  """The HNSW index of database[:, :size] (normalised), from the cache when it is there."""
  import faiss  # pylint: disable=g-import-not-at-top
  path = None
  if cache_dir is not None and not paths.is_remote(cache_dir):
    path = os.path.join(cache_dir, cache_name(database, size, params))
    if os.path.exists(path):
      return faiss.read_index(path)
  index = faiss.IndexHNSWFlat(size, params.m, faiss.METRIC_INNER_PRODUCT)
  index.hnsw.efConstruction = params.ef_construction
  for r0 in range(0, len(database), _BUILD_ROWS):
    index.add(_normalized(database[r0:r0 + _BUILD_ROWS], size))
  if path is not None:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)  # atomic: a half-written index is never read
  return index


def search(index, queries: np.ndarray, size: int, k: int, params: HnswParams) -> np.ndarray:
  """[Q, k] database ids of the approximate top-k (ids -1 never returned: padded with 0)."""
  index.hnsw.efSearch = max(params.ef_search, k)
  _, ids = index.search(_normalized(queries, size), k)
  return np.where(ids < 0, 0, ids).astype(np.int64)


def recall(approximate: np.ndarray, exact: np.ndarray) -> float:
  """Mean fraction of each query's exact top-K found in its approximate top-K."""
  hits = [len(np.intersect1d(a, e)) for a, e in zip(approximate, exact)]
  return float(np.mean(hits) / exact.shape[1])
