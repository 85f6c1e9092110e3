"""Adaptive retrieval and classification, baselines, linear probe, few-shot: independent checks."""

import json
import os

import jax
import numpy as np
import pytest

from mrl_jax import sharding
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import adaptive_classification as ac
from mrl_jax.evaluation import adaptive_retrieval as ar
from mrl_jax.evaluation import baselines
from mrl_jax.evaluation import evaluate
from mrl_jax.evaluation import fewshot
from mrl_jax.evaluation import knn
from mrl_jax.evaluation import probe
from tests.evaluation_test import _random_problem
from tests.evaluation_test import canonical_rows
from tests.evaluation_test import reference_neighbors


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
  db, _, q, _ = _random_problem(0)
  search = _search(8)
  _, shortlist = search.search(q, db, 3, len(db))  # K = N_db
  reranked = ar.rerank(q, db, shortlist, [(24, len(db))])
  _, exact = reference_neighbors(q, db, 24, len(db))
  canonical = canonical_rows(db)
  np.testing.assert_array_equal(canonical[reranked[:, :10]], canonical[exact[:, :10]])


@pytest.mark.parametrize("stages", [((24, 50),), ((6, 80), (12, 40), (24, 10))])
def test_shortlist_and_funnel_equal_a_numpy_reference(stages):
  db, _, q, _ = _random_problem(1)
  _, shortlist = _search().search(q, db, 3, stages[0][1])
  got = ar.rerank(q, db, shortlist, stages)
  want = _numpy_funnel(q, db, 3, stages)
  canonical = canonical_rows(db)
  np.testing.assert_array_equal(canonical[got], canonical[want])


def test_one_stage_funnel_spec_equals_the_two_stage_lists():
  funnels = ar.parse_funnels("8", "64", "20", "8:64:20", feature_dim=64)
  assert funnels[0] == funnels[1] == ar.Funnel(8, ((64, 20),))


def test_mflops_formula_reproduces_the_papers_imagenet_numbers():
  n = 1_281_167  # ImageNet-1K train images (the database)
  # 1,281,167 * 16 + 200 * 2048 = 20,908,272 -> 20.91 in the paper's table
  assert ar.Funnel(16, ((2048, 200),)).mflops(n) == pytest.approx(20.908272)
  funnel = ar.Funnel(8, ((16, 800), (32, 400), (64, 200), (128, 50), (2048, 10)))
  # 1,281,167 * 8 + 800*16 + 400*32 + 200*64 + 50*128 + 10*2048 = 10,314,616 -> 10.31
  assert funnel.mflops(n) == pytest.approx(10.314616)


def test_bad_funnel_specs_are_config_errors():
  with pytest.raises(ConfigError, match="is not 'Ds:Dr1,Dr2,...:K1,K2,...'"):
    ar.parse_funnels("", "", "", "8:16", feature_dim=64)
  with pytest.raises(ConfigError, match="one K per stage, non-increasing"):
    ar.parse_funnels("", "", "", "8:16,32:10,20", feature_dim=64)
  with pytest.raises(ConfigError, match=r"size 128 is outside \[1, 64\]"):
    ar.parse_funnels("8", "128", "10", "", feature_dim=64)


def test_adaptive_retrieval_rows_report_metrics_cost_and_speedup():
  db, db_y, q, q_y = _random_problem(2)
  rows = ar.evaluate(ar.parse_funnels("3", "24", "40", "3:6,24:60,10", 24), db, db_y, q, q_y,
                     search=_search(), num_classes=5, retrieval_ks=[10])
  names = [r["name"] for r in rows]
  assert names == ["3 (single-shot)", "24 (single-shot)", "3->24 (K=40)",
                   "funnel 3->6->24 (K=60,10)"]
  by_name = {r["name"]: r for r in rows}
  assert by_name["3->24 (K=40)"]["mflops"] == pytest.approx((200 * 3 + 40 * 24) / 1e6)
  assert by_name["24 (single-shot)"]["mflops_speedup_vs_exact"] == 1.0
  for r in rows:
    assert 0 <= r["map@10"] <= r["map@10_standard"] <= 1 and r["seconds"] > 0


# --- adaptive classification ------------------------------------------------------------------

