"""n-shot nearest-class-mean accuracy and the rare classes, on hand-made cases."""


import numpy as np

from mrl_jax.evaluation import fewshot


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




def test_classes_smaller_than_the_shot_count_use_all_their_examples():
  """Class 1 has 2 training examples, shots = 5: its mean is the mean of those 2 (every draw),
  the other classes' means are of 5 of theirs."""
  rng = np.random.default_rng(0)
  feats = np.concatenate([rng.normal(size=(20, 4)) + [5, 0, 0, 0],
                          np.array([[0, 5.0, 0, 0], [0, 4.0, 1, 0]]),
                          rng.normal(size=(20, 4)) + [0, 0, 5, 0]])
  labels = np.array([0] * 20 + [1] * 2 + [2] * 20)
  for draw in range(3):
    means = fewshot.class_means(feats, labels, 4, 5, 3, np.random.default_rng(draw))
    two = feats[20:22] / np.linalg.norm(feats[20:22], axis=1, keepdims=True)
    want = two.mean(0) / np.linalg.norm(two.mean(0))
    np.testing.assert_allclose(means[1], want, atol=1e-12)
  rows = fewshot.evaluate(feats, labels, feats[20:22], labels[20:22], [4], [5], draws=3)
  assert rows[0]["accuracy"] == 1.0 and rows[0]["accuracy_std"] == 0.0
