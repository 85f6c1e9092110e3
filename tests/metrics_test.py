"""Metric formulas on hand-computed cases: retrieval, k-NN votes, multi-label relevance, mAP."""


import numpy as np
import pytest

from mrl_jax.evaluation import extract
from mrl_jax.evaluation import metrics


# --- hand-computed cases ----------------------------------------------------------------------

def test_map_precision_recall_hit_on_a_hand_computed_list():
  # Query label 3; ranked neighbour labels 3, 0, 3, 1 -> rel = 1, 0, 1, 0.
  # P@1 = 1, P@3 = 2/3: sum rel_i * P@i = 5/3. Paper AP@4 = (5/3)/4; standard = (5/3)/2.
  out = metrics.retrieval_metrics(np.array([[3, 0, 3, 1]]), np.array([3]),
                                  relevant=np.array([10]), ks=[4, 1])
  assert out["map@4"] == pytest.approx(5 / 12)
  assert out["map@4_standard"] == pytest.approx(5 / 6)
  assert out["precision@4"] == pytest.approx(0.5)
  assert out["recall@4"] == pytest.approx(0.2)  # 2 of the 10 class-3 items
  assert out["topk_hit@4"] == 1.0
  assert out["map@1"] == out["precision@1"] == 1.0
  # one relevant item in the database, found: recall 1 (the denominator is the count, not 2)
  one = metrics.retrieval_metrics(np.array([[0, 3]]), np.array([3]), np.array([1]), [2])
  assert one["recall@2"] == 1.0 and one["map@2_standard"] == pytest.approx(1 / 2)


def test_no_relevant_item_gives_zero_everywhere():
  out = metrics.retrieval_metrics(np.array([[1, 2]]), np.array([0]), np.array([5]), [2])
  assert all(v == 0.0 for v in out.values())


def test_knn_vote_tie_goes_to_the_nearest_class():
  # k=4: classes 7 and 2 have two votes each; 7 holds the nearest neighbour.
  assert metrics.knn_predict(np.array([[7, 2, 2, 7, 5]]), 4)[0] == 7
  assert metrics.knn_predict(np.array([[5, 2, 2, 7, 7]]), 5)[0] == 2  # 2 and 7 tie; 2 is nearer
  assert metrics.knn_predict(np.array([[5, 2, 2, 7, 7]]), 1)[0] == 5


# --- multi-label (JFT-style, ImageNet-ReaL) ------------------------------------------------------

def test_multi_label_relevance_counts_and_metrics_on_a_hand_worked_case():
  # Query labels {3, 5}; ranked neighbours' labels {5, 9}, {1}, {3}, {} -> rel 1, 0, 1, 0.
  neighbors = np.array([[[5, 9], [1, -1], [3, -1], [-1, -1]]])
  query = np.array([[3, 5]])
  assert metrics.relevance(neighbors, query).tolist() == [[True, False, True, False]]
  out = metrics.neighbor_metrics(neighbors, query, relevant=np.array([4]), knn_ks=[1],
                                 retrieval_ks=[4])
  assert out["knn1_top1"] == 1.0  # the nearest shares label 5
  assert out["map@4"] == pytest.approx((1 + 2 / 3) / 4)
  assert out["recall@4"] == pytest.approx(2 / 4) and out["precision@4"] == 0.5
  # A single-label database against multi-label queries (ImageNet-ReaL's case).
  single = metrics.relevance(np.array([[5, 2], [7, 7]]), np.array([[3, 5], [1, -1]]))
  assert single.tolist() == [[True, False], [False, False]]
  # class 0 is a label like any other; -1 (padding) matches nothing, not even -1
  zero = metrics.relevance(np.array([[[0, -1], [2, -1], [-1, -1]]]), np.array([[0, -1]]))
  assert zero.tolist() == [[True, False, False]]
  # multi-label neighbours, single-label queries
  mixed = metrics.relevance(np.array([[[1, 4], [0, -1]], [[2, -1], [3, 2]]]), np.array([4, 2]))
  assert mixed.tolist() == [[True, False], [True, True]]


def test_knn_vote_over_multi_label_neighbours():
  # k = 3 neighbours {2, 4}, {4}, {2}: labels 2 and 4 both get two votes; 2 came first.
  neighbors = np.array([[[2, 4], [4, -1], [2, -1]]])
  assert metrics.knn_predict(neighbors, 3).tolist() == [2]
  assert metrics.knn_accuracy(neighbors, np.array([[2, -1]]), 3) == 1.0
  assert metrics.knn_accuracy(neighbors, np.array([[4, -1]]), 3) == 0.0
  # 1-NN: right when any label of the nearest is the query's, not only its first
  assert metrics.knn_accuracy(np.array([[[9, 5], [1, -1]]]), np.array([[5, -1]]), 1) == 1.0
  # an unlabelled neighbour casts no vote, even when it is the nearest
  assert metrics.knn_predict(np.array([[[-1, -1], [5, -1], [2, -1]]]), 3).tolist() == [5]


def test_label_lists_and_unlabelled_queries():
  multi_hot = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
  lists = metrics.label_lists(multi_hot)
  assert lists.tolist() == [[1, 3], [-1, -1], [0, -1]]
  # the width is the most labels of any row, at least 1 (an empty split or no label at all)
  assert metrics.label_lists(np.array([[0, 0, 1], [1, 0, 0]])).tolist() == [[2], [0]]
  assert metrics.label_lists(np.zeros((2, 3))).tolist() == [[-1], [-1]]
  assert metrics.label_lists(np.zeros((0, 3))).shape == (0, 1)
  assert metrics.has_label(lists).tolist() == [True, False, True]
  kept = extract.Features(np.arange(6.0).reshape(3, 2), lists).labelled()
  assert kept.z.tolist() == [[0.0, 1.0], [4.0, 5.0]] and kept.labels.tolist() == [[1, 3], [0, -1]]


