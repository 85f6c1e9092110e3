"""Quantised embeddings: int8 and binary as sentence-transformers stores them; rescoring."""

import numpy as np
import pytest

from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import quantize


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_int8_and_binary_equal_sentence_transformers_quantize_embeddings():
  """Per-dimension ranges of the calibration set, 256 steps, minus 128; sign bits packed."""
  from sentence_transformers import quantize_embeddings  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = _unit(rng.normal(size=(50, 24))).astype(np.float32)
  x[:, 5] = 0.25  # a dimension of zero range: one step of 1, as sentence-transformers
  x[::3, 7] = 0.0  # exact zeros: sign bit 0 (> 0, not >= 0)
  np.testing.assert_array_equal(quantize.quantize(x, "int8"), quantize_embeddings(x, "int8"))
  ranges = quantize.int8_ranges(x[:20])
  np.testing.assert_array_equal(quantize.quantize(x, "int8", ranges),
                                quantize_embeddings(x, "int8", ranges=ranges))
  np.testing.assert_array_equal(quantize.quantize(x, "binary"),
                                quantize_embeddings(x, "ubinary"))
  assert [quantize.bytes_per_vector(k, 24) for k in (None, "int8", "binary")] == [96, 24, 3]
  assert [quantize.bytes_per_vector("binary", m) for m in (1, 8, 9, 12, 64, 65)] == [
      1, 1, 2, 2, 8, 9]


def test_dequantized_int8_is_within_half_a_step_and_binary_is_the_sign():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 10)).astype(np.float32)
  x[:, 3] = 0.0  # a dead unit: zero range, dequantised to its value, not min + 0.5
  ranges = quantize.int8_ranges(x)
  step = (ranges[1] - ranges[0]) / 255
  back = quantize.dequantize(quantize.quantize(x, "int8", ranges), "int8", 10, ranges)
  assert np.all(np.abs(back - x) <= step * 0.5 + 1e-5 + (x == ranges[1]) * step)
  bits = quantize.dequantize(quantize.quantize(x, "binary"), "binary", 10)
  np.testing.assert_array_equal(bits, np.where(x > 0, 1.0, -1.0))


def test_search_shortlists_by_the_quantised_score_then_rescores_in_float():
  """By hand: binary shortlist = fewest differing sign bits (numpy popcount), then the float
  query against the +-1 vectors; int8 shortlist = int8 dot products, rescored against the
  dequantised vectors. Equal to the numpy definition; exact (None) is the float argsort."""
  rng = np.random.default_rng(2)
  corpus = _unit(rng.normal(size=(200, 16)))
  queries = _unit(corpus[:20] + 0.05 * rng.normal(size=(20, 16)))
  exact = quantize.search(queries, corpus, 5, None)
  np.testing.assert_array_equal(exact, np.argsort(-(queries @ corpus.T), 1, kind="stable")[:, :5])
  for kind in ("binary", "int8"):
    got = quantize.search(queries, corpus, 5, kind, rescore_multiplier=3)
    np.testing.assert_array_equal(got, _by_definition(queries, corpus, 5, kind, 3))
    assert np.mean(got[:, 0] == exact[:, 0]) > 0.7  # rescoring recovers most nearest ones


def _by_definition(queries, corpus, k, kind, multiplier, ranges=None):
  """The quantised search written out: shortlist multiplier x k by the quantised score (int8
  dot products; binary: fewest differing bits), rescore by float query . stored vector."""
  queries, corpus = _unit(queries), _unit(corpus)
  ranges = quantize.int8_ranges(corpus) if kind == "int8" and ranges is None else ranges
  cq, qq = quantize.quantize(corpus, kind, ranges), quantize.quantize(queries, kind, ranges)
  if kind == "binary":
    bits = lambda a: np.unpackbits(a, axis=-1).astype(int)
    score = -np.abs(bits(qq)[:, None, :] - bits(cq)[None, :, :]).sum(-1)
  else:
    score = qq.astype(np.int64) @ cq.astype(np.int64).T
  shortlist = np.argsort(-score, 1, kind="stable")[:, :multiplier * k]
  stored = quantize.dequantize(cq, kind, corpus.shape[1], ranges)
  rescored = np.einsum("qd,qkd->qk", queries.astype(np.float32), stored[shortlist])
  return np.take_along_axis(shortlist, np.argsort(-rescored, 1, kind="stable")[:, :k], 1)


