"""Tokenizers: WordPiece ids equal transformers' BertTokenizer; SentencePiece trains offline."""

import os

import pytest
import transformers

from mrl_jax import models
from mrl_jax.data import builtin_text
from mrl_jax.data import tokenizers
from mrl_jax.errors import ConfigError
from tests.conftest import load_config


def _real_texts():
  """Real news text with punctuation, numbers and accents (Lee et al.'s corpus)."""
  return builtin_text.read_lines("lee.cor") + ["Café déjà vu: naïve résumé!", "  spaced\tout \n text ", "中文 and 123,456.7"]


def test_wordpiece_ids_equal_transformers_bert_tokenizer():
  """HF tokenizers' WordPiece on bert-base-uncased's vocab.txt gives the ids of transformers'
  BertTokenizer (the Python reference implementation of BERT's tokenization: lowercasing,
  accent stripping, Chinese characters, punctuation splits, greedy longest-match WordPiece)."""
  vocab = tokenizers.builtin_vocab()
  ours = tokenizers.WordPiece(vocab)
  reference = transformers.BertTokenizer(vocab, do_lower_case=True)
  texts = _real_texts()
  want = [reference.convert_tokens_to_ids(reference.tokenize(t)) for t in texts]
  assert ours.encode(texts) == want
  assert sum(map(len, want)) > 4000  # real text, not a handful of words
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (
      0, 100, 101, 102, 103) and ours.vocab_size == 30522


def test_sentencepiece_trains_offline_deterministically(tmp_path):
  texts = _real_texts()
  first = tokenizers.train_sentencepiece(texts, str(tmp_path / "a"), vocab_size=400)
  second = tokenizers.train_sentencepiece(texts, str(tmp_path / "b"), vocab_size=400)
  pieces = lambda path: [(p.id_to_piece(i), p.get_score(i)) for p in
                         [tokenizers._sentencepiece(path)]  # pylint: disable=protected-access
                         for i in range(p.get_piece_size())]
  assert pieces(first) == pieces(second)  # the same vocabulary and scores, run to run
  sp = tokenizers.SentencePiece(first)
  assert (sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id) == (0, 1, 2, 3, 4)
  assert sp.vocab_size == 400
  ids = sp.encode(texts[:3])
  assert all(len(i) > 10 and min(i) > 4 for i in ids)  # real pieces, no special among them
  processor = tokenizers._sentencepiece(first)  # pylint: disable=protected-access
  assert processor.decode(ids[0]) == " ".join(texts[0].split())


def test_tokenizer_errors_are_one_line(tmp_path):
  with pytest.raises(ConfigError, match="vocabulary .*missing.txt not found"):
    tokenizers.WordPiece(str(tmp_path / "missing.txt"))
  bad = tmp_path / "vocab.txt"
  bad.write_text("[PAD]\n[UNK]\nhello\n")
  with pytest.raises(ConfigError, match=r"has no \['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
    tokenizers.WordPiece(str(bad))
  config = load_config("configs/text_wiki.py:contrastive,runlocal")
  config.model.vocab_size = 1000  # the tokenizer has 30,522
  with pytest.raises(ConfigError, match="has 30522 tokens but config.model.vocab_size=1000"):
    models.resolve(config)
  config.text.tokenizer = "bpe"
  with pytest.raises(ConfigError, match="unknown tokenizer 'bpe'"):
    models.resolve(config)
  assert os.path.basename(tokenizers.builtin_vocab()) == "vocab.txt"
