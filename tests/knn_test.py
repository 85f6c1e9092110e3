"""Exact blocked, sharded search against a float64 numpy brute force."""


import jax
import numpy as np
import pytest

from mrl_jax import sharding
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import metrics
from tests.references import canonical_rows
from tests.references import random_problem
from tests.references import reference_metrics
from tests.references import reference_neighbors


@pytest.mark.parametrize("devices, query_block, database_block, chunk_rows", [
    (1, 1000, 100000, None),  # unblocked
    (1, 7, 13, None),  # blocks that do not divide anything
    (8, 16, 9, None),  # sharded over 8 devices
    (8, 11, 5, 97),  # sharded + database streamed in chunks
])
def test_blocked_sharded_search_metrics_equal_numpy_brute_force(devices, query_block,
                                                                database_block, chunk_rows):
  db, db_y, q, q_y = random_problem(0)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:devices])
  search = knn.ExactSearch(mesh, query_block=query_block, database_block=database_block,
                           chunk_rows=chunk_rows)
  counts = np.bincount(db_y, minlength=5)
  for m in (3, 6, 24):
    scores, index = search.search(q, db, m, 10)
    ref_scores, ref_index = reference_neighbors(q, db, m, 10)
    canonical = canonical_rows(db)
    np.testing.assert_array_equal(canonical[index], canonical[ref_index])
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    got = metrics.neighbor_metrics(db_y[index], q_y, counts[q_y], [1, 3, 10], [1, 5, 10])
    want = reference_metrics(db_y[ref_index], q_y, counts, [1, 3, 10], [1, 5, 10])
    assert got.keys() == want.keys()
    for key in want:
      assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_sharded_search_equals_single_device_on_8_devices_with_fsdp_axis():
  db, _, q, _ = random_problem(3)
  one = knn.ExactSearch(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  many = knn.ExactSearch(sharding.make_mesh({"data": 2, "fsdp": 4}), query_block=8,
                         database_block=16)
  for m in (3, 24):
    s1, i1 = one.search(q, db, m, 7)
    s8, i8 = many.search(q, db, m, 7)
    canonical = canonical_rows(db)
    np.testing.assert_array_equal(canonical[i1], canonical[i8])
    np.testing.assert_allclose(s1, s8, atol=1e-6)


def test_k_larger_than_the_database_is_refused():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match=r"k=5 must be in \[1, 3\]"):
    knn.ExactSearch(mesh).search(np.ones((2, 4), np.float32), np.ones((3, 4), np.float32), 4, 5)


