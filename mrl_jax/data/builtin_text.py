"""Built-in offline text datasets: real text shipped inside the gensim wheel (its test data).

- `lee_similarity`: Lee, Pincombe & Welsh (2005), "An empirical evaluation of models of text
  document similarity": 50 short news documents (`lee.cor`) and, for each of the 1,225 pairs,
  the mean similarity rating of human judges scaled to 0..1 (`similarities0-1.txt`, the upper
  triangle). A real human-rated benchmark: embeddings are scored by the Spearman correlation of
  their cosine with the ratings. Split `test` (1,225 pairs: `text_a`, `text_b`, `score`).
- `lee_corpus`: the 300 background news documents of the same study (`lee_background.cor`),
  `text`; fixed split 270 `train` / 30 `test`.
- `polarity_sentences`: 200 sentences of Pang & Lee's movie-review polarity data
  (`pang_lee_polarity.cor`: 100 negative, 100 positive), `text` + `label` (neg / pos); split
  stratified 160 `train` / 40 `test` (k-NN and retrieval of labelled text).
- `wiki_passages`: the English Wikipedia sample (`enwiki-latest-pages-articles1...shortened`,
  the 107 non-redirect articles), wiki markup removed with gensim's own `filter_wiki`, cut into
  paragraphs of 40-256 words: `title`, `text`, and an inverse-cloze pair (Lee et al. 2019):
  `query` (the first sentence) and `document` (the rest). Split by article (a fixed 20 % of the
  articles to `test`), so retrieval is measured on articles never trained on.
Nothing is downloaded; gensim is only read from (its data files), imported for `filter_wiki`.
"""

import bz2
import importlib.util
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mrl_jax.errors import ConfigError

_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_test_data(name: str) -> str:
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("the built-in text datasets are read from the gensim wheel's test data: "
                      "pip install gensim")
  return os.path.join(spec.submodule_search_locations[0], "test", "test_data", name)


def read_lines(name: str) -> list[str]:
  """The non-empty lines of a gensim test-data file: UTF-8, or Windows-1252 where that is what
  the file is (the Lee corpora: '\xa3' is a pound sign)."""
  raw = open(gensim_test_data(name), "rb").read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("cp1252")
  return [line.strip() for line in text.splitlines() if line.strip()]


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train_indices, test_indices): per class, a seeded permutation; round(frac * n_c) to test."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _fixed_split(n: int, test: int, seed: int) -> tuple[list[int], list[int]]:
  order = np.random.default_rng(seed).permutation(n)
  return sorted(order[test:].tolist()), sorted(order[:test].tolist())


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  url_infos = None  # nothing is downloaded
  FEATURES: dict

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=type(self).__doc__,
                                 features=tfds.features.FeaturesDict(self.FEATURES()))


class LeeSimilarity(_TextBuilder):
  """Lee et al. 2005: 1,225 document pairs with mean human similarity ratings."""
  FEATURES = staticmethod(lambda: {"text_a": tfds.features.Text(),
                                   "text_b": tfds.features.Text(),
                                   "score": tfds.features.Scalar(np.float32)})

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    documents = read_lines("lee.cor")
    ratings = np.loadtxt(gensim_test_data("similarities0-1.txt"))
    if len(documents) != 50 or ratings.shape != (50, 50):
      raise ValueError(f"lee.cor / similarities0-1.txt: {len(documents)} documents, ratings "
                       f"{ratings.shape}; expected 50 and (50, 50)")
    for i in range(50):
      for j in range(i + 1, 50):
        yield f"{i}_{j}", {"text_a": documents[i], "text_b": documents[j],
                           "score": np.float32(ratings[i, j])}


class LeeCorpus(_TextBuilder):
  """The 300 background news documents of Lee et al. 2005."""
  FEATURES = staticmethod(lambda: {"text": tfds.features.Text()})

  def _split_generators(self, dl_manager):
    del dl_manager
    documents = read_lines("lee_background.cor")
    train, test = _fixed_split(len(documents), 30, seed=0)
    return {"train": self._generate_examples(documents, train),
            "test": self._generate_examples(documents, test)}

  def _generate_examples(self, documents, indices):
    for i in indices:
      yield i, {"text": documents[i]}


class PolaritySentences(_TextBuilder):
  """Pang & Lee movie-review sentences with their polarity."""
  FEATURES = staticmethod(lambda: {"text": tfds.features.Text(),
                                   "label": tfds.features.ClassLabel(names=["neg", "pos"])})

  def _split_generators(self, dl_manager):
    del dl_manager
    rows = [line.split(" ", 1) for line in read_lines("pang_lee_polarity.cor")]
    labels = np.asarray([{"__label__neg": 0, "__label__pos": 1}[tag] for tag, _ in rows])
    texts = [text for _, text in rows]
    train, test = stratified_split(labels)
    return {"train": self._generate_examples(texts, labels, train),
            "test": self._generate_examples(texts, labels, test)}

  def _generate_examples(self, texts, labels, indices):
    for i in indices:
      yield int(i), {"text": texts[i], "label": int(labels[i])}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def wiki_passages() -> list[dict]:
  """[{title, text, query, document, article}] from gensim's English Wikipedia sample."""
  from gensim.corpora import wikicorpus  # pylint: disable=g-import-not-at-top
  with bz2.open(gensim_test_data(_WIKI)) as f:
    pages = list(wikicorpus.extract_pages(f, filter_namespaces=("0",)))
  out, article = [], 0
  for title, markup, _ in pages:
    if markup.lower().lstrip().startswith("#redirect"):
      continue
    text = wikicorpus.filter_wiki(markup)
    kept = 0
    for paragraph in re.split(r"\n\s*\n", text):
      paragraph = " ".join(paragraph.split())
      # Headings, lists and tables are left as short or bracketed lines: keep prose only.
      if not 40 <= len(paragraph.split()) <= 256 or paragraph.startswith(("=", "*", "|", "{")):
        continue
      sentences = _SENTENCE_END.split(paragraph)
      if len(sentences) < 2:
        continue
      out.append({"title": title, "text": paragraph, "query": sentences[0],
                  "document": " ".join(sentences[1:]), "article": article})
      kept += 1
    article += bool(kept)
  return out


class WikiPassages(_TextBuilder):
  """Paragraphs of gensim's English Wikipedia sample, with inverse-cloze (query, document)."""
  FEATURES = staticmethod(lambda: {k: tfds.features.Text()
                                   for k in ("title", "text", "query", "document")})

  def _split_generators(self, dl_manager):
    del dl_manager
    passages = wiki_passages()
    articles = max(p["article"] for p in passages) + 1
    _, test_articles = _fixed_split(articles, round(0.2 * articles), seed=0)
    test_articles = set(test_articles)
    return {"train": self._generate_examples(passages, test_articles, False),
            "test": self._generate_examples(passages, test_articles, True)}

  def _generate_examples(self, passages, test_articles, test):
    for i, p in enumerate(passages):
      if (p["article"] in test_articles) == test:
        yield i, {k: p[k] for k in ("title", "text", "query", "document")}


BUILTIN_TEXT = {
    "lee_similarity": LeeSimilarity,
    "lee_corpus": LeeCorpus,
    "polarity_sentences": PolaritySentences,
    "wiki_passages": WikiPassages,
}
