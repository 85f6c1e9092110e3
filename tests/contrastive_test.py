"""Matryoshka contrastive losses against numpy and against sentence-transformers itself."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mrl_jax import contrastive
from mrl_jax import convert_hf
from mrl_jax import objectives
from mrl_jax.data import text
from tests.conftest import build_model
from tests.convert_hf_test import hf_config
from tests.convert_hf_test import tiny_config
from tests.convert_hf_test import write_vocab


def np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_info_nce(logits, symmetric=False, eps=0.0):
  """Row i's positive is column i: -log softmax(row)[i] (smoothed targets), in float64."""
  def rows(l):
    l = np.asarray(l, np.float64)
    logp = l - l.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    n = len(l)
    t = np.full((n, n), eps / n) + np.eye(n) * (1 - eps)
    return -(t * logp).sum(1)
  return 0.5 * (rows(logits) + rows(logits.T)) if symmetric else rows(logits)


def _pairs(seed=0, b=6, d=16):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(b, d)).astype(np.float32) * 3
  p = a + rng.normal(size=(b, d)).astype(np.float32)
  p[4] = p[3]  # repeated rows: two identical positives
  a[5, :4] = 0.0  # a zero 4-prefix: cosine 0 at size 4
  return a, p


def test_nested_cosines_equal_per_size_numpy():
  a, p = _pairs()
  got = contrastive.nested_cosines(jnp.asarray(a), jnp.asarray(p), (4, 8, 16))
  for m in (4, 8, 16):
    want = np_unit(a[:, :m]) @ np_unit(p[:, :m]).T
    np.testing.assert_allclose(np.asarray(got[m]), want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got[4])[5] == 0.0)


