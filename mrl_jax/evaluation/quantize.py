"""Quantised Matryoshka embeddings: int8 per-dimension calibrated, and binary (sign bits).

A size-m embedding (the prefix, L2-renormalised) is stored as
- `int8`: per dimension, the calibration set's [min, max] range is cut into 256 steps and each
  value becomes its step index - 128 (sentence-transformers' `quantize_embeddings(...,
  "int8")`, the ranges from the corpus): m bytes per vector (+ 2 x m floats per corpus);
- `binary`: the sign bits, packed 8 per byte (`np.packbits(x > 0)`): ceil(m / 8) bytes.
Retrieval with quantised corpus vectors shortlists `rescore_multiplier` x k candidates by the
quantised score (int8 x int8 dot products; binary: fewest differing bits, the Hamming distance)
and rescores them with the float query against the corpus vectors as stored, dequantised
(int8: the middle of each step; binary: +-1), as sentence-transformers' `semantic_search_*`
rescoring does (it multiplies by the raw int8 steps / 0-1 bits; the dequantised values rank
identically for binary and more accurately for int8). Pair scores (Spearman) use the cosine of
the dequantised vectors of both texts: for binary computed exactly from the Hamming distance h
of the packed bits, (m - 2h) / m, so pairs at the same distance tie exactly (the float cosine
of +-1 vectors rounds differently per pair and breaks those ties, which moves a rank
correlation); for int8 in float64.
"""

import numpy as np

from mrl_jax.errors import ConfigError

KINDS = ("int8", "binary")


def bytes_per_vector(kind: str | None, size: int) -> int:
  """Storage of one size-m vector: float32 4m, int8 m, binary ceil(m / 8)."""
  return {None: 4 * size, "int8": size, "binary": -(-size // 8)}[kind]


def check_kind(kind: str | None) -> None:
  if kind is not None and kind not in KINDS:
    raise ConfigError(f"quantize={kind!r}; allowed: None, {', '.join(map(repr, KINDS))}")


def int8_ranges(calibration: np.ndarray) -> np.ndarray:
  """[2, d] per-dimension (min, max) of the calibration embeddings (at least 2, as
  sentence-transformers asks: one embedding gives empty ranges and every code -128)."""
  calibration = np.asarray(calibration, np.float32)
  if len(calibration) < 2:
    raise ConfigError(f"int8 ranges from {len(calibration)} embedding(s); calibrate on at least "
                      "2 representative embeddings, or pass ranges")
  return np.stack([calibration.min(0), calibration.max(0)])


def check_ranges(ranges: np.ndarray, size: int) -> None:
  """int8 ranges must be [2, size] (min row, max row) at the size being quantised."""
  shape = tuple(np.shape(ranges))
  if shape != (2, size):
    raise ConfigError(f"int8 ranges of shape {list(shape)} for size-{size} embeddings; "
                      f"allowed: [2, {size}] (per-dimension min and max at that size)")


def quantize(x: np.ndarray, kind: str, ranges: np.ndarray | None = None) -> np.ndarray:
  """int8 [N, d] (step index - 128 of each dimension's range) or packed bits uint8 [N, d/8]."""
  check_kind(kind)
  x = np.asarray(x, np.float32)
  if kind == "binary":
    return np.packbits(x > 0, axis=-1)
  ranges = int8_ranges(x) if ranges is None else ranges
  steps = (ranges[1] - ranges[0]) / 255.0
  steps = np.where(steps == 0, 1.0, steps)
  return (np.clip(np.floor((x - ranges[0]) / steps), 0, 255) - 128).astype(np.int8)


def dequantize(q: np.ndarray, kind: str, size: int, ranges: np.ndarray | None = None
               ) -> np.ndarray:
  """float32 [N, size]: the middle of each int8 step, or +-1 per bit. A dimension of zero range
  (constant over the calibration set, e.g. a dead ReLU unit) is its value: quantize's stand-in
  step of 1 would put it at min + 0.5, a large shift of a unit vector's cosines."""
  if kind == "binary":
    return np.unpackbits(q, axis=-1)[:, :size].astype(np.float32) * 2.0 - 1.0
  steps = (ranges[1] - ranges[0]) / 255.0
  return ranges[0] + (q.astype(np.float32) + 128.0 + 0.5) * steps


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def quantized_scores(queries_q: np.ndarray, corpus_q: np.ndarray, kind: str) -> np.ndarray:
  """[Q, N] shortlist scores, higher = nearer: int8 dot products (int32), or minus the Hamming
  distance of the packed bits."""
  if kind == "binary":
    return -hamming(queries_q[:, None, :], corpus_q[None, :, :]).astype(np.int32)
  return queries_q.astype(np.int32) @ corpus_q.astype(np.int32).T


def search(queries: np.ndarray, corpus: np.ndarray, k: int, kind: str | None, *,
           rescore_multiplier: int = 4, ranges: np.ndarray | None = None) -> np.ndarray:
  """[Q, k] corpus ids, nearest first (equal scores: lower id first), for float queries [Q, m]
  against a corpus [N, m] stored at `kind` (None: float, exact cosine). Quantised: shortlist
  rescore_multiplier x k by the quantised score (4; sentence-transformers' semantic_search_*
  default 2), then rescore by float query . dequantised corpus vector. int8 ranges come from
  the corpus unless given."""
  queries, corpus = _unit(queries), _unit(corpus)
  k = min(k, len(corpus))
  if kind is None:
    return np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :k]
  ranges = int8_ranges(corpus) if kind == "int8" and ranges is None else ranges
  corpus_q = quantize(corpus, kind, ranges)
  shortlist_k = min(len(corpus), rescore_multiplier * k)
  shortlist = np.argsort(-quantized_scores(quantize(queries, kind, ranges), corpus_q, kind),
                         axis=1, kind="stable")[:, :shortlist_k]
  stored = dequantize(corpus_q, kind, corpus.shape[1], ranges)
  rescored = np.einsum("qd,qkd->qk", queries, stored[shortlist])
  return np.take_along_axis(shortlist, np.argsort(-rescored, axis=1, kind="stable")[:, :k], 1)


def hamming(a_bits: np.ndarray, b_bits: np.ndarray) -> np.ndarray:
  """[N] int: differing bits of row pairs of packed bits (padding bits are 0 on both sides)."""
  return np.unpackbits(np.bitwise_xor(a_bits, b_bits), axis=-1).sum(-1, dtype=np.int64)


def pair_cosines(a: np.ndarray, b: np.ndarray, kind: str | None,
                 ranges: np.ndarray | None = None) -> np.ndarray:
  """[N] cosine of row pairs, after storing both at `kind` (int8 ranges: from both sides);
  binary: exactly (m - 2 * Hamming) / m."""
  a, b = _unit(a), _unit(b)
  if kind == "binary":
    size = a.shape[1]
    return (size - 2.0 * hamming(quantize(a, kind), quantize(b, kind))) / size
  if kind == "int8":
    ranges = int8_ranges(np.concatenate([a, b])) if ranges is None else ranges
    a = dequantize(quantize(a, kind, ranges), kind, a.shape[1], ranges).astype(np.float64)
    b = dequantize(quantize(b, kind, ranges), kind, b.shape[1], ranges).astype(np.float64)
    a, b = (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) for x in (a, b))
  return np.sum(a * b, axis=-1)
