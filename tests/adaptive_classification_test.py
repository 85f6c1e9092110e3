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




def _numpy_cascade_rows(conf, pred, labels, sizes, fit, score):
  """Thresholds by brute force on `fit` (smallest t of linspace(0.1, 1, 100) with the best
  accuracy of 'small if conf > t else large'), then each example of `score` walks the sizes."""
  grid = np.linspace(0.1, 1.0, 100)
  thresholds = []
  for i in range(len(sizes) - 1):
    accuracy = [np.mean([(pred[i, e] if conf[i, e] > t else pred[i + 1, e]) == labels[e]
                         for e in fit]) for t in grid]
    thresholds.append(grid[int(np.flatnonzero(np.isclose(accuracy, max(accuracy)))[0])])
  rows = {}
  for cap in range(1, len(sizes)):
    correct, used = [], []
    for e in score:
      i = next((i for i in range(cap) if conf[i, e] > thresholds[i]), cap)
      correct.append(pred[i, e] == labels[e])
      used.append(sizes[i])
    rows[sizes[cap]] = (np.mean(correct), np.mean(used), thresholds[:cap])
  return rows


def test_thresholds_are_fitted_on_the_holdout_and_scored_on_the_rest():
  """One seed against numpy: the holdout is the first round(holdout * n) of the seed's
  permutation (the official cascades' split) and the cascade is scored on the others only.
  The data make the two parts disagree, so fitting and scoring on swapped parts fails."""
  rng = np.random.default_rng(5)
  n, sizes = 300, [2, 4, 8]
  labels = rng.integers(0, 4, n)
  conf = rng.uniform(0.2, 1.0, (3, n))
  right = rng.uniform(size=(3, n)) < np.where(conf > 0.6, 0.9, 0.4)
  pred = np.where(right, labels, (labels + 1) % 4)
  perm = np.random.default_rng(0).permutation(n)
  fit, score = perm[:90], perm[90:]
  want = _numpy_cascade_rows(conf, pred, labels, sizes, fit, score)
  swapped = _numpy_cascade_rows(conf, pred, labels, sizes, score, fit)
  assert any(not np.isclose(want[c][0], swapped[c][0]) for c in want)  # the parts differ
  rows = ac.evaluate(conf, pred, labels, sizes, holdout=0.3, seeds=1)
  for row in rows[:-1]:
    accuracy, expected_size, thresholds = want[row["cap"]]
    assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert row["expected_size"] == pytest.approx(expected_size, abs=1e-12)
    np.testing.assert_allclose(row["mean_thresholds"], thresholds, atol=1e-12)
    assert row["fixed_size_accuracy"] == pytest.approx(
        np.mean(pred[sizes.index(row["cap"])] == labels))


def test_a_confidence_equal_to_the_threshold_goes_to_the_larger_size():
  """The official rule is strict: the small head answers only when conf > t. Confidences that
  sit exactly on a threshold (and on the fitting grid) go on."""
  sizes = [8, 16]
  conf = np.array([[0.5, 0.5000001], [1.0, 1.0]])
  pred = np.array([[1, 1], [2, 2]])
  out, used = ac.cascade(conf, pred, sizes, thresholds=[0.5], cap=1)
  np.testing.assert_array_equal(used, [16, 8])
  # On the grid: the small head is right exactly where conf == GRID[50]; a threshold below
  # it (GRID[49]) lets those through, GRID[50] itself does not.
  conf_small = np.full(10, ac.GRID[50])
  labels = np.zeros(10, int)
  t = ac.fit_threshold(conf_small, np.zeros(10, int), np.ones(10, int), labels)
  assert t == ac.GRID[0]  # any t < conf is best; the smallest such t is chosen
  t = ac.fit_threshold(conf_small, np.ones(10, int), np.zeros(10, int), labels)
  assert t == ac.GRID[50]  # the small head is wrong: conf must not pass, conf > t is false


def test_thirty_seeds_by_default_and_at_least_one_holdout_example():
  """The official cascades average 30 random held-out splits; a tiny split still fits on one
  example (round(0.2 * 3) = 1) and scores the other two."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 3)
  conf, pred = rng.uniform(0.2, 1.0, (2, 3)), rng.integers(0, 2, (2, 3))
  row = ac.evaluate(conf, pred, labels, [4, 8])[0]
  assert row["seeds"] == 30 and row["holdout"] == 0.2
  perm = np.random.default_rng(0).permutation(3)
  want = _numpy_cascade_rows(conf, pred, labels, [4, 8], perm[:1], perm[1:])
  row = ac.evaluate(conf, pred, labels, [4, 8], seeds=1)[0]
  assert row["accuracy"] == pytest.approx(want[8][0]) and row["expected_size"] == (
      pytest.approx(want[8][1]))
