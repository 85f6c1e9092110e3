"""Adaptive retrieval and funnels against a numpy reference; the paper's MFLOPs."""


import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from mrl_jax import sharding
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import adaptive_retrieval as ar
from mrl_jax.evaluation import knn
from tests.references import canonical_rows
from tests.references import random_problem
from tests.references import reference_metrics
from tests.references import reference_neighbors


def _search(devices=1):
  return knn.ExactSearch(sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:devices]),
                         query_block=16, database_block=64)


# --- adaptive retrieval -----------------------------------------------------------------------

def _numpy_funnel(q, db, shortlist_size, stages):
  """Shortlist by float64 cosine at Ds, then re-sort the first K_j at Dr_j (stable)."""
  _, order = reference_neighbors(q, db, shortlist_size, stages[0][1])
  for size, k in stages:
    top = order[:, :k]
    qn = q[:, :size] / np.linalg.norm(q[:, :size], axis=1, keepdims=True)
    x = db[top][..., :size].astype(np.float64)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    scores = np.einsum("qd,qkd->qk", qn, x)
    order = np.take_along_axis(top, np.argsort(-scores, axis=1, kind="stable"), 1)
  return order


def test_reranking_all_of_the_database_equals_exact_search_at_the_rerank_size():
  db, _, q, _ = random_problem(0)
  search = _search(8)
  _, shortlist = search.search(q, db, 3, len(db))  # K = N_db
  reranked = ar.rerank(q, db, shortlist, [(24, len(db))])
  _, exact = reference_neighbors(q, db, 24, len(db))
  canonical = canonical_rows(db)
  np.testing.assert_array_equal(canonical[reranked[:, :10]], canonical[exact[:, :10]])


@pytest.mark.parametrize("stages", [((24, 50),), ((6, 80), (12, 40), (24, 10))])
def test_shortlist_and_funnel_equal_a_numpy_reference(stages):
  db, _, q, _ = random_problem(1)
  _, shortlist = _search().search(q, db, 3, stages[0][1])
  got = ar.rerank(q, db, shortlist, stages)
  want = _numpy_funnel(q, db, 3, stages)
  canonical = canonical_rows(db)
  np.testing.assert_array_equal(canonical[got], canonical[want])


def _ev(shortlist_sizes=(), rerank_sizes=(), shortlist_k=(), funnels=()):
  return ConfigDict(dict(shortlist_sizes=shortlist_sizes, rerank_sizes=rerank_sizes,
                         shortlist_k=shortlist_k, funnels=funnels))


def test_one_stage_funnel_spec_equals_the_two_stage_lists():
  funnels = ar.funnels_from_config(_ev((8,), (64,), (20,), ((8, (64,), (20,)),)), 64)
  assert funnels[0] == funnels[1] == ar.Funnel(8, ((64, 20),))
  assert ar.funnels_from_config(_ev((8,), (), (20,)), 64) == [ar.Funnel(8, ((64, 20),))]


def test_mflops_formula_reproduces_the_papers_imagenet_numbers():
  n = 1_281_167  # ImageNet-1K train images (the database)
  # 1,281,167 * 16 + 200 * 2048 = 20,908,272 -> 20.91 in the paper's table
  assert ar.Funnel(16, ((2048, 200),)).mflops(n) == pytest.approx(20.908272)
  funnel = ar.Funnel(8, ((16, 800), (32, 400), (64, 200), (128, 50), (2048, 10)))
  # 1,281,167 * 8 + 800*16 + 400*32 + 200*64 + 50*128 + 10*2048 = 10,314,616 -> 10.31
  assert funnel.mflops(n) == pytest.approx(10.314616)


