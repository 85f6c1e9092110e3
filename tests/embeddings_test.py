"""Embeddings-only mode on saved features: the official dumps, memory-mapped streaming, adaptive
retrieval with exact and HNSW shortlists."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from mrl_jax.evaluation import embeddings
from mrl_jax.evaluation import evaluate
from tests.references import random_problem
from tests.references import reference_neighbors

ADAPTIVE = dict(shortlist_sizes=(3,), rerank_sizes=(24,), shortlist_k=(40,),
                funnels=((3, (6, 24), (60, 20)),), shortlist_engines=("exact",), hnsw_m=16,
                hnsw_ef_construction=100, hnsw_ef_search=128)


def _adaptive(**overrides):
  return ml_collections.ConfigDict({**ADAPTIVE, **overrides})


def _save_folder(directory, db, db_y, q, q_y):
  os.makedirs(directory, exist_ok=True)
  for name, array in (("database_X", db), ("database_y", db_y), ("queries_X", q),
                      ("queries_y", q_y)):
    np.save(os.path.join(directory, f"{name}.npy"), array)
  return str(directory)


def _strip_timing(rows):
  timing = ("seconds", "ms_per_query_block", "wallclock_speedup_vs_exact")
  return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_official_dumps_float16_features_and_float_n_by_1_labels(tmp_path):
  """`--database=P --queries=Q` reads P-X.npy (float16) and P-y.npy (float16 [n, 1]) as they
  are, and gives the metrics of the same values in this project's folder layout."""
  db, db_y, q, q_y = random_problem(0)
  db16, q16 = db.astype(np.float16), q.astype(np.float16)
  np.save(tmp_path / "1K_train_mrl1_e0_ffNone-X.npy", db16)
  np.save(tmp_path / "1K_train_mrl1_e0_ffNone-y.npy", db_y.astype(np.float16)[:, None])
  np.save(tmp_path / "1K_val_mrl1_e0_ffNone-X.npy", q16)
  np.save(tmp_path / "1K_val_mrl1_e0_ffNone-y.npy", q_y.astype(np.float32)[:, None])
  location = embeddings.locate(database=str(tmp_path / "1K_train_mrl1_e0_ffNone"),
                               queries=str(tmp_path / "1K_val_mrl1_e0_ffNone"))
  parts = embeddings.load(location)
  assert parts["database"].z.dtype == np.float16 and isinstance(parts["database"].z, np.memmap)
  np.testing.assert_array_equal(parts["database"].labels, db_y)
  assert parts["queries"].labels.dtype == np.int64
  folder = _save_folder(tmp_path / "folder", db16.astype(np.float32), db_y, q16.astype(
      np.float32), q_y)
  kwargs = dict(knn_ks=[1, 5], retrieval_ks=[10], devices=jax.devices()[:1],
                adaptive=_adaptive())
  official = evaluate.evaluate_embeddings(location, [3, 24], str(tmp_path / "o1"), **kwargs)
  ours = evaluate.evaluate_embeddings(folder, [3, 24], str(tmp_path / "o2"), **kwargs)
  assert official["sizes"] == ours["sizes"]
  assert _strip_timing(official["adaptive_retrieval"]) == _strip_timing(
      ours["adaptive_retrieval"])
  # float16 storage, float32 arithmetic: the neighbours of the float16 values.
  _, ref = reference_neighbors(q16.astype(np.float32), db16.astype(np.float32), 24, 1)
  assert official["sizes"]["24"]["knn1_top1"] == pytest.approx(np.mean(db_y[ref[:, 0]] == q_y))


def test_either_a_folder_or_two_prefixes():
  with pytest.raises(Exception, match="not both"):
    embeddings.locate("dir", database="a", queries="b")
  with pytest.raises(Exception, match="both --database=PREFIX and --queries=PREFIX"):
    embeddings.locate(database="a")


@pytest.mark.parametrize("devices", [1, 8])
def test_memory_mapped_database_streamed_in_chunks_equals_in_memory(tmp_path, devices):
  """A memory-mapped float16 database of 200 rows streamed in chunks of 37 rows gives the
  in-memory results: per-size metrics and every adaptive-retrieval row (the rerank reads the
  memory map's candidate rows)."""
  db, db_y, q, q_y = random_problem(1)
  folder = _save_folder(tmp_path / "emb", db.astype(np.float16), db_y, q, q_y)
  kwargs = dict(knn_ks=[1, 5], retrieval_ks=[10], devices=jax.devices()[:devices],
                adaptive=_adaptive(), query_block=16, database_block=16)
  whole = evaluate.evaluate_embeddings(folder, [3, 6, 24], str(tmp_path / "a"), **kwargs)
  streamed = evaluate.evaluate_embeddings(folder, [3, 6, 24], str(tmp_path / "b"),
                                          database_chunk_rows=37, **kwargs)
  assert whole["sizes"] == streamed["sizes"]
  assert _strip_timing(whole["adaptive_retrieval"]) == _strip_timing(
      streamed["adaptive_retrieval"])
  names = [r["name"] for r in whole["adaptive_retrieval"]]
  assert names == ["3 (single-shot)", "24 (single-shot)", "3->24 (K=40)",
                   "funnel 3->6->24 (K=60,20)"]
  assert all(r["shortlist_recall"] == 1.0 for r in whole["adaptive_retrieval"])


def test_hnsw_shortlist_reports_its_recall_and_is_cached_next_to_the_features(tmp_path):
  db, db_y, q, q_y = random_problem(2)
  folder = _save_folder(tmp_path / "emb", db, db_y, q, q_y)
  adaptive = _adaptive(shortlist_engines=("exact", "hnsw"), funnels=())
  results = evaluate.evaluate_embeddings(folder, [3, 24], str(tmp_path / "out"),
                                         adaptive=adaptive, devices=jax.devices()[:1])
  rows = {r["name"]: r for r in results["adaptive_retrieval"]}
  exact, hnsw = rows["3->24 (K=40)"], rows["3->24 (K=40) [hnsw]"]
  assert hnsw["engine"] == "hnsw" and exact["engine"] == "exact"
  # 200 rows, ef_search 128: the graph search visits (almost) everything.
  assert 0.95 <= hnsw["shortlist_recall"] <= 1.0
  assert hnsw["map@10"] == pytest.approx(exact["map@10"], abs=0.05)
  cached = [f for f in os.listdir(folder) if f.endswith(".faiss")]
  assert len(cached) == 1 and cached[0].startswith("hnsw_ds3_M16_efc100_n200_")
  csv = open(tmp_path / "out" / "adaptive_retrieval.csv").read().splitlines()
  assert "shortlist_recall" in csv[0].split(",") and len(csv) == 1 + len(rows)
