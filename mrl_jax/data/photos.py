"""Real photographs from installed wheels, re-encoded like ImageNet's JPEGs.

The offline stand-in for ImageNet files wherever decoding speed or resampling quality matters
(benchmarks/input_pipeline.py, the preprocessing tests): synthetic fields compress and resample
unlike photographs. The sources are the photographs that ship inside wheels: scikit-learn's
`china.jpg` and `flower.jpg` (427x640) and matplotlib's `grace_hopper.jpg` (600x512) when
matplotlib is installed. Each output is a random window of one of them (55-100% of its height),
resized (PIL, Lanczos) to one of ImageNet's most common sizes (500x375, 375x500, 500x333,
333x500, 500x500, 400x300), flipped at random and saved as a baseline JPEG at quality 75-95:
~40-60 KB each, like ImageNet's 500x375 files. Three scenes, so not ImageNet's variety of
content; the decode and resize costs depend on size and compressibility, which match.
"""

import io
import os

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300))  # (w, h)


def sources() -> list[np.ndarray]:
  """The photographs (uint8 [H, W, 3]) found in installed wheels."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  out = list(load_sample_images().images)
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                        "grace_hopper.jpg")
    out.append(np.asarray(Image.open(path).convert("RGB")))
  except (ImportError, OSError):
    pass
  return out


def jpegs(n: int, seed: int = 0, max_side: int | None = None) -> list[bytes]:
  """n JPEG files (bytes) at ImageNet's sizes and qualities, deterministic for a seed;
  max_side: re-encoded FFCV-style, the longer side area-resized to at most max_side and saved
  again at quality 90 (a re-encoded dataset)."""
  rng = np.random.default_rng(seed)
  photos = sources()
  out = []
  for i in range(n):
    src = photos[i % len(photos)]
    h, w = src.shape[:2]
    tw, th = SIZES[rng.integers(len(SIZES))]
    ch = int(h * rng.uniform(0.55, 1.0))
    cw = min(w, int(ch * tw / th))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = Image.fromarray(src[y:y + ch, x:x + cw]).resize((tw, th), Image.LANCZOS)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
    if max_side and max(image.size) > max_side:
      image = Image.open(io.BytesIO(buf.getvalue()))
      scale = max_side / max(image.size)
      image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                           Image.BOX)
      buf = io.BytesIO()
      image.save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out