def test_threshold_fitting_finds_the_known_best_threshold():
  conf = np.linspace(0.05, 1.0, 200)
  labels = np.zeros(200, int)
  pred_small = np.where(conf >= 0.62, 0, 1)  # the small head is right only when confident
  pred_large = np.zeros(200, int)  # the large head is always right
  t = ac.fit_threshold(conf, pred_small, pred_large, labels)
  wrong_max = conf[conf < 0.62].max()
  expected = ac.GRID[np.argmax(ac.GRID >= wrong_max)]  # smallest grid t with no wrong > t
  assert t == pytest.approx(expected)
  assert np.mean(np.where(conf > t, pred_small, pred_large) == labels) == 1.0


def test_cascade_uses_the_first_confident_size_and_counts_expected_size():
  sizes = [8, 16, 32]
  conf = np.array([[0.9, 0.2, 0.2, 0.2],
                   [0.9, 0.9, 0.2, 0.2],
                   [0.9, 0.9, 0.9, 0.2]])
  pred = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]])
  out, used = ac.cascade(conf, pred, sizes, thresholds=[0.5, 0.5], cap=2)
  np.testing.assert_array_equal(used, [8, 16, 32, 32])
  np.testing.assert_array_equal(out, [1, 2, 3, 3])
  assert used.mean() == pytest.approx((8 + 16 + 32 + 32) / 4)
  _, used_cap1 = ac.cascade(conf, pred, sizes, thresholds=[0.5, 0.5], cap=1)
  np.testing.assert_array_equal(used_cap1, [8, 16, 16, 16])


def test_oracle_on_a_hand_made_case():
  labels = np.array([0, 1, 2, 3])
  pred = np.array([[0, 9, 9, 9],   # size 8: right on example 0
                   [0, 1, 9, 9],   # size 16: right on 0, 1
                   [9, 1, 2, 9]])  # size 32: right on 1, 2; nobody gets example 3
  out = ac.oracle(pred, labels, [8, 16, 32])
  assert out["accuracy"] == 0.75
  assert out["expected_size"] == pytest.approx((8 + 16 + 32 + 32) / 4)
  assert out["solved_at_smallest"] == 0.25


def test_cascades_average_over_seeds_and_cover_every_cap():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 500)
  conf = rng.uniform(0.3, 1.0, (3, 500))
  pred = np.where(rng.uniform(size=(3, 500)) < [[0.6], [0.8], [0.95]], labels, (labels + 1) % 3)
  out = ac.evaluate(conf, pred, labels, [4, 8, 16], seeds=4)
  assert [(c["kind"], c["cap"]) for c in out] == [("cascade", 8), ("cascade", 16),
                                                   ("oracle", 16)]
  for c in out:
    assert 4 <= c["expected_size"] <= c["cap"] and 0 <= c["accuracy"] <= 1


# --- baselines and probe ----------------------------------------------------------------------

def test_pca_matches_numpy_svd_of_the_centred_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
  mean, vectors = baselines.pca_basis(x)
  _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
  for i in range(3):  # same components up to sign
    assert abs(abs(vectors[:, i] @ vt[i]) - 1.0) < 1e-8
  proj = baselines.projector("pca", 3, database=x, head_kernel=None)(x)
  np.testing.assert_allclose(proj.var(0, ddof=1), s[:3]**2 / 199, rtol=1e-8)
  np.testing.assert_allclose(mean, x.mean(0))


def test_svd_head_is_the_eckart_young_rank_m_approximation():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(16, 10))
  u, s, vt = np.linalg.svd(kernel, full_matrices=False)
  for m in (1, 4, 10):
    p, head = baselines.svd_head(kernel, m)
    approx = p @ head
    np.testing.assert_allclose(approx, (u[:, :m] * s[:m]) @ vt[:m], atol=1e-10)
    assert np.sum((kernel - approx)**2) == pytest.approx(np.sum(s[m:]**2))


def test_random_baselines_are_seeded_and_have_m_dimensions():
  x = np.random.default_rng(2).normal(size=(50, 12))
  for kind in ("random_projection", "random_subset"):
    a = baselines.projector(kind, 5, database=x, head_kernel=None)(x)
    b = baselines.projector(kind, 5, database=x, head_kernel=None)(x)
    assert a.shape == (50, 5)
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="unknown baseline 'ica'"):
    baselines.projector("ica", 5, database=x, head_kernel=None)