@pytest.mark.parametrize("symmetric, eps", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_info_nce_equals_numpy_with_large_logits(symmetric, eps):
  logits = np.random.default_rng(1).normal(size=(5, 5)) * 60.0  # softmax far from uniform
  got = contrastive.info_nce(jnp.asarray(logits, jnp.float32), symmetric=symmetric,
                             label_smoothing=eps)
  np.testing.assert_allclose(np.asarray(got), np_info_nce(logits, symmetric, eps), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_info_nce_gradient_is_both_softmaxes_minus_the_smoothed_targets(eps):
  """d/dl of mean_i 0.5 (row_i + col_i) = (softmax_rows + softmax_cols - 2 t) / (2B)."""
  n = 6
  logits = np.random.default_rng(2).normal(size=(n, n)) * 5.0
  got = jax.grad(lambda l: contrastive.info_nce(l, symmetric=True, label_smoothing=eps).mean())(
      jnp.asarray(logits, jnp.float32))
  softmax = lambda l, axis: np.exp(l - l.max(axis, keepdims=True)) / np.exp(
      l - l.max(axis, keepdims=True)).sum(axis, keepdims=True)
  t = np.full((n, n), eps / n) + np.eye(n) * (1 - eps)
  want = (softmax(logits, 1) + softmax(logits, 0) - 2 * t) / (2 * n)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-7)


def test_matryoshka_contrastive_loss_equals_sentence_transformers():
  """sum_m w_m * MultipleNegativesRankingLoss(shrink(a, m), shrink(p, m)) with sentence-
  transformers' own `shrink` (truncate, L2-normalise) and loss on the same embeddings; with
  one size, the plain MNRL loss."""
  from sentence_transformers.sentence_transformer.losses import matryoshka  # pylint: disable=g-import-not-at-top
  from sentence_transformers.sentence_transformer.losses import multiple_negatives_ranking as mnrl  # pylint: disable=g-import-not-at-top,line-too-long
  a, p = _pairs(2)
  reference = mnrl.MultipleNegativesRankingLoss(model=None, scale=20.0)
  sizes, weights = (4, 8, 16), (1.0, 0.5, 2.0)
  want = sum(w * float(reference.compute_loss_from_embeddings(
      [matryoshka.shrink(torch.from_numpy(a), m), matryoshka.shrink(torch.from_numpy(p), m)],
      None)) for m, w in zip(sizes, weights))
  got, metrics = contrastive.matryoshka_contrastive_loss(a, p, sizes, jnp.asarray(weights),
                                                         scale=20.0)
  assert float(got) == pytest.approx(want, rel=1e-5)
  single = float(reference.compute_loss_from_embeddings(
      [torch.from_numpy(a), torch.from_numpy(p)], None))
  got, _ = contrastive.matryoshka_contrastive_loss(a, p, (16,), jnp.ones(1), scale=20.0)
  assert float(got) == pytest.approx(single, rel=1e-5)
  cos = np_unit(a[:, :8]) @ np_unit(p[:, :8]).T
  # ties count as hits: rows 3 and 4 (identical positives) are both right
  assert float(metrics["acc@8"]) == pytest.approx(np.mean(np.diag(cos) >= cos.max(1)))


def np_kl(last, layer, t):
  p = np.exp(last / t - np.log(np.exp(last / t).sum(1, keepdims=True)))
  log_q = layer / t - np.log(np.exp(layer / t).sum(1, keepdims=True))
  return float((p * (np.log(p) - log_q)).sum() / len(last))


def test_2d_loss_equals_a_numpy_reference():
  """Last layer: sum_m w_m InfoNCE; each sampled earlier layer l: prior_w / n_sampled times its
  own weighted sum; plus T * kl_w * KL(softmax(unit(last)/T) || softmax(unit(layer)/T)) over
  all 2B texts, per sampled layer."""
  rng = np.random.default_rng(3)
  layers_a = rng.normal(size=(4, 6, 16)).astype(np.float32)
  layers_b = layers_a + rng.normal(size=(4, 6, 16)).astype(np.float32)
  sizes, last_w = (4, 16), np.array([1.0, 1.0], np.float32)
  prior_w = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
  mask = np.array([1.0, 0.0, 1.0], np.float32)

  def mrl(a, b, w):
    return sum(wi * np_info_nce(20 * np_unit(a[:, :m]) @ np_unit(b[:, :m]).T).mean()
               for m, wi in zip(sizes, w))

  final = np_unit(np.concatenate([layers_a[-1], layers_b[-1]]))
  want = 0.7 * mrl(layers_a[-1], layers_b[-1], last_w)
  for layer in range(3):
    if mask[layer]:
      want += mrl(layers_a[layer], layers_b[layer], prior_w[layer]) * 1.5 / 2
      want += 0.3 * 2.0 * np_kl(final, np_unit(np.concatenate([layers_a[layer],
                                                                layers_b[layer]])), 0.3)
  got, _ = contrastive.matryoshka_2d_loss(
      jnp.asarray(layers_a), jnp.asarray(layers_b), sizes, jnp.asarray(last_w),
      jnp.asarray(prior_w), jnp.asarray(mask), last_layer_weight=0.7, prior_layers_weight=1.5,
      kl_div_weight=2.0, kl_temperature=0.3)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_sampled_layers_are_k_distinct_and_vary():
  masks = np.stack([np.asarray(contrastive.sample_layers(jax.random.key(i), 5, 2))
                    for i in range(50)])
  assert (masks.sum(1) == 2).all() and len({tuple(m) for m in masks}) > 5
  assert (np.asarray(contrastive.sample_layers(jax.random.key(0), 5, 0)) == 1).all()


def test_2d_objective_equals_sentence_transformers_matryoshka2d_loss(tmp_path):
  """The whole 2D objective on a converted model against sentence-transformers' own
  Matryoshka2dLoss(MultipleNegativesRankingLoss) on the same (random) BERT with mean pooling
  and normalisation, every layer and every size (n_layers_per_step = n_dims_per_step = -1),
  dropout off: the same loss value."""
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from sentence_transformers import losses as st_losses  # pylint: disable=g-import-not-at-top
  from sentence_transformers import models as st_models  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf_dir = str(tmp_path / "hf")
  vocab = write_vocab(str(tmp_path))
  transformers.BertModel(hf_config()).save_pretrained(hf_dir)
  os.replace(vocab, os.path.join(hf_dir, "vocab.txt"))
  module = st_models.Transformer(hf_dir, max_seq_length=16)
  st = SentenceTransformer(modules=[module, st_models.Pooling(128, "mean"), st_models.Normalize()],
                           device="cpu")
  st.train()
  sizes = (8, 32, 128)
  loss = st_losses.Matryoshka2dLoss(st, st_losses.MultipleNegativesRankingLoss(st), list(sizes),
                                    n_layers_per_step=-1, n_dims_per_step=-1,
                                    kl_temperature=0.3)
  anchors = ["w1 w2 w3 ##a", "w4 w5", "w6 w7 w8 w9 w10", "w11 ##b ##c"]
  positives = ["w1 w3", "w5 w4 w4", "w8 w9", "w11 w12 w13 w14"]
  features = [st.tokenize(anchors), st.tokenize(positives)]
  want = float(loss(features, torch.zeros(4)))

  config = tiny_config(os.path.join(hf_dir, "vocab.txt"), objective="contrastive",
                       pool="mean")
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  config.mrl.nesting = ",".join(map(str, sizes))
  config.contrastive.update(two_d=True, layers_per_step=0, kl_temperature=0.3)
  spec, model, abstract_params, stats = build_model(config)
  params, _ = convert_hf.convert(convert_hf.load_state_dict(convert_hf.locate(hf_dir)[0]),
                                 config, spec, abstract_params)
  pp = text.from_config(config, task="pair", keys=("anchor", "positive"))
  batch = pp([{"anchor": a, "positive": p} for a, p in zip(anchors, positives)], np.arange(4), 0)
  objective = objectives.create(config, spec)
  module_ = model.module(params, stats, train=True)
  got, _ = objective.loss(module_, batch, rngs=nnx.Rngs(dropout=0),
                          weights=jnp.ones(len(sizes)), rng=jax.random.key(0))
  assert float(got) == pytest.approx(want, rel=1e-4)
