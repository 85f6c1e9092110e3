"""Adaptive retrieval and funnels against a numpy reference; the paper's MFLOPs."""


import types

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from mrl_jax import sharding
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import adaptive_retrieval as ar
from mrl_jax.evaluation import ann
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


def test_rerank_is_by_cosine_for_rows_of_any_norm():
  """Database rows scaled by 1e-3 .. 10 (an unnormalised float16 database): the rerank still
  orders by cosine, not by dot product or a clamped norm."""
  db, _, q, _ = random_problem(1)
  scale = np.random.default_rng(0).uniform(-3, 1, size=(len(db), 1))[canonical_rows(db)]
  db = (db * 10.0**scale).astype(np.float32)  # duplicate rows stay identical
  stages = ((24, 50),)
  _, shortlist = _search().search(q, db, 3, 50)
  got = ar.rerank(q, db, shortlist, stages)
  canonical = canonical_rows(db)
  np.testing.assert_array_equal(canonical[got], canonical[_numpy_funnel(q, db, 3, stages)])


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
  assert ar.Funnel(16, ((2048, 200),)).mflops(n) == pytest.approx(20.908272, rel=1e-12)
  funnel = ar.Funnel(8, ((16, 800), (32, 400), (64, 200), (128, 50), (2048, 10)))
  # 1,281,167 * 8 + 800*16 + 400*32 + 200*64 + 50*128 + 10*2048 = 10,314,616 -> 10.31
  assert funnel.mflops(n) == pytest.approx(10.314616, rel=1e-12)


def test_bad_funnel_specs_are_config_errors():
  with pytest.raises(ConfigError, match=r"is not \(Ds, \(Dr1, Dr2, ...\), \(K1, K2, ...\)\)"):
    ar.funnels_from_config(_ev(funnels=((8, (16,)),)), 64)
  with pytest.raises(ConfigError, match=r"is not \(Ds, \(Dr1, Dr2, ...\), \(K1, K2, ...\)\)"):
    ar.funnels_from_config(_ev(funnels=((8, (16, 32), (10,)),)), 64)
  with pytest.raises(ConfigError, match="one K per stage, non-increasing"):
    ar.funnels_from_config(_ev(funnels=((8, (16, 32), (10, 20)),)), 64)
  with pytest.raises(ConfigError, match=r"size 128 is outside \[1, 64\]"):
    ar.funnels_from_config(_ev((8,), (128,), (10,)), 64)
  for size in (0, True, 8.0):
    with pytest.raises(ConfigError, match=rf"size {size!r} is outside \[1, 64\]"):
      ar.funnels_from_config(_ev((size,), (64,), (10,)), 64)
  for k in (0, -3, True, 2.5):
    with pytest.raises(ConfigError, match=rf"K={k!r}; allowed: integers >= 1"):
      ar.funnels_from_config(_ev((8,), (64,), (k,)), 64)
  # the smallest allowed size and K
  assert ar.funnels_from_config(_ev((1,), (1,), (1,)), 64) == [ar.Funnel(1, ((1, 1),))]
  with pytest.raises(ConfigError, match=r"shortlist engine 'ivf'.*allowed: \['exact', 'hnsw'\]"):
    db, db_y, q, q_y = random_problem(2)
    ar.evaluate([ar.Funnel(3, ((24, 10),))], db, db_y, q, q_y, search=_search(),
                engines=("ivf",))


def test_adaptive_retrieval_rows_equal_a_numpy_shortlist_and_rerank():
  """Every row's metrics are those of the numpy funnel's (or exact search's) neighbours on the
  same features, from the metric definitions (references.py); costs by the paper's formula."""
  db, db_y, q, q_y = random_problem(2)
  funnels = ar.funnels_from_config(_ev((3,), (24,), (40,), ((3, (6, 24), (60, 10)),)), 24)
  rows = ar.evaluate(funnels, db, db_y, q, q_y, search=_search(), num_classes=5,
                     retrieval_ks=[10, 5])
  names = [r["name"] for r in rows]
  assert names == ["3 (single-shot)", "24 (single-shot)", "3->24 (K=40)",
                   "funnel 3->6->24 (K=60,10)"]
  assert [r["kind"] for r in rows] == ["single_shot", "single_shot", "adaptive", "funnel"]
  counts = np.bincount(db_y, minlength=5)
  canonical = canonical_rows(db)
  for row in rows:
    if row["kind"] == "single_shot":
      _, order = reference_neighbors(q, db, row["shortlist_size"], 10)
    else:
      order = _numpy_funnel(q, db, row["shortlist_size"], [tuple(s) for s in row["stages"]])
    want = reference_metrics(db_y[order], q_y, counts, [], [5, 10])
    assert set(want) <= set(row), (row["name"], sorted(row))
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
  assert by_name["24 (single-shot)"]["mflops"] == pytest.approx(200 * 24 / 1e6, rel=1e-12)
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