def test_search_orders_ties_by_lower_id_shortlists_four_times_k_and_uses_given_ranges():
  """Equal scores (duplicate corpus rows) come lowest id first, exact and quantised; the default
  shortlist is 4 x k (here 5 x k would give other ids); int8 ranges given are the ones used."""
  rng = np.random.default_rng(5)
  query = _unit(rng.uniform(0.5, 1.0, size=(1, 16)))
  duplicates = np.repeat(query * 0.5, 40, axis=0)
  for kind in (None, "int8", "binary"):
    np.testing.assert_array_equal(quantize.search(query, duplicates, 10, kind),
                                  [list(range(10))])
  # Three vectors, each repeated at shuffled rows: ties among scores that differ (numpy's
  # default quicksort keeps all-equal rows in order, not ties between other values).
  # (Seed 6: the quantised and float orders of the groups differ, so the rescoring sort
  # meets ties out of id order too.)
  tie_rng = np.random.default_rng(6)
  tie_query = _unit(tie_rng.uniform(0.5, 1.0, size=(1, 16)))
  groups = _unit(tie_rng.normal(size=(3, 16)))[tie_rng.integers(0, 3, 60)]
  score = (_unit(tie_query) @ groups.T)[0]
  want = sorted(range(60), key=lambda i: (-score[i], i))[:25]
  np.testing.assert_array_equal(quantize.search(tie_query, groups, 25, None), [want])
  for kind in ("int8", "binary"):
    np.testing.assert_array_equal(quantize.search(tie_query, groups, 10, kind),
                                  _by_definition(tie_query, groups, 10, kind, 4))
  corpus = _unit(rng.normal(size=(300, 16)))
  queries = _unit(corpus[:40] + 0.3 * rng.normal(size=(40, 16)))
  for kind in ("int8", "binary"):
    got = quantize.search(queries, corpus, 2, kind)
    np.testing.assert_array_equal(got, _by_definition(queries, corpus, 2, kind, 4))
    assert (got != _by_definition(queries, corpus, 2, kind, 5)).any()
  other = quantize.int8_ranges(rng.normal(size=(20, 16)) * 0.3)
  got = quantize.search(queries, corpus, 2, "int8", ranges=other)
  np.testing.assert_array_equal(got, _by_definition(queries, corpus, 2, "int8", 4, other))
  assert (got != quantize.search(queries, corpus, 2, "int8")).any()


def test_int8_similarity_of_a_dead_unit_is_the_vectors_own():
  """Pairs whose vectors share a dimension that is 0 everywhere (a dead ReLU unit): the int8
  cosine is within int8 rounding of the float cosine; dequantising that dimension to min + 0.5
  (the stand-in step) moved every such cosine by ~0.3."""
  rng = np.random.default_rng(6)
  a, b = np.abs(rng.normal(size=(30, 8))), np.abs(rng.normal(size=(30, 8)))
  a[:, 0] = b[:, 0] = 0.0
  exact = np.sum(_unit(a) * _unit(b), -1)
  np.testing.assert_allclose(quantize.pair_cosines(a, b, "int8"), exact, atol=0.02)


def test_unknown_kind_is_a_one_line_error():
  with pytest.raises(ConfigError, match="quantize='int4'; allowed: None, 'int8', 'binary'"):
    quantize.check_kind("int4")
  with pytest.raises(ConfigError, match="quantize='int4'"):
    quantize.quantize(np.ones((2, 8), np.float32), "int4")


