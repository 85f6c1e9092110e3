"""The paper's baselines for an m-dimensional representation, from one model's full features.

- `svd`: rank-m approximation of the full-size head W [d, C] = U S V^T (Eckart-Young): the
  representation is z U_m, and its head is the rank-m classifier z U_m S_m V_m^T + b (the
  paper's SVD baseline on FF-2048's classifier; its linear accuracy needs no probe).
- `pca`: project z onto the top-m principal components of the database (train) features.
- `random_projection`: z R with R a seeded Gaussian d x m matrix; `random_subset`: m random
  coordinates of z (the paper's Rand-LP / random features).
Each representation gets the same neighbour metrics as the Matryoshka prefixes (1-NN, k-NN,
retrieval) and a linear accuracy (the rank-m head for SVD, a post-hoc linear probe otherwise).
FF-m baselines are separate models: evaluate their workdirs with eval.py.
"""

from collections.abc import Callable, Sequence

import numpy as np

from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import neighbors
from mrl_jax.evaluation import probe

KINDS = ("svd", "pca", "random_projection", "random_subset")


def svd_basis(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(U [d, r], S [r], Vt [r, C]) of the head kernel, singular values descending."""
  u, s, vt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
  return u, s, vt


def svd_head(kernel: np.ndarray, m: int):
  """(projection P [d, m], rank-m head kernel [m, C]): logits = (z P) @ head + bias."""
  u, s, vt = svd_basis(kernel)
  return u[:, :m], np.diag(s[:m]) @ vt[:m]


def pca_basis(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], components [d, d] as columns, by explained variance descending)."""
  x = np.asarray(features, np.float64)
  mean = x.mean(0)
  cov = np.cov(x - mean, rowvar=False)
  values, vectors = np.linalg.eigh(cov)
  order = np.argsort(values)[::-1]
  return mean, vectors[:, order]


def projector(kind: str, m: int, *, database: np.ndarray, head_kernel: np.ndarray | None,
              seed: int = 0, cache: dict | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """z [N, d] -> the m-dim baseline representation [N, m]."""
  if kind not in KINDS:
    raise ConfigError(f"unknown baseline {kind!r} (config.eval.baselines); allowed: {list(KINDS)}")
  d = database.shape[1]
  cache = {} if cache is None else cache
  if kind == "svd":
    if head_kernel is None:
      raise ConfigError("the svd baseline needs a full-size head (head_d); this model has none")
    if "svd" not in cache:
      cache["svd"] = svd_basis(head_kernel)
    u = cache["svd"][0]
    return lambda z: np.asarray(z, np.float64) @ u[:, :m]
  if kind == "pca":
    if "pca" not in cache:
      cache["pca"] = pca_basis(database)
    mean, vectors = cache["pca"]
    return lambda z: (np.asarray(z, np.float64) - mean) @ vectors[:, :m]
  rng = np.random.default_rng(seed + m)
  if kind == "random_projection":
    r = rng.standard_normal((d, m)) / np.sqrt(m)
    return lambda z: np.asarray(z, np.float64) @ r
  columns = np.sort(rng.choice(d, m, replace=False))
  return lambda z: np.asarray(z)[:, columns]


def evaluate(kinds: Sequence[str], database, queries, *, sizes, full_classifier, search,
             knn_ks, retrieval_ks, num_classes, probe_steps=200, probe_l2=1e-4) -> dict:
  """{kind: {size: metrics}} with the per-size metric names of results.json: the neighbour
  metrics of each representation and its linear accuracy (the rank-m head for SVD, a probe
  otherwise). `full_classifier`: (kernel [d, C], bias) of the full-size head, or None."""
  kernel, bias = full_classifier or (None, None)
  cache = {}
  out = {}
  for kind in kinds:
    out[kind] = {}
    for m in sizes:
      project = projector(kind, m, database=database.z, head_kernel=kernel, cache=cache)
      db_m = project(database.z).astype(np.float32)
      q_m = project(queries.z).astype(np.float32)
      metrics = neighbors.metrics_by_size(
          db_m, database.labels, {"q": (q_m, queries.labels)}, [m], knn_ks=knn_ks,
          retrieval_ks=retrieval_ks, search=search, num_classes=num_classes)["q"][m]
      if kind == "svd":  # the rank-m classifier itself
        _, head_m = svd_head(kernel, m)
        logits = q_m.astype(np.float64) @ head_m + bias
        metrics["linear_top1"] = float(np.mean(np.argmax(logits, -1) == queries.labels))
      else:
        lp = probe.LinearProbe(num_classes, l2=probe_l2, steps=probe_steps).fit(
            db_m, database.labels)
        metrics["linear_top1"] = lp.accuracy(q_m, queries.labels)
      out[kind][str(m)] = metrics
  return out
