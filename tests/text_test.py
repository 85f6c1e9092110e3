"""Text preprocessing: static shapes, BERT's masking by its definition, both readers, resume."""

import numpy as np
import pytest

from mrl_jax.data import pipeline
from mrl_jax.data import text

from mrl_jax.errors import ConfigError
from tests.conftest import load_config


class Words:
  """A stand-in tokenizer with known ids: word i of 'w5 w6 ...' is id i; specials 0-4."""
  vocab_size, pad_id, unk_id, cls_id, sep_id, mask_id, fingerprint = 1000, 0, 1, 2, 3, 4, "w"

  def encode(self, texts):
    return [[int(w[1:]) for w in t.split()] for t in texts]


def _records(lengths, start=5):
  return [{"text": " ".join(f"w{start + j}" for j in range(n)).encode()} for n in lengths]


def test_frame_is_cls_tokens_sep_truncated_and_padded():
  pp = text.TextPreprocess(Words(), task="embed", keys=("text",), max_length=6)
  out = pp(_records([2, 9]), np.arange(2), 0)
  np.testing.assert_array_equal(out["text_input_ids"], [[2, 5, 6, 3, 0, 0],
                                                        [2, 5, 6, 7, 8, 3]])
  np.testing.assert_array_equal(out["text_input_mask"], [[1, 1, 1, 1, 0, 0], [1] * 6])
  assert out["text_segment_ids"].sum() == 0 and out["text_input_ids"].dtype == np.int32


def test_bert_masking_by_its_definition():
  """BERT (Devlin et al. 2019, §3.1 and create_pretraining_data.py): round(15 %) of the real
  tokens (never [CLS]/[SEP]/[PAD]), capped at max_predictions, at least one; of those 80 %
  [MASK], 10 % a random token, 10 % unchanged; targets are the original ids. Counted over
  2,000 sequences of 40 tokens: 6 predictions each, 12,000 in all."""
  pp = text.TextPreprocess(Words(), task="mlm", keys=("text",), max_length=48,
                           max_predictions=8)
  out = pp(_records([40] * 2000, start=100), np.arange(2000), seed=3)
  weights = out["masked_weights"]
  assert (weights.sum(1) == 6).all()  # round(0.15 * 40)
  positions = out["masked_positions"][weights > 0]
  assert positions.min() >= 1 and positions.max() <= 40  # after [CLS], before [SEP]
  targets = out["masked_ids"][weights > 0]
  np.testing.assert_array_equal(targets, 100 + positions - 1)  # the original token there
  rows = np.repeat(np.arange(2000), 6)
  now = out["input_ids"][rows, positions]
  masked, kept = np.mean(now == 4), np.mean(now == targets)
  random = 1.0 - masked - kept
  # Binomial(12,000): 5 standard deviations are ~1.8 % (80 %) and ~1.4 % (10 %).
  assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015
  unmasked = np.ones_like(out["input_ids"], bool)
  unmasked[rows, positions] = False
  original = np.zeros_like(out["input_ids"])
  original[:, 1:41] = np.arange(100, 140)
  original[:, 0], original[:, 41] = 2, 3
  np.testing.assert_array_equal(out["input_ids"][unmasked], original[unmasked])
  short = pp(_records([3]), [0], seed=3)
  assert short["masked_weights"].sum() == 1  # round(0.45) = 0, at least one


def test_random_draws_depend_on_seed_and_position_only():
  pp = text.TextPreprocess(Words(), task="mlm", keys=("text",), max_length=20)
  records = _records([30, 30, 30])
  a = pp(records, [7, 8, 9], seed=1)
  b = pp(records[::-1], [9, 8, 7], seed=1)  # the same examples at the same positions
  for key in a:
    np.testing.assert_array_equal(a[key], b[key][::-1])
  c = pp(records, [7, 8, 10], seed=1)
  assert not np.array_equal(a["masked_positions"][2], c["masked_positions"][2])
  d = pp(records, [7, 8, 9], seed=2)
  assert not np.array_equal(a["input_ids"], d["input_ids"])


