"""Image-text examples: the image preprocessing of preprocess.py and the text of text.py.

An image-text dataset has an image feature and a caption feature (config.input.caption_key):
one string, a Sequence of strings (several captions per image, as the built-in
`mnist_captions`), or a Sequence of dicts holding the string (`captions/text`, as TFDS
`coco_captions`). In training each example contributes its image (the train preprocessing,
seeded by stream position as always) and one of its captions, drawn with the text
preprocessing's generator for (seed, position); evaluation reads every caption
(evaluation/image_text.py). The batch: `image` [B, H, W, C] and the caption's `input_ids`,
`segment_ids`, `input_mask` [B, L].
"""

import dataclasses

import numpy as np

from mrl_jax.data import preprocess
from mrl_jax.data import text
from mrl_jax.errors import ConfigError


# The tf.data reader joins an example's captions into one string (ragged lists do not batch).
JOINED_KEY, SEPARATOR = "_captions", "\x1f"


def captions_of(record: dict, caption_key: str) -> list[str]:
  """Every caption of a raw record (`a/b`: the field b of a nested feature a)."""
  if JOINED_KEY in record:
    joined = record[JOINED_KEY]
    joined = joined.decode() if isinstance(joined, bytes) else str(joined)
    return [c for c in joined.split(SEPARATOR) if c] if joined else []
  value = record
  for part in caption_key.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise ConfigError(f"the dataset's examples have no {caption_key!r} "
                        "(config.input.caption_key)")
    value = value[part]
  items = [value] if isinstance(value, (bytes, str)) or np.ndim(value) == 0 else list(value)
  return [i.decode() if isinstance(i, bytes) else str(i) for i in items]


@dataclasses.dataclass(frozen=True)
class ImageTextPreprocess:
  """Training examples: the image preset (per step, progressive resizing included) and one
  caption per example, tokenized."""
  image: preprocess.TrainPreprocess
  text: text.TextPreprocess  # task "embed" on the feature "caption"
  caption_key: str

  def captions(self, records, positions, seed) -> list[dict]:
    """One caption per record, drawn from (seed, position): [{"caption": str}]."""
    out = []
    for record, position in zip(records, positions):
      options = captions_of(record, self.caption_key)
      if not options:
        raise ConfigError(f"an example without any caption ({self.caption_key!r}) at stream "
                          f"position {int(position)}")
      rng = np.random.default_rng([int(seed), max(int(position), 0), 11])
      out.append({"caption": options[int(rng.integers(len(options)))]})
    return out

  def text_batch(self, records, positions, seed) -> dict[str, np.ndarray]:
    tokens = self.text(self.captions(records, positions, seed), positions, seed)
    return {k.removeprefix("caption_"): v for k, v in tokens.items()}


def from_config(config, source, *, train: bool, steps_per_epoch: int = 1
                ) -> ImageTextPreprocess:
  image = (preprocess.train_from_config(config.input, channels=source.channels,
                                        steps_per_epoch=steps_per_epoch) if train else
           preprocess.TrainPreprocess(preprocess.from_config(config.input, train=False,
                                                             channels=source.channels)))
  tokens = text.from_config(config, task="embed", keys=("caption",), train=train)
  return ImageTextPreprocess(image, tokens, config.input.caption_key)
