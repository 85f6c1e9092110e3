"""Neighbour metrics of a database and query sets at every size (exact search per size)."""

from collections.abc import Sequence

from tqdm import tqdm

from mrl_jax import utils
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import metrics as metrics_lib


def metrics_by_size(database_z, database_y, query_sets: dict[str, tuple], sizes, *,
                    knn_ks: Sequence[int], retrieval_ks: Sequence[int],
                    search: knn.ExactSearch, num_classes: int | None = None,
                    ) -> dict[str, dict[int, dict[str, float]]]:
  """{query set: {size: knn<k>_top1 and retrieval metrics}}; query_sets = {name: (z, y)}.

  The database is truncated, normalised and put on device once per size, then searched by every
  query set (the expensive part is the database, not the queries).
  """
  out = {name: {m: {} for m in sizes} for name in query_sets}
  if not knn_ks and not retrieval_ks:
    return out
  k = min(max([*knn_ks, *retrieval_ks]), len(database_y))
  knn_ks = [kk for kk in knn_ks if kk <= k]
  retrieval_ks = [kk for kk in retrieval_ks if kk <= k]
  relevant = {name: metrics_lib.relevant_counts(database_y, y, num_classes)
              for name, (_, y) in query_sets.items()}
  total = sum(len(y) for _, y in query_sets.values()) * len(sizes)
  bar = tqdm(total=total, unit="query", desc="search", disable=not utils.is_main_process(),
             mininterval=2.0)
  for m in sizes:
    database = database_z if search.chunk_rows else search.prepare(database_z, m)
    for name, (queries_z, queries_y) in query_sets.items():
      _, index = search.search(queries_z, database, m, k, progress=bar.update)
      out[name][m] = metrics_lib.neighbor_metrics(database_y[index], queries_y,
                                                  relevant[name], knn_ks, retrieval_ks)
    del database
  bar.close()
  return out
