"""Matryoshka MLM: tied logits at every size and the loss over real predictions, vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from mrl_jax.models import bert
from mrl_jax.models import mlm as mlm_model
from mrl_jax.objectives import mlm as mlm_objective
from tests.conftest import jit_build
from tests.losses_test import np_cross_entropy


def test_nested_tied_logits_equal_each_prefix_product():
  """logits_m = t[:, :m] E[:, :m]^T + b for every m, from one pass of block partial sums."""
  rng = np.random.default_rng(0)
  t = rng.normal(size=(2, 3, 16)).astype(np.float32)
  embedding = rng.normal(size=(40, 16)).astype(np.float32)
  bias = rng.normal(size=40).astype(np.float32)
  got = mlm_model.nested_tied_logits(t, embedding, bias, (2, 4, 16))
  for m in (2, 4, 16):
    want = t[..., :m].astype(np.float64) @ embedding[:, :m].T.astype(np.float64) + bias
    np.testing.assert_allclose(np.asarray(got[m]), want, rtol=1e-5, atol=1e-5)


def test_mlm_head_reads_the_masked_positions_through_berts_transform():
  """At each masked position: LayerNorm(GELU(W h + c)) . E[:, :m]^T + b, numpy from the
  module's own parameters; positions elsewhere never reach the logits."""
  def build():
    encoder = bert.Bert("tiny", vocab_size=60, max_len=16, dropout_rate=0.0,
                        attention_dropout_rate=0.0, rngs=nnx.Rngs(0))
    return mlm_model.MatryoshkaMlm(encoder, (8, 128), rngs=nnx.Rngs(1))
  model = jit_build(build)
  rng = np.random.default_rng(1)
  model.bias[...] = jnp.asarray(rng.normal(size=60), jnp.float32)
  model.norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 128), jnp.float32)
  ids = rng.integers(5, 60, (2, 10)).astype(np.int32)
  batch = {"input_ids": ids, "segment_ids": np.zeros_like(ids), "input_mask": np.ones_like(ids),
           "masked_positions": np.array([[1, 4], [7, 2]], np.int32)}
  graphdef, state = nnx.split(model)
  _, logits = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))(state, batch)
  _, aux = jax.jit(lambda s, b: nnx.merge(graphdef, s).encoder(b))(state, batch)
  h = np.take_along_axis(np.asarray(aux["tokens"], np.float64),
                         batch["masked_positions"][..., None], axis=1)
  w, c = np.asarray(model.dense.kernel[...]), np.asarray(model.dense.bias[...])
  x = h @ w + c
  x = 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))  # exact GELU
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
  x = x * np.asarray(model.norm.scale[...]) + np.asarray(model.norm.bias[...])
  embedding = np.asarray(model.encoder.word.embedding[...], np.float64)
  for m in (8, 128):
    want = x[..., :m] @ embedding[:, :m].T + np.asarray(model.bias[...])
    np.testing.assert_allclose(np.asarray(logits[m]), want, rtol=1e-4, atol=1e-4)


def test_mlm_loss_counts_real_predictions_only():
  """The per-size loss is the mean CE over predictions with weight 1 (padding predictions,
  weight 0, hold garbage targets); one size: plain masked-LM cross-entropy. Accuracy the same
  way; the total is the weighted sum over sizes."""
  rng = np.random.default_rng(2)
  logits = {m: jnp.asarray(rng.normal(size=(2, 3, 7)) * 30, jnp.float32) for m in (4, 8)}
  batch = {"masked_ids": np.array([[1, 2, 6], [0, 3, 3]], np.int32),
           "masked_weights": np.array([[1, 1, 0], [1, 0, 0]], np.float32)}
  loss, metrics = mlm_objective.mlm_loss(logits, batch, jnp.asarray([1.0, 0.5]))
  real = batch["masked_weights"].reshape(-1) > 0
  targets = batch["masked_ids"].reshape(-1)[real]
  want = 0.0
  for m, w in ((4, 1.0), (8, 0.5)):
    flat = np.asarray(logits[m]).reshape(-1, 7)[real]
    ce = np_cross_entropy(flat, targets, 0.0).mean()
    assert float(metrics[f"loss@{m}"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics[f"mlm_acc@{m}"]) == pytest.approx(np.mean(flat.argmax(1) == targets))
    want += w * ce
  assert float(loss) == pytest.approx(want, rel=1e-5)
