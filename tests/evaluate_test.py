"""eval.py end to end: embeddings-only mode, checkpoint mode, its reports and extras."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import validation
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import evaluate
from mrl_jax.evaluation import knn
from tests.conftest import REPO
from tests.references import random_problem
from tests.references import reference_metrics
from tests.references import reference_neighbors


# --- embeddings-only mode ---------------------------------------------------------------------

def _write_embeddings(directory, seed=0):
  db, db_y, q, q_y = random_problem(seed)
  os.makedirs(directory, exist_ok=True)
  for name, array in (("database_X", db), ("database_y", db_y.astype(np.int64)),
                      ("queries_X", q), ("queries_y", q_y.astype(np.int64))):
    np.save(os.path.join(directory, f"{name}.npy"), array)
  return db, db_y, q, q_y


def test_embeddings_only_mode_round_trip(tmp_path):
  db, db_y, q, q_y = _write_embeddings(str(tmp_path / "emb"))
  out = str(tmp_path / "out")
  results = evaluate.evaluate_embeddings(str(tmp_path / "emb"), [3, 6, 24], out, knn_ks=[1, 5],
                                         retrieval_ks=[10], devices=jax.devices()[:1])
  on_disk = json.loads(open(os.path.join(out, "results.json")).read())
  assert on_disk["sizes"].keys() == {"3", "6", "24"}
  assert on_disk["num_queries"] == 40 and on_disk["num_database"] == 200
  counts = np.bincount(db_y, minlength=5)
  for m in (3, 6, 24):
    _, ref_index = reference_neighbors(q, db, m, 10)
    want = reference_metrics(db_y[ref_index], q_y, counts, [1, 5], [10])
    for key, value in want.items():
      assert on_disk["sizes"][str(m)][key] == pytest.approx(value, abs=1e-9)
    assert "linear_top1" not in on_disk["sizes"][str(m)]
  assert results["sizes"]["24"]["knn1_top1"] == on_disk["sizes"]["24"]["knn1_top1"]
  lines = open(os.path.join(out, "results.csv")).read().splitlines()
  assert lines[0].split(",")[:3] == ["size", "trained", "knn1_top1"] and len(lines) == 4
  assert os.path.getsize(os.path.join(out, "accuracy_vs_dim.png")) > 1000


def test_eval_py_embeddings_cli(tmp_path):
  _write_embeddings(str(tmp_path / "emb"))
  out = subprocess.run(
      [sys.executable, "eval.py", f"--embeddings={tmp_path / 'emb'}", "--sizes=3,24",
       f"--out={tmp_path / 'out'}", "--knn_k=1", "--retrieval_k=10"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "m=   24: knn1_top1=" in out.stdout
  assert os.path.exists(tmp_path / "out" / "results.json")


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.update(queries_y=a["queries_y"][:-1]),
     "queries_X.npy has 40 rows but queries_y.npy has 39 labels"),
    (lambda a: a["database_X"].__setitem__((7, 1), np.nan),  # within the sizes read
     "database_X.npy has a NaN/inf value (first in row 7)"),
    (lambda a: a.update(database_y=a["database_y"] + 0.5),
     "database_y.npy has a non-integral label 2.5 (row 0)"),
    (lambda a: a.update(database_y=a["database_y"][:, None].repeat(2, 1)),
     "database_y.npy has shape (200, 2); allowed: [N] or [N, 1]"),
    (lambda a: a.update(queries_X=a["queries_X"][:, :20]),
     "database_X.npy has d=24 but queries_X.npy has d=20"),
])
def test_embeddings_input_validation(tmp_path, corrupt, message):
  directory = str(tmp_path / "emb")
  db, db_y, q, q_y = _write_embeddings(directory)
  arrays = {"database_X": db, "database_y": db_y, "queries_X": q, "queries_y": q_y}
  corrupt(arrays)
  for name, array in arrays.items():
    np.save(os.path.join(directory, f"{name}.npy"), array)
  with pytest.raises(ConfigError) as e:
    evaluate.evaluate_embeddings(directory, [2], str(tmp_path / "out"))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "out")


def test_embeddings_sizes_larger_than_d_are_refused(tmp_path):
  _write_embeddings(str(tmp_path / "emb"))
  with pytest.raises(ConfigError, match=r"size 32 is outside \[1, 24\]"):
    evaluate.evaluate_embeddings(str(tmp_path / "emb"), [8, 32], str(tmp_path / "out"))


# --- checkpoint mode, end to end ---------------------------------------------------------------

@pytest.mark.slow
def test_eval_of_a_trained_checkpoint_writes_the_three_reports(trained_digits):
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  config.eval.update(save_features=True, knn_k=(1, 5), retrieval_k=(10, 25))
  results = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:8])
  out = os.path.join(workdir, "eval", "sklearn_digits")
  on_disk = json.loads(open(os.path.join(out, "results.json")).read())
  assert on_disk == json.loads(json.dumps(results["sklearn_digits"]))
  for key in ("model", "checkpoint_step", "dataset", "split", "num_queries", "num_database",
              "sizes", "adaptive_retrieval", "adaptive_classification"):
    assert key in on_disk
  assert on_disk["checkpoint_step"] == 24 and on_disk["split"] == "test"
  assert on_disk["num_queries"] == 359 and on_disk["num_database"] == 1438
  trained = {"2", "4", "8", "16", "32", "64"}
  assert set(on_disk["sizes"]) == trained | {"3", "6", "12", "24", "48"}
  for size, m in on_disk["sizes"].items():
    assert ("linear_top1" in m) == (size in trained)  # interpolated sizes have no head
    for key in ("knn1_top1", "knn5_top1", "map@10", "map@10_standard", "precision@10",
                "recall@25", "topk_hit@25"):
      assert 0.0 <= m[key] <= 1.0, (size, key)
    assert m["map@10"] <= m["map@10_standard"] + 1e-12  # dividing by k is the stricter one
  # The head accuracy from stored features equals the in-training eval of the same state.
  summary = json.loads(open(os.path.join(workdir, "summary.json")).read())
  for size in trained:
    assert on_disk["sizes"][size]["linear_top1"] == pytest.approx(
        summary["eval"][size]["top1"], abs=1e-6)
  x = np.load(os.path.join(out, "test_X.npy"))
  y = np.load(os.path.join(out, "test_y.npy"))
  assert x.shape == (359, 64) and y.dtype == np.int64
  assert np.load(os.path.join(out, "train_X.npy")).shape == (1438, 64)
  assert open(os.path.join(out, "results.csv")).readline().startswith(
      "size,trained,linear_top1,linear_top5,knn1_top1")
  assert os.path.getsize(os.path.join(out, "accuracy_vs_dim.png")) > 1000


@pytest.mark.slow
def test_flip_tta_adds_the_mirrored_images_logits_on_the_eval_path(trained_digits):
  """eval.py with config.eval.flip_tta: each head's top-1 is numpy's argmax of
  head_m(z) + head_m(z of the image mirrored along its width), with z from the model applied to
  the test split's eval-preprocessed images; without TTA, of head_m(z) alone."""
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  config.eval.update(flip_tta=True, knn=False, adaptive_classification=False,
                     adaptive_retrieval=False, baselines=(), fewshot_shots=())
  with_tta = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])
  config.eval.flip_tta = False
  without = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])
  r = with_tta["sklearn_digits"]
  assert r["flip_tta"] is True and r["num_database"] == 0
  assert all("knn1_top1" not in m for m in r["sizes"].values())

  spec = validation.validate(config, 1, 1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, params, batch_stats, _ = state_lib.restore(config, spec, workdir, mesh)
  source = pipeline.open_source(config.input)
  batches = pipeline.make_reader(config.input, source).eval_batches(
      "test", local_batch=512, num_batches=1, process_index=0, process_count=1,
      preprocess=preprocess.from_config(config.input, train=False, channels=1))
  batch = next(iter(batches))
  keep = batch["mask"] > 0
  images, labels = batch["image"][keep], batch["label"][keep]
  z = np.asarray(model.apply(params, batch_stats, images)[0], np.float64)
  z_flip = np.asarray(model.apply(params, batch_stats, images[:, :, ::-1])[0], np.float64)
  heads = model.heads(params, batch_stats)
  differs = 0
  for m in model.nesting:
    head = getattr(heads, f"head_{m}")
    w, b = np.asarray(head.kernel[...], np.float64), np.asarray(head.bias[...], np.float64)
    plain = z[:, :m] @ w + b
    tta = plain + z_flip[:, :m] @ w + b
    assert r["sizes"][str(m)]["linear_top1"] == pytest.approx(
        np.mean(tta.argmax(1) == labels), abs=1e-9), m
    assert without["sklearn_digits"]["sizes"][str(m)]["linear_top1"] == pytest.approx(
        np.mean(plain.argmax(1) == labels), abs=1e-9), m
    differs += np.mean(tta.argmax(1) == labels) != np.mean(plain.argmax(1) == labels)
  assert differs  # TTA changes some size's accuracy: the test can tell them apart


def test_unknown_eval_dataset_is_an_error_not_a_fallback(trained_digits):
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  config.eval.splits = ("imagenet_vv2",)
  with pytest.raises(ConfigError, match="unknown dataset 'imagenet_vv2'"):
    evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])


