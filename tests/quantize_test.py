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
  np.testing.assert_array_equal(quantize.quantize(x, "int8"), quantize_embeddings(x, "int8"))
  ranges = quantize.int8_ranges(x[:20])
  np.testing.assert_array_equal(quantize.quantize(x, "int8", ranges),
                                quantize_embeddings(x, "int8", ranges=ranges))
  np.testing.assert_array_equal(quantize.quantize(x, "binary"),
                                quantize_embeddings(x, "ubinary"))
  assert [quantize.bytes_per_vector(k, 24) for k in (None, "int8", "binary")] == [96, 24, 3]
  assert quantize.bytes_per_vector("binary", 12) == 2


def test_dequantized_int8_is_within_half_a_step_and_binary_is_the_sign():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 10)).astype(np.float32)
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
    ranges = quantize.int8_ranges(corpus) if kind == "int8" else None
    cq, qq = quantize.quantize(corpus, kind, ranges), quantize.quantize(queries, kind, ranges)
    if kind == "binary":
      bits = lambda a: np.unpackbits(a, axis=-1).astype(int)
      score = -np.abs(bits(qq)[:, None, :] - bits(cq)[None, :, :]).sum(-1)
    else:
      score = qq.astype(np.int64) @ cq.astype(np.int64).T
    shortlist = np.argsort(-score, 1, kind="stable")[:, :15]
    stored = quantize.dequantize(cq, kind, 16, ranges)
    rescored = np.einsum("qd,qkd->qk", queries.astype(np.float32), stored[shortlist])
    want = np.take_along_axis(shortlist, np.argsort(-rescored, 1, kind="stable")[:, :5], 1)
    np.testing.assert_array_equal(got, want)
    assert np.mean(got[:, 0] == exact[:, 0]) > 0.7  # rescoring recovers most nearest ones


def test_unknown_kind_is_a_one_line_error():
  with pytest.raises(ConfigError, match="quantize='int4'; allowed: None, 'int8', 'binary'"):
    quantize.check_kind("int4")


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