def test_crop_pairs_are_two_windows_of_the_same_text():
  pp = text.TextPreprocess(Words(), task="pair", keys=("text",), max_length=12,
                           pair_mode="crop", crop_tokens=5)
  out = pp(_records([40] * 50), np.arange(50), seed=0)
  for name in ("anchor", "positive"):
    ids = out[f"{name}_input_ids"][:, 1:6]
    assert (np.diff(ids, axis=1) == 1).all()  # contiguous windows of w5 w6 ...
    assert (out[f"{name}_input_ids"][:, 6] == 3).all()
  assert (out["anchor_input_ids"][:, 1] != out["positive_input_ids"][:, 1]).mean() > 0.8


@pytest.mark.parametrize("task", ["mlm", "pair"])
def test_an_empty_training_text_is_a_one_line_error(task):
  pp = text.TextPreprocess(Words(), task=task, keys=("text",), max_length=8, pair_mode="crop",
                           max_predictions=2)
  with pytest.raises(ConfigError, match="empty text in feature 'text' .the example at stream "
                                        "position 12"):
    pp([{"text": b"w5"}, {"text": b"  "}], [11, 12], 0)


def test_a_blank_text_is_embedded_as_cls_sep():
  """Inference and evaluation embed a blank text as sentence-transformers does: [CLS] [SEP]."""
  pp = text.TextPreprocess(Words(), task="embed", keys=("text",), max_length=8)
  out = pp([{"text": b"w5"}, {"text": b"  "}, {"text": b""}], [11, 12, 13], 0)
  t = Words()
  for row in (1, 2):
    assert out["text_input_ids"][row, :3].tolist() == [t.cls_id, t.sep_id, t.pad_id]
    assert out["text_input_mask"][row].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def text_data_dir(data_dir):
  """The shared test data_dir with the built-in text datasets prepared (both formats)."""
  from mrl_jax.data import builtin  # pylint: disable=g-import-not-at-top
  for name in ("wiki_passages", "lee_similarity", "lee_corpus", "polarity_sentences"):
    builtin.prepare(name, data_dir)
  return data_dir


def _reader(data_dir, reader):
  config = load_config(f"configs/text_wiki.py:runlocal,reader={reader}")
  config.input.data_dir = data_dir
  source = pipeline.open_source(config.input)
  return config, source, pipeline.make_reader(config.input, source)


def test_both_readers_give_the_same_eval_batches(text_data_dir):
  """Evaluation batches (dataset order, padded with mask 0) are equal through grain
  (ArrayRecord) and tf.data (TFRecord): one preprocessing definition on the same records."""
  out = {}
  for reader in ("grain", "tf_data"):
    config, source, r = _reader(text_data_dir, reader)
    assert source.kind == "text" and set(source.text_keys) == {"title", "text", "query",
                                                              "document"}
    pp = text.from_config(config, task="mlm", keys=("text",), train=False)
    out[reader] = list(r.eval_batches("test", local_batch=256, num_batches=3, preprocess=pp,
                                      process_index=0, process_count=1))
  for a, b in zip(out["grain"], out["tf_data"], strict=True):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert sum(b["mask"].sum() for b in out["grain"]) == 641  # every test passage once


@pytest.mark.parametrize("reader", ["grain", "tf_data"])
def test_resumed_text_stream_continues_the_uninterrupted_one(text_data_dir, reader):
  config, _, r = _reader(text_data_dir, reader)
  pp = text.from_config(config, task="mlm")

  def batches(start, n):
    stream = r.train_batches("train", local_batch=8, start_batch=start, seed=5,
                             train_preprocess=pp, process_index=0, process_count=1,
                             shuffle_buffer=64)
    return [b for _, b in zip(range(n), stream)]

  straight, resumed = batches(0, 4), batches(2, 2)
  for a, b in zip(straight[2:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert straight[0]["input_ids"].shape == (8, 32)
  assert not np.array_equal(straight[0]["input_ids"], straight[1]["input_ids"])