@pytest.mark.slow
def test_database_streamed_in_chunks_gives_the_results_of_one_chunk(trained_digits,
                                                                    monkeypatch):
  """eval.py's config.eval.database_chunk_rows: 1,438 database rows in chunks of 400 rows
  (4 chunks, the last one partial, streamed from host over 8 devices) give exactly the
  one-chunk metrics. knn_test checks the chunked search itself against numpy."""
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  config.eval.update(linear=False, adaptive_retrieval=False, adaptive_classification=False,
                     baselines=(), fewshot_shots=(), knn_k=(1, 5), retrieval_k=(10, 25))
  prepared = []  # the rows of each database chunk put on the devices
  prepare = knn.ExactSearch._prepare_chunk  # pylint: disable=protected-access
  monkeypatch.setattr(knn.ExactSearch, "_prepare_chunk",
                      lambda self, rows, *a: prepared.append(len(rows)) or prepare(self, rows, *a))
  whole = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:8])
  assert set(prepared) == {1438}
  prepared.clear()
  config.eval.database_chunk_rows = 400
  chunked = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:8])
  assert prepared == [400, 400, 400, 238] * (len(prepared) // 4) and prepared
  a, b = whole["sklearn_digits"]["sizes"], chunked["sklearn_digits"]["sizes"]
  assert a.keys() == b.keys() and all(a[m] == b[m] for m in a)
  assert a["8"]["knn1_top1"] > 0.2  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_exported_embeddings_evaluate_like_the_checkpoint(trained_digits, tmp_path, monkeypatch):
  """eval.py --export_embeddings writes what embeddings-only mode reads, and the neighbour
  metrics from it equal eval.py's on the checkpoint; float16 and a size cut keep the layout.
  Both evaluations search with one ExactSearch (its compiled programs), as a run's evals do."""
  evaluate.exact_search.cache_clear()
  built = []
  init = knn.ExactSearch.__init__
  monkeypatch.setattr(knn.ExactSearch, "__init__",
                      lambda self, *a, **k: built.append(1) or init(self, *a, **k))
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  config.eval.update(linear=False, adaptive_retrieval=True, adaptive_classification=False,
                     baselines=(), fewshot_shots=(), extra_sizes=(), knn_k=(1, 5),
                     retrieval_k=(10, 25), shortlist_sizes=(2, 4), rerank_sizes=(64,),
                     shortlist_k=(50,), funnels=((2, (8, 64), (100, 10)),))
  direct = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])
  out = str(tmp_path / "emb")
  rows = evaluate.export_embeddings(config, workdir, out, devices=jax.devices()[:1])
  assert rows == {"database_X.npy": 1438, "queries_X.npy": 359}
  sizes = [int(m) for m in direct["sklearn_digits"]["sizes"]]
  exported = evaluate.evaluate_embeddings(out, sizes, str(tmp_path / "out"), knn_ks=[1, 5],
                                          retrieval_ks=[10, 25], devices=jax.devices()[:1],
                                          adaptive=config.eval,
                                          query_block=config.eval.query_block,
                                          database_block=config.eval.database_block)
  assert len(built) == 1
  for m in sizes:
    assert exported["sizes"][str(m)] == direct["sklearn_digits"]["sizes"][str(m)], m
  timing = ("seconds", "ms_per_query_block", "wallclock_speedup_vs_exact")
  strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
  assert len(exported["adaptive_retrieval"]) == 6  # 2, 64 single-shot; 2 and 4 -> 64; funnel
  assert strip(exported["adaptive_retrieval"]) == strip(
      direct["sklearn_digits"]["adaptive_retrieval"])
  assert open(os.path.join(tmp_path, "out", "adaptive_retrieval.csv")).read().count("\n") == 7
  half = str(tmp_path / "half")
  evaluate.export_embeddings(config, workdir, half, size=16, dtype="float16",
                             devices=jax.devices()[:1])
  x = np.load(os.path.join(half, "queries_X.npy"))
  assert x.shape == (359, 16) and x.dtype == np.float16
  assert np.load(os.path.join(half, "queries_y.npy")).dtype == np.int64


# --- eval.py, end to end ----------------------------------------------------------------------

@pytest.mark.slow
def test_eval_writes_adaptive_retrieval_classification_baselines_and_fewshot(trained_digits):
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  config.eval.update(adaptive_retrieval=True, shortlist_sizes=(2, 4), rerank_sizes=(64,),
                     shortlist_k=(50,), funnels=((2, (8, 64), (100, 10)),),
                     adaptive_classification=True, ac_seeds=3,
                     baselines=("svd", "pca", "random_projection", "random_subset"),
                     probe_steps=30, fewshot_shots=(1, 5), fewshot_draws=2, knn_k=(1,),
                     retrieval_k=(10,))
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
