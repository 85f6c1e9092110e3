"""Adaptive classification: thresholds, cascades, the oracle, on hand-made cases."""


import numpy as np
import pytest

from mrl_jax.evaluation import adaptive_classification as ac


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