def test_relevant_counts_single_and_multi_label_databases():
  assert metrics.relevant_counts(np.array([0, 1, 1, 2]), np.array([1, 2])).tolist() == [2, 1]
  assert metrics.relevant_counts(np.array([0, 1, 1, 2]), np.array([[0, 1], [3, -1]])).tolist() \
      == [3, 0]
  # Items {0,1}, {1}, {2}, {0}: a query {0, 1} shares a label with 3 of them (the union).
  database = np.array([[0, 1], [1, -1], [2, -1], [0, -1]])
  assert metrics.relevant_counts(database, np.array([[0, 1], [2, -1]])).tolist() == [3, 1]
  # a query class that no database item has (and no num_classes): 0 relevant, not an error
  assert metrics.relevant_counts(np.array([0, 0, 1]), np.array([3, 0])).tolist() == [0, 2]
  assert metrics.relevant_counts(np.array([0, 0, 1]), np.array([[3, -1], [1, 4]])).tolist() \
      == [0, 1]
  assert metrics.relevant_counts(database, np.array([[5, -1], [2, 4]])).tolist() == [0, 1]
  assert metrics.relevant_counts(database, np.array([[0, -1]]), num_classes=9).tolist() == [2]
  assert metrics.relevant_counts(database, np.array([[-1, -1]])).tolist() == [0]  # no label
  assert metrics.relevant_counts(database, np.zeros((0, 2), int)).tolist() == []  # no query
  assert metrics.relevant_counts(np.array([0, 1]), np.zeros(0, int)).tolist() == []


def test_class_mean_average_precision_equals_sklearn():
  from sklearn.metrics import average_precision_score  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  truth = (rng.random((60, 5)) < 0.3).astype(int)
  truth[:, 4] = 0  # a class without positives does not count
  scores = rng.normal(size=(60, 5))
  want = np.mean([average_precision_score(truth[:, c], scores[:, c]) for c in range(4)])
  assert metrics.class_mean_average_precision(scores, truth) == pytest.approx(want)
  assert metrics.class_mean_average_precision(scores, metrics.label_lists(truth)) == (
      pytest.approx(want))


def test_class_mean_average_precision_ranks_ties_as_sklearn():
  """Scores rounded to 4 levels (many ties): equal to sklearn, and unchanged when the tied
  examples are reordered (ties count as one threshold, not by index)."""
  from sklearn.metrics import average_precision_score  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  truth = (rng.random((80, 6)) < 0.3).astype(int)
  scores = np.round(rng.random((80, 6)) * 3)
  want = np.mean([average_precision_score(truth[:, c], scores[:, c]) for c in range(6)])
  assert metrics.class_mean_average_precision(scores, truth) == pytest.approx(want, abs=1e-12)
  # classes with one positive (AP = 1 / its rank: 2, 3) and one with none (ignored);
  # no positive at all: 0
  one = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]])
  one_scores = np.array([[0.9, 0.1, 0.3], [0.5, 0.2, 0.1], [0.1, 0.8, 0.2]])
  assert metrics.class_mean_average_precision(one_scores[:, :1], one[:, :1]) == 0.5
  assert metrics.class_mean_average_precision(one_scores, one) == pytest.approx((1 / 2 + 1 / 3) / 2)
  assert metrics.class_mean_average_precision(one_scores, np.zeros((3, 3))) == 0.0
  perm = rng.permutation(80)
  assert metrics.class_mean_average_precision(scores[perm], truth[perm]) == pytest.approx(
      want, abs=1e-12)




def test_spearman_equals_scipy_with_ties():
  from scipy import stats  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  x = np.round(rng.normal(size=200), 1)  # many ties
  y = x + rng.normal(size=200)
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
  np.testing.assert_allclose(metrics.average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1, 3.5, 2])
  assert metrics.spearman([1, 1, 1], [1, 2, 3]) == 0.0  # no variation: no correlation
  assert metrics.spearman([1.0, 2.0], [3.0, 5.0]) == 1.0  # two points (|ranks| product 1/4)


def test_ranking_metrics_on_hand_made_ranks():
  """Ranks 1, 3, 12 of the one relevant document: nDCG@10 = (1 + 1/log2(4) + 0) / 3,
  MRR@10 = (1 + 1/3 + 0) / 3, recall@1 = 1/3, recall@5 = recall@10 = 2/3."""
  got = metrics.ranking_metrics(np.array([1, 3, 12]), ks=(1, 5, 10))
  assert got["ndcg@10"] == pytest.approx((1 + 0.5) / 3)
  assert got["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
  assert (got["recall@1"], got["recall@5"], got["recall@10"]) == pytest.approx((1 / 3, 2 / 3,
                                                                                2 / 3))
  assert metrics.ranking_metrics(np.array([np.inf]), ks=(1,))["ndcg@10"] == 0.0
  # rank 10 still counts, rank 11 does not (BEIR's @10)
  edge = metrics.ranking_metrics(np.array([10, 11]), ks=(10,))
  assert edge["ndcg@10"] == pytest.approx(1 / np.log2(11) / 2)
  assert edge["mrr@10"] == pytest.approx(0.1 / 2) and edge["recall@10"] == 0.5