@pytest.mark.parametrize("devices,chunk_rows,on_device", [(1, 0, True), (2, 0, False),
                                                          (1, 64, False), (1, 200, True)])
def test_timed_passes_hold_only_the_search_and_the_rerank(monkeypatch, devices, chunk_rows,
                                                          on_device):
  """A clock that advances 1 s per reading: each timed pass holds exactly one search or rerank
  of every query (warm-ups and database preparation happen between passes), a funnel's seconds
  are its shortlist's plus its rerank's, and the rerank gathers the candidates on the device
  exactly when the whole database is prepared on one device (not sharded, not streamed)."""
  db, db_y, q, q_y = random_problem(4)
  search = knn.ExactSearch(sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:devices]),
                           query_block=16, database_block=64, chunk_rows=chunk_rows)
  events = _record_timed_calls(monkeypatch, search)
  rows = ar.evaluate([ar.Funnel(3, ((6, 40), (24, 10)))], db, db_y, q, q_y, search=search,
                     num_classes=5, retrieval_ks=[10])
  starts = [i for i, e in enumerate(events) if e == "tick"][::2]
  timed = [events[i + 1:i + 3] for i in starts]
  assert timed == [[("search", len(q)), "tick"]] * 3 + [[("rerank", len(q), on_device), "tick"]]
  if not 0 < chunk_rows < len(db):  # not streamed: each search compiled before its timer
    assert [events[i - 1] for i in starts[:3]] == [("search", 1)] * 3
  reranks = [e for e in events if e[0] == "rerank"]
  assert reranks == [("rerank", 1, on_device), ("rerank", len(q), on_device)]
  assert events.index(reranks[0]) < starts[-1]  # the warm-up comes before the timed rerank
  seconds = {r["name"]: r["seconds"] for r in rows}
  assert seconds == {"3 (single-shot)": 1.0, "24 (single-shot)": 1.0,
                     "funnel 3->6->24 (K=40,10)": 2.0}
  assert [r["wallclock_speedup_vs_exact"] for r in rows] == [1.0, 1.0, 0.5]
  assert rows[-1]["ms_per_query_block"] == pytest.approx(1e3 * 2.0 / 3)  # 40 queries / 16


def test_the_hnsw_shortlist_is_timed_after_a_one_query_warm_up(monkeypatch):
  db, db_y, q, q_y = random_problem(4)
  search = _search()
  events = _record_timed_calls(monkeypatch, search)
  rows = ar.evaluate([ar.Funnel(3, ((24, 40),))], db, db_y, q, q_y, search=search,
                     num_classes=5, retrieval_ks=[10], engines=("hnsw",),
                     hnsw=ann.HnswParams(16, 100, 128))
  starts = [i for i, e in enumerate(events) if e == "tick"][::2]
  timed = [events[i + 1:i + 3] for i in starts]
  assert timed[2:4] == [[("ann", len(q)), "tick"], [("rerank", len(q), True), "tick"]]
  assert [e for e in events if e[0] == "ann"] == [("ann", 1), ("ann", len(q))]
  assert rows[-1]["name"] == "3->24 (K=40) [hnsw]" and rows[-1]["seconds"] == 2.0


def _record_timed_calls(monkeypatch, search) -> list:
  """Replaces adaptive_retrieval's clock by one that advances 1 s per reading ("tick") and
  records, in order, the searches, database preparations, HNSW searches and reranks (with the
  number of queries; for a rerank, whether it gathers on the device)."""
  events, ticks = [], iter(range(1000))
  monkeypatch.setattr(ar, "time", types.SimpleNamespace(
      perf_counter=lambda: events.append("tick") or float(next(ticks))))

  def spy(name, original, queries_arg=0):
    def call(*args, **kwargs):
      events.append((name, len(args[queries_arg])))
      return original(*args, **kwargs)
    return call

  for name in ("search", "prepare"):
    monkeypatch.setattr(search, name, spy(name, getattr(search, name)))
  monkeypatch.setattr(ar.ann, "search", spy("ann", ar.ann.search, queries_arg=1))
  original_rerank = ar.rerank

  def rerank(queries, *args, prepared=None, **kwargs):
    events.append(("rerank", len(queries), prepared is not None))
    return original_rerank(queries, *args, prepared=prepared, **kwargs)

  monkeypatch.setattr(ar, "rerank", rerank)
  return events
