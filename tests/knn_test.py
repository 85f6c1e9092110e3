"""Exact blocked, sharded search against a float64 numpy brute force (a stable full sort)."""


import jax
import numpy as np
import pytest

from mrl_jax import sharding
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import metrics
from tests.references import random_problem
from tests.references import reference_metrics
from tests.references import reference_neighbors


# (devices, query_block, database_block, chunk_rows, sub_block, group): every path of the
# selection runs on 200 rows: no pruning (k x sub_block >= a device's rows), pruning by
# sub-block maxima, and super-blocks first (more than group x k sub-blocks).
LAYOUTS = [
    (1, 1000, 100000, None, 32, 16),  # one block, every row a candidate
    (1, 7, 13, None, 2, 3),  # blocks that do not divide anything, pruned
    (1, 7, 12, None, 2, 3),  # pruned, super-blocks first
    (8, 16, 9, None, 32, 16),  # sharded over 8 devices
    (8, 11, 12, None, 2, 3),  # sharded, pruned on every device
    (8, 11, 5, 97, 2, 3),  # sharded + database streamed in chunks
    (2, 11, 12, 97, 2, 3),  # sharded + chunks, pruned, super-blocks first
]


@pytest.mark.parametrize("devices, query_block, database_block, chunk_rows, sub_block, group",
                         LAYOUTS)
def test_blocked_sharded_search_metrics_equal_numpy_brute_force(devices, query_block,
                                                                database_block, chunk_rows,
                                                                sub_block, group):
  db, db_y, q, q_y = random_problem(0)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:devices])
  search = knn.ExactSearch(mesh, query_block=query_block, database_block=database_block,
                           chunk_rows=chunk_rows, sub_block=sub_block, group=group)
  counts = np.bincount(db_y, minlength=5)
  for m in (3, 6, 24):
    scores, index = search.search(q, db, m, 10)
    ref_scores, ref_index = reference_neighbors(q, db, m, 10)
    np.testing.assert_array_equal(index, ref_index)  # duplicate rows: lower index first
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    got = metrics.neighbor_metrics(db_y[index], q_y, counts[q_y], [1, 3, 10], [1, 5, 10])
    want = reference_metrics(db_y[ref_index], q_y, counts, [1, 3, 10], [1, 5, 10])
    assert got.keys() == want.keys()
    for key in want:
      assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_sharded_search_equals_single_device_on_8_devices_with_fsdp_axis():
  db, _, q, _ = random_problem(3)
  one = knn.ExactSearch(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]),
                        query_block=8)
  many = knn.ExactSearch(sharding.make_mesh({"data": 2, "fsdp": 4}), query_block=8,
                         database_block=16, chunk_rows=61, sub_block=2, group=2)
  for m in (3, 24):
    s1, i1 = one.search(q, db, m, 7)
    s8, i8 = many.search(q, db, m, 7)
    np.testing.assert_array_equal(i1, i8)
    np.testing.assert_allclose(s1, s8, rtol=0, atol=3e-7)  # reductions may round by layout


@pytest.mark.parametrize("devices, chunk_rows", [(1, None), (8, None), (8, 50)])
def test_many_equal_scores_keep_the_lowest_indices(devices, chunk_rows):
  """15 copies of one row spread over blocks, devices and chunks, all at the top: a stable
  sort keeps the 10 lowest indices; more copies of a second row tie further down."""
  rng = np.random.default_rng(0)
  db = rng.normal(size=(200, 8)).astype(np.float32)
  q = rng.normal(size=(4, 8)).astype(np.float32)
  top = rng.choice(200, 15, replace=False)
  db[top] = q[0] * 3  # the same cosine (1) for all copies, whatever their norm
  second = np.setdiff1d(rng.choice(200, 30, replace=False), top)
  db[second] = q[0] + 0.5 * rng.normal(size=8).astype(np.float32)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:devices])
  search = knn.ExactSearch(mesh, query_block=3, database_block=8, chunk_rows=chunk_rows,
                           sub_block=2, group=2)
  scores, index = search.search(q, db, 8, 30)
  np.testing.assert_array_equal(index[0, :10], np.sort(top)[:10])
  np.testing.assert_array_equal(index[0, 15:15 + len(second)], np.sort(second)[:15])
  assert len(set(scores[0, :15].tolist())) == 1
  ref_scores, ref_index = reference_neighbors(q, db, 8, 30)
  np.testing.assert_array_equal(index[1:], ref_index[1:])


def test_k_larger_than_the_database_is_refused():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match=r"k=5 must be in \[1, 3\]"):
    knn.ExactSearch(mesh).search(np.ones((2, 4), np.float32), np.ones((3, 4), np.float32), 4, 5)


