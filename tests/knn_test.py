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
    (1, 16, 4, None, 8, 2),  # blocks smaller than a sub-block, pruned
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




@pytest.mark.parametrize("devices, chunk_rows", [(1, None), (8, None), (2, 23)])
def test_padding_rows_never_displace_real_rows_when_every_cosine_is_negative(devices,
                                                                            chunk_rows):
  """Padding rows (to whole blocks) score 0 if unmasked; with every real cosine below 0 a
  padding-only sub-block would then win a pruned candidate slot. Queries of norm 0.01 also
  check that the returned scores are cosines whatever the query norm."""
  rng = np.random.default_rng(5)
  db = np.abs(rng.normal(size=(40, 8))).astype(np.float32) + 0.1
  q = -0.01 * np.abs(rng.normal(size=(6, 8))).astype(np.float32) / np.sqrt(8)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:devices])
  search = knn.ExactSearch(mesh, query_block=4, database_block=16, chunk_rows=chunk_rows,
                           sub_block=4, group=2)
  for k in (2, 5):
    scores, index = search.search(q, db, 8, k)
    ref_scores, ref_index = reference_neighbors(q, db, 8, k)
    assert (ref_scores < 0).all()
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_the_pruning_matmul_asks_for_full_float32_precision(monkeypatch):
  """XLA:CPU multiplies float32 at full precision whatever it is asked; a TPU or GPU would use
  bfloat16 passes by default and prune the wrong sub-blocks: the call must ask for HIGHEST."""
  precisions = []
  dot = knn.jnp.dot
  monkeypatch.setattr(knn.jnp, "dot", lambda *a, **kw: precisions.append(
      kw.get("precision")) or dot(*a, **kw))
  db, _, q, _ = random_problem(0)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  knn.ExactSearch(mesh, query_block=7, database_block=13, sub_block=2, group=3).search(
      q, db, 5, 10)
  assert precisions and set(precisions) == {jax.lax.Precision.HIGHEST}


def test_block_sizes_follow_their_documented_rules():
  """Hand-computed: a block is the database size rounded up to a power of two, at most
  database_block, then to whole sub-blocks; a device holds its share in whole blocks; a
  super-block is the largest divisor of the sub-blocks per block up to `group`; queries are
  scored in groups whose gathered [g, C, m] float32 block is at most 1 MiB (at least 4)."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:8])
  search = knn.ExactSearch(mesh, database_block=100, sub_block=32)
  assert [search.block_rows(n) for n in (1, 2, 3, 17, 33, 64, 65, 1000)] == [
      1, 2, 4, 32, 64, 64, 128, 128]  # 100 -> 128: whole sub-blocks
  assert knn.ExactSearch(mesh, database_block=4096).block_rows(5000) == 4096
  assert search._per_device(1000, 64) == 128  # ceil(1000 / 8) = 125 -> 2 blocks
  assert search._per_device(1025, 64) == 192  # 129 -> 3 blocks
  assert [knn._divisor_at_most(n, limit) for n, limit in
          ((12, 5), (12, 12), (7, 16), (1, 16), (16, 3), (9, 2), (30, 7), (4, 1))] == [
              4, 12, 7, 1, 2, 1, 6, 1]
  groups = []

  def fn(q, x):
    groups.append(q.shape[0])
    return (q[:, None, :] * x).sum(-1)

  for num, size, want in ((64, 64, 64), (16, 8, 2048), (1024, 2048, 4), (100, 24, 64),
                          (3, 5, 16384), (1, 1, 1 << 18)):
    groups.clear()
    q = jax.numpy.ones((5, size))
    out = knn.score_groups(fn, q, jax.numpy.ones((5, num, size)))
    assert groups == [want] and out.shape == (5, num), (num, size, groups)


@pytest.mark.parametrize("devices, chunk_rows", [(1, None), (8, 29)])
def test_every_row_is_its_own_nearest_neighbour_and_progress_counts_every_query(devices,
                                                                                chunk_rows):
  """Each of 100 distinct rows as a query (k = 1, the smallest allowed) finds itself, the
  first and last rows of every chunk and device included; progress reports each query block
  once, when the last chunk is done."""
  rng = np.random.default_rng(6)
  db = rng.normal(size=(100, 6)).astype(np.float32)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:devices])
  search = knn.ExactSearch(mesh, query_block=32, database_block=8, chunk_rows=chunk_rows,
                           sub_block=2, group=2)
  done = []
  scores, index = search.search(db, db, 6, 1, progress=done.append)
  np.testing.assert_array_equal(index[:, 0], np.arange(100))
  np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
  assert done == [32, 32, 32, 4]
  prepared = search.prepare(db, 6)
  assert [c.block for c in prepared.chunks] == [8] * len(prepared.chunks)
  wide = knn.ExactSearch(mesh, database_block=64)
  assert [c.block for c in wide.prepare(db, 6).chunks] == [64]  # by rows, not dimensions
  np.testing.assert_array_equal(search.search(db, prepared, 6, 1)[1][:, 0], np.arange(100))


def test_a_streamed_search_waits_for_each_chunk_before_copying_the_one_after_next(monkeypatch):
  """Dispatch is asynchronous: without a wait per chunk every chunk would be copied to the
  device before the first is searched. The search waits once per chunk, on the previous
  chunk's results (None for the first), so at most two chunks are on the device."""
  waited = []
  wait = knn.jax.block_until_ready
  monkeypatch.setattr(knn.jax, "block_until_ready", lambda x: waited.append(x) or wait(x))
  db, _, q, _ = random_problem(0)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  knn.ExactSearch(mesh, query_block=16, chunk_rows=70).search(q, db, 8, 5)
  assert len(waited) == 3 and waited[0] is None  # 200 rows in chunks of 70
  assert all(len(w) == 3 for w in waited[1:])  # the previous chunk's 3 query blocks


@pytest.mark.parametrize("size", [6, 24, 2048])
def test_a_rows_score_is_bitwise_the_same_whatever_the_candidate_list_it_sits_in(size):
  """dot_rows sums the products in one fixed order (knn.tree_sum), so a row's score is the same
  bits in a candidate list of any length (a reduce over the axis vectorised differently per
  shape: duplicate rows in two database chunks scored one ulp apart on an AMD EPYC host); the
  sum equals a float64 one to float32 rounding."""
  rng = np.random.default_rng(size)
  q = rng.normal(size=(4, size)).astype(np.float32)
  row = rng.normal(size=size).astype(np.float32)
  scores = []
  for length in (1, 3, 8, 97, 256):
    x = rng.normal(size=(4, length, size)).astype(np.float32)
    x[:, length // 2] = row
    scores.append(np.asarray(jax.jit(knn.dot_rows)(q, x))[:, length // 2])
  for s in scores[1:]:
    np.testing.assert_array_equal(s, scores[0])
  np.testing.assert_allclose(scores[0], q.astype(np.float64) @ row.astype(np.float64),
                             rtol=1e-5, atol=1e-5)