def test_bad_funnel_specs_are_config_errors():
  with pytest.raises(ConfigError, match=r"is not \(Ds, \(Dr1, Dr2, ...\), \(K1, K2, ...\)\)"):
    ar.funnels_from_config(_ev(funnels=((8, (16,)),)), 64)
  with pytest.raises(ConfigError, match=r"is not \(Ds, \(Dr1, Dr2, ...\), \(K1, K2, ...\)\)"):
    ar.funnels_from_config(_ev(funnels=((8, (16, 32), (10,)),)), 64)
  with pytest.raises(ConfigError, match="one K per stage, non-increasing"):
    ar.funnels_from_config(_ev(funnels=((8, (16, 32), (10, 20)),)), 64)
  with pytest.raises(ConfigError, match=r"size 128 is outside \[1, 64\]"):
    ar.funnels_from_config(_ev((8,), (128,), (10,)), 64)


def test_adaptive_retrieval_rows_equal_a_numpy_shortlist_and_rerank():
  """Every row's metrics are those of the numpy funnel's (or exact search's) neighbours on the
  same features, from the metric definitions (references.py); costs by the paper's formula."""
  db, db_y, q, q_y = random_problem(2)
  funnels = ar.funnels_from_config(_ev((3,), (24,), (40,), ((3, (6, 24), (60, 10)),)), 24)
  rows = ar.evaluate(funnels, db, db_y, q, q_y, search=_search(), num_classes=5,
                     retrieval_ks=[10])
  names = [r["name"] for r in rows]
  assert names == ["3 (single-shot)", "24 (single-shot)", "3->24 (K=40)",
                   "funnel 3->6->24 (K=60,10)"]
  counts = np.bincount(db_y, minlength=5)
  canonical = canonical_rows(db)
  for row in rows:
    if row["kind"] == "single_shot":
      _, order = reference_neighbors(q, db, row["shortlist_size"], 10)
    else:
      order = _numpy_funnel(q, db, row["shortlist_size"], [tuple(s) for s in row["stages"]])
    want = reference_metrics(db_y[order], q_y, counts, [], [10])
    for key, value in want.items():
      assert row[key] == pytest.approx(value, abs=1e-9), (row["name"], key)
    assert row["top1"] == pytest.approx(np.mean(db_y[order[:, 0]] == q_y))
    assert row["shortlist_recall"] == 1.0 and row["seconds"] > 0
    # the numpy order differs from the shortlist-only order: the rerank changed something
    if row["kind"] != "single_shot":
      _, shortlist = reference_neighbors(q, db, 3, 10)
      assert not np.array_equal(canonical[order], canonical[shortlist])
  by_name = {r["name"]: r for r in rows}
  assert by_name["3->24 (K=40)"]["mflops"] == pytest.approx((200 * 3 + 40 * 24) / 1e6)
  assert by_name["funnel 3->6->24 (K=60,10)"]["mflops"] == pytest.approx(
      (200 * 3 + 60 * 6 + 10 * 24) / 1e6)
  assert by_name["24 (single-shot)"]["mflops_speedup_vs_exact"] == 1.0
  assert by_name["3 (single-shot)"]["mflops_speedup_vs_exact"] == pytest.approx(8.0)


def test_each_exact_search_runs_once_after_a_one_query_warm_up():
  """Warm-ups compile the (padded) query block with one query; every (size, k) searches the
  whole query set once and is reused (single-shot row, shortlist and recall reference)."""
  db, db_y, q, q_y = random_problem(3)
  search = _search()
  calls = []
  original = search.search

  def counting(queries, *args, **kwargs):
    calls.append((len(queries), *args[1:3]))
    return original(queries, *args, **kwargs)

  search.search = counting
  funnels = ar.funnels_from_config(_ev((3,), (24,), (10,), ((3, (6, 24), (10, 10)),)), 24)
  ar.evaluate(funnels, db, db_y, q, q_y, search=search, num_classes=5, retrieval_ks=[10])
  full = [c for c in calls if c[0] == len(q)]
  assert sorted(full) == sorted(set(full)) == [(len(q), 3, 10), (len(q), 24, 10)]
  assert all(c[0] == 1 for c in calls if c[0] != len(q))