def test_linear_probe_reaches_the_least_squares_accuracy_on_separable_data():
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(4, 8)) * 4
  y = rng.integers(0, 4, 400)
  x = centers[y] + rng.normal(size=(400, 8))
  x1 = np.c_[x, np.ones(len(x))]
  w, *_ = np.linalg.lstsq(x1, np.eye(4)[y], rcond=None)  # closed-form one-hot regression
  lstsq_acc = np.mean(np.argmax(x1 @ w, 1) == y)
  lp = probe.LinearProbe(4, l2=1e-4, steps=100).fit(x, y)
  assert lstsq_acc > 0.95
  assert lp.accuracy(x, y) >= lstsq_acc
  assert lp.final_loss < 0.1


# --- few-shot ---------------------------------------------------------------------------------

def test_nearest_class_mean_on_a_hand_made_case():
  db = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
  db_y = np.array([0, 0, 1, 1])
  q = np.array([[3.0, 0.5], [0.2, 1.0]])
  rows = fewshot.evaluate(db, db_y, q, np.array([0, 1]), [2], [2], draws=2, num_classes=2)
  assert rows == [{"size": 2, "shots": 2, "accuracy": 1.0, "accuracy_std": 0.0, "draws": 2}]


def test_rare_classes_are_reported_when_the_training_split_is_imbalanced():
  labels = np.repeat(np.arange(10), [50] * 9 + [5])
  np.testing.assert_array_equal(fewshot.rare_classes(labels, 10), [9])
  assert fewshot.rare_classes(np.repeat(np.arange(10), 20), 10) is None
  rng = np.random.default_rng(0)
  db = rng.normal(size=(len(labels), 4)) + labels[:, None]
  queries = np.r_[0:20, len(labels) - 5:len(labels)]  # includes the rare class 9
  rows = fewshot.evaluate(db, labels, db[queries], labels[queries], [4], [1], num_classes=10)
  assert rows[0]["rare_classes"] == 1 and 0 <= rows[0]["rare_accuracy"] <= 1
  rows = fewshot.evaluate(db, labels, db[:20], labels[:20], [4], [1], num_classes=10)
  assert "rare_accuracy" not in rows[0]  # no query of a rare class: nothing to report


# --- eval.py, end to end ----------------------------------------------------------------------

@pytest.mark.slow
def test_eval_writes_adaptive_retrieval_classification_baselines_and_fewshot(trained_digits):
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  config.eval.update(adaptive_retrieval=True, shortlist_sizes="2,4", rerank_sizes="64",
                     shortlist_k="50", funnels="2:8,64:100,10", adaptive_classification=True,
                     ac_seeds=3, baselines="svd,pca,random_projection,random_subset",
                     probe_steps=30, fewshot_shots="1,5", fewshot_draws=2, knn_k="1",
                     retrieval_k="10")
  results = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])
  r = results["sklearn_digits"]
  out = os.path.join(workdir, "eval", "sklearn_digits")
  assert json.load(open(os.path.join(out, "results.json")))["adaptive_retrieval"]
  kinds = {row["kind"] for row in r["adaptive_retrieval"]}
  assert kinds == {"single_shot", "adaptive", "funnel"}
  caps = [c["cap"] for c in r["adaptive_classification"] if c["kind"] == "cascade"]
  assert caps == [4, 8, 16, 32, 64]
  assert r["adaptive_classification"][-1]["kind"] == "oracle"
  assert set(r["baselines"]) == {"svd", "pca", "random_projection", "random_subset"}
  assert set(r["baselines"]["pca"]) == {"2", "4", "8", "16", "32", "64"}
  assert all(0 <= m["linear_top1"] <= 1 and 0 <= m["knn1_top1"] <= 1
             for by_size in r["baselines"].values() for m in by_size.values())
  assert {(f["size"], f["shots"]) for f in r["fewshot"]} >= {(2, 1), (64, 5)}
  for name in ("adaptive_retrieval.csv", "retrieval_vs_mflops.png", "adaptive_classification.csv",
               "adaptive_classification.png", "baselines.csv", "fewshot.csv"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
