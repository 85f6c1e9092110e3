"""Image-text evaluation at every nesting size (the paper's ALIGN tables), on the evaluator
contract: `run(inputs)` yields `(<set>/<metric>@<m>, value)`.

Embeddings come once at full size from inference.Embedder (images through the eval
preprocessing, captions through the tokenizer); every size truncates and renormalises them.
- `Retrieval` (config.eval.image_text_sets 'retrieval:<dataset>:<split>'): image -> text and
  text -> image Recall@1/5/10 as big_vision's image-text retrieval evaluator counts them with
  several captions per image: an image query succeeds when any of its captions is in the top k,
  a caption query when its image is: `recall@k_i2t`, `recall@k_t2i`. Also the cosine of
  matched pairs, of random (image, other image's caption) pairs and their gap (paper Table 6):
  `cosine_matched`, `cosine_random`, `cosine_gap`.
- `ZeroShot` ('zeroshot:<dataset>:<split>'): CLIP's prompt ensemble per size: each class's
  prompts (class names x templates, config.eval.zeroshot_prompts or the dataset's class names
  with config.eval.zeroshot_templates) embedded, truncated to m and renormalised, averaged,
  renormalised; top-1 of image . class; ImageNet-A/-R logits restricted to their 200 classes
  (class_subsets.py): `zeroshot_top1`.
- The image tower's neighbours ('neighbors:<dataset>:<db split>:<query split>'): the image
  evaluators' k-NN, mAP@k and adaptive retrieval on image-tower features of a labelled dataset.
- Cross-modal adaptive retrieval ('crossmodal:<dataset>:<split>'): captions as queries against
  the split's images (relevant: the caption's own image), shortlist at Ds and rerank at Dr as
  adaptive_retrieval.py does, MFLOPs and wall-clock included.
"""

import dataclasses
import json

import numpy as np

from mrl_jax import paths
from mrl_jax.data import image_text as image_text_data
from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import adaptive_retrieval
from mrl_jax.evaluation import class_subsets
from mrl_jax.evaluation import evaluators
from mrl_jax.evaluation import extract
from mrl_jax.evaluation import text as text_eval

KINDS = {"retrieval": 3, "zeroshot": 3, "neighbors": 4, "crossmodal": 3}


def parse_sets(sets) -> list[tuple[str, ...]]:
  """config.eval.image_text_sets -> [(kind, dataset, split[, split])]; one-line errors."""
  if isinstance(sets, str):
    raise ConfigError(f"config.eval.image_text_sets={sets!r} is not a tuple; e.g. "
                      "('retrieval:mnist_captions:test',)")
  out = []
  for item in sets:
    parts = tuple(text_eval.split_spec(item))
    if parts[0] not in KINDS or len(parts) != KINDS[parts[0]]:
      raise ConfigError(f"config.eval.image_text_sets entry {item!r}; allowed: "
                        "retrieval:<dataset>:<split>, zeroshot:<dataset>:<split>, "
                        "neighbors:<dataset>:<database split>:<query split>, "
                        "crossmodal:<dataset>:<split>")
    out.append(parts)
  return out


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check_channels(embedder, source) -> None:
  """A set whose images have other channels than the image tower takes is a one-line error
  (the tower's first convolution would fail in XLA)."""
  shape = source.builder().info.features[source.image_key].shape
  want = embedder.in_channels
  if shape and shape[-1] not in (None, want):
    raise ConfigError(f"dataset {source.name!r} has {shape[-1]}-channel images but the image "
                      f"tower takes {want} (config.eval.image_text_sets); evaluate it with a "
                      f"tower of in_channels={shape[-1]} or leave it out")