def test_int8_ranges_need_two_embeddings_and_the_size_quantised():
  """One embedding has no range (every code would be -128): refused, as sentence-transformers
  refuses it; two are the fewest that calibrate. Ranges of another size are refused."""
  rng = np.random.default_rng(4)
  with pytest.raises(ConfigError, match=r"int8 ranges from 1 embedding\(s\); calibrate on at "
                                        r"least 2"):
    quantize.int8_ranges(rng.normal(size=(1, 8)))
  two = rng.normal(size=(2, 8)).astype(np.float32)
  np.testing.assert_array_equal(quantize.int8_ranges(two), np.stack([two.min(0), two.max(0)]))
  quantize.check_ranges(quantize.int8_ranges(two), 8)
  # A dimension constant over the calibration set has steps of 1 (sentence-transformers' rule):
  # a later value 1 above it is code 1 - 128.
  from sentence_transformers import quantize_embeddings  # pylint: disable=g-import-not-at-top
  calibration = np.array([[-0.5, 0.0], [-0.5, 1.0]], np.float32)
  x = np.array([[0.5, 0.5]], np.float32)
  ranges = quantize.int8_ranges(calibration)
  np.testing.assert_array_equal(quantize.quantize(x, "int8", ranges),
                                quantize_embeddings(x, "int8", ranges=ranges))
  assert quantize.quantize(x, "int8", ranges)[0, 0] == 1 - 128
  with pytest.raises(ConfigError, match=r"int8 ranges of shape \[2, 8\] for size-4 embeddings"):
    quantize.check_ranges(quantize.int8_ranges(two), 4)


def test_quantised_spearman_equals_scipy_on_exact_similarities_with_ties():
  """Lee's benchmark shape (1,225 pairs of 50 texts, human ratings with ties) at m = 384 and at
  a size that is not a whole byte. Binary: the reference similarity is exact integer arithmetic,
  (m - 2 * differing signs) / m as a Fraction, so pairs at one Hamming distance tie; the float
  cosine of +-1 vectors broke those ties (258 distinct scores for 89 distances on Lee at 384,
  0.412791 for 0.412477). int8: the cosine of sentence-transformers' int8 codes dequantised to
  each step's middle, in float64, with duplicated and swapped pairs (exact ties)."""
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from sentence_transformers import quantize_embeddings  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  texts = rng.normal(size=(50, 384)) + rng.normal(size=(1, 384))  # correlated, as real texts
  i, j = np.triu_indices(50, 1)
  i, j = np.concatenate([i, j[:40], i[:40]]), np.concatenate([j, i[:40], j[:40]])  # ties
  ratings = rng.integers(0, 5, len(i)).astype(np.float64)
  for m in (384, 13):
    a, b = texts[i, :m].astype(np.float32), texts[j, :m].astype(np.float32)
    signs_a, signs_b = a > 0, b > 0
    exact = [Fraction(m - 2 * int(np.sum(x != y)), m) for x, y in zip(signs_a, signs_b)]
    got = quantize.pair_cosines(a, b, "binary")
    assert len(set(got)) == len(set(exact))
    np.testing.assert_array_equal(got, [float(e) for e in exact])
    assert metrics.spearman(got, ratings) == pytest.approx(
        stats.spearmanr([float(e) for e in exact], ratings).statistic, abs=1e-12)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    both = unit(np.concatenate([a, b]))
    codes = quantize_embeddings(both, "int8").astype(np.float64)
    lo, hi = both.min(0).astype(np.float64), both.max(0).astype(np.float64)
    stored = unit(lo + (codes + 128.5) * (hi - lo) / 255)
    cosines = np.sum(stored[:len(a)] * stored[len(a):], -1)
    assert metrics.spearman(quantize.pair_cosines(a, b, "int8"), ratings) == pytest.approx(
        stats.spearmanr(cosines, ratings).statistic, abs=1e-9)
