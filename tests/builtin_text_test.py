"""The built-in text datasets: what each holds, read back through TFDS against the raw files."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mrl_jax.data import builtin
from mrl_jax.data import builtin_text


@pytest.fixture(scope="module")
def text_dir(data_dir):
  for name in builtin_text.BUILTIN_TEXT:
    builtin.prepare(name, data_dir)
  return data_dir


def _records(text_dir, name, split):
  decode = lambda v: v.decode() if isinstance(v, bytes) else v
  return [{k: decode(v) for k, v in r.items()}
          for r in tfds.data_source(name, split=split, data_dir=text_dir)]


def test_lee_similarity_is_the_human_rating_matrix(text_dir):
  """1,225 pairs (i < j) of the 50 documents; each score is the mean human rating in
  similarities0-1.txt (read here with numpy), each text a line of lee.cor."""
  documents = builtin_text.read_lines("lee.cor")
  ratings = np.loadtxt(builtin_text.gensim_test_data("similarities0-1.txt"))
  records = _records(text_dir, "lee_similarity", "test")
  assert len(records) == 1225
  index = {d: i for i, d in enumerate(documents)}
  seen = set()
  for r in records:
    i, j = index[r["text_a"]], index[r["text_b"]]
    assert i < j and r["score"] == pytest.approx(ratings[i, j], abs=1e-6)
    seen.add((i, j))
  assert len(seen) == 1225
  assert 0.0 <= min(r["score"] for r in records) < max(r["score"] for r in records) <= 1.0


def test_corpora_splits_are_fixed_disjoint_and_complete(text_dir):
  train = [r["text"] for r in _records(text_dir, "lee_corpus", "train")]
  test = [r["text"] for r in _records(text_dir, "lee_corpus", "test")]
  assert (len(train), len(test)) == (270, 30)
  # Every document once (the corpus repeats a few documents: compared as multisets).
  assert sorted(train + test) == sorted(builtin_text.read_lines("lee_background.cor"))
  polarity = {s: _records(text_dir, "polarity_sentences", s) for s in ("train", "test")}
  for split, per_class in (("train", 80), ("test", 20)):
    assert np.bincount([r["label"] for r in polarity[split]]).tolist() == [per_class] * 2
  raw = dict(line.split(" ", 1)[::-1] for line in builtin_text.read_lines(
      "pang_lee_polarity.cor"))
  for r in polarity["test"]:
    assert raw[r["text"]] == ("__label__pos" if r["label"] else "__label__neg")


def test_wiki_passages_split_by_article_with_inverse_cloze_pairs(text_dir):
  train, test = (_records(text_dir, "wiki_passages", s) for s in ("train", "test"))
  assert (len(train), len(test)) == (2543, 641)
  assert not {r["title"] for r in train} & {r["title"] for r in test}
  for r in train[:200] + test[:200]:
    assert f"{r['query']} {r['document']}" == r["text"]
    assert 40 <= len(r["text"].split()) <= 256 and "[[" not in r["text"]


def test_preparation_is_deterministic(tmp_path, text_dir):
  builtin.prepare("wiki_passages", str(tmp_path))
  again = sorted(r["text"] for r in _records(str(tmp_path), "wiki_passages", "test"))
  assert again == sorted(r["text"] for r in _records(text_dir, "wiki_passages", "test"))
