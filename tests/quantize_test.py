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