def read_images_and_captions(input_cfg, dataset: str, split: str, embedder=None):
  """(encoded images [N], captions [K], image index of each caption [K]) of a split."""
  source = pipeline.open_source(input_cfg, dataset=dataset)
  if embedder is not None:
    check_channels(embedder, source)
  if source.kind != "image_text":
    raise ConfigError(f"dataset {dataset!r} has no image and caption "
                      f"({input_cfg.get('caption_key')!r}) features (config.input.caption_key)")
  key = source.text_keys[0].split("/")[0]
  data = text_eval.read_split(input_cfg, dataset, split, (source.image_key, key))
  captions, owner = [], []
  for i, record in enumerate(data[key]):
    for caption in image_text_data.captions_of({key: record}, source.text_keys[0]):
      captions.append(caption)
      owner.append(i)
  return data[source.image_key], captions, np.asarray(owner)


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, ks) -> dict[int, float]:
  """scores [Q, N]; relevant [Q, N] bool: the fraction of queries with a relevant item in
  their top k (ties by lower index)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, axis=1)
  first = np.where(hits.any(1), hits.argmax(1) + 1, np.inf)
  return {k: float(np.mean(first <= k)) for k in ks}


@dataclasses.dataclass
class Retrieval:
  dataset: str
  split: str
  ks: tuple[int, ...] = (1, 5, 10)

  def run(self, inputs):
    images, captions, owner = read_images_and_captions(inputs.config.input, self.dataset,
                                                       self.split, inputs.embedder)
    z_img = inputs.embedder.encode(images)
    z_txt = inputs.embedder.encode(captions)
    relevant = owner[None, :] == np.arange(len(images))[:, None]  # [images, captions]
    random_pair = np.random.default_rng(0).permutation(len(captions))
    for m in inputs.sizes:
      img, txt = _unit(z_img[:, :m]), _unit(z_txt[:, :m])
      scores = img @ txt.T
      for k, v in recall_at_k(scores, relevant, self.ks).items():
        yield f"{self.dataset}/recall@{k}_i2t@{m}", v
      for k, v in recall_at_k(scores.T, relevant.T, self.ks).items():
        yield f"{self.dataset}/recall@{k}_t2i@{m}", v
      matched = float(np.mean(np.sum(img[owner] * txt, 1)))
      other = owner[random_pair] != owner
      random = float(np.mean(np.sum(img[owner[random_pair]] * txt, 1)[other]))
      yield f"{self.dataset}/cosine_matched@{m}", matched
      yield f"{self.dataset}/cosine_random@{m}", random
      yield f"{self.dataset}/cosine_gap@{m}", matched - random


def prompts(config, source) -> tuple[list[str], list[str]]:
  """(class names, templates) for zero-shot: config.eval.zeroshot_prompts (a JSON file with
  "classnames" and "templates"), else the dataset's class names and
  config.eval.zeroshot_templates."""
  path = config.eval.zeroshot_prompts
  if path:
    if not paths.path(path).exists():
      raise ConfigError(f"prompts file {path} not found (config.eval.zeroshot_prompts); "
                        'allowed: a JSON file {"classnames": [...], "templates": ["a {}", ...]}')
    spec = json.loads(paths.path(path).read_text())
    names, templates = spec.get("classnames"), spec.get("templates")
  else:
    feature = source.builder().info.features[source.label_key]
    names, templates = list(getattr(feature, "names", []) or []), list(
        config.eval.zeroshot_templates)
  if not names or not templates or any("{}" not in t for t in templates):
    raise ConfigError(f"zero-shot on {source.name!r} needs class names and templates with "
                      "'{}' (config.eval.zeroshot_prompts or the dataset's ClassLabel names "
                      "and config.eval.zeroshot_templates)")
  if source.num_classes and len(names) != source.num_classes:
    raise ConfigError(f"{len(names)} class names for {source.num_classes} classes of "
                      f"{source.name!r} (config.eval.zeroshot_prompts)")
  return names, templates


@dataclasses.dataclass
class ZeroShot:
  dataset: str
  split: str

  def run(self, inputs):
    config = inputs.config
    source = pipeline.open_source(config.input, dataset=self.dataset)
    check_channels(inputs.embedder, source)
    names, templates = prompts(config, source)
    data = text_eval.read_split(config.input, self.dataset, self.split,
                                (source.image_key, source.label_key))
    z_img = inputs.embedder.encode(data[source.image_key])
    labels = np.asarray(data[source.label_key], np.int64)
    z_prompts = inputs.embedder.encode([t.format(n) for n in names for t in templates])
    z_prompts = z_prompts.reshape(len(names), len(templates), -1)
    mask = class_subsets.class_mask(self.dataset, len(names))
    for m in inputs.sizes:
      classes = _unit(_unit(z_prompts[..., :m]).mean(1))  # ensemble: mean of unit prompts
      logits = _unit(z_img[:, :m]) @ classes.T
      if mask is not None:
        logits[:, ~mask] = -np.inf
      yield f"{self.dataset}/zeroshot_top1@{m}", float(np.mean(logits.argmax(1) == labels))


@dataclasses.dataclass
class ImageNeighbors:
  """The image evaluators on the image tower's features of a labelled image dataset."""
  dataset: str
  database_split: str
  query_split: str
  evaluators: tuple

  def run(self, inputs):
    source = pipeline.open_source(inputs.config.input, dataset=self.dataset)
    check_channels(inputs.embedder, source)
    parts = {}
    for name, split in (("database", self.database_split), ("queries", self.query_split)):
      data = text_eval.read_split(inputs.config.input, self.dataset, split,
                                  (source.image_key, source.label_key))
      parts[name] = extract.Features(inputs.embedder.encode(data[source.image_key]),
                                     np.asarray(data[source.label_key], np.int64))
    sub = evaluators.Inputs(query_sets={self.dataset: parts["queries"]},
                            database=parts["database"], search=inputs.search,
                            num_classes=source.num_classes)
    for evaluator in self.evaluators:
      yield from evaluator.run(sub)


@dataclasses.dataclass
class CrossModal:
  """Captions retrieve their image: adaptive retrieval (shortlist at Ds, rerank at Dr) across
  modalities, relevance = the caption's own image."""
  dataset: str
  split: str
  funnels: tuple
  retrieval_ks: tuple[int, ...] = (1, 10)

  def run(self, inputs):
    images, captions, owner = read_images_and_captions(inputs.config.input, self.dataset,
                                                       self.split, inputs.embedder)
    z_img, z_txt = inputs.embedder.encode(images), inputs.embedder.encode(captions)
    rows = adaptive_retrieval.evaluate(
        list(self.funnels), z_img, np.arange(len(images)), z_txt, owner, search=inputs.search,
        num_classes=len(images), retrieval_ks=[k for k in self.retrieval_ks if k <= 10])
    yield f"{self.dataset}/adaptive_retrieval", rows
