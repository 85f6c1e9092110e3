"""The one preprocessing definition, shared by both readers (grain and tf.data).

Written once with TensorFlow image ops: tf.data runs it inside its graph; the grain reader calls
the same function (compiled once with `tf.function`) on each record. Every random choice uses
stateless ops seeded by (config seed, position of the example in this process's stream), so
the same record at the same position gives the same pixels under either reader, and a resumed
run draws the same augmentations as an uninterrupted one.

Presets (config.input.pp_train / pp_eval `name`):
- `inception_crop`: random area/aspect crop (area in [area_min, area_max], aspect in
  [ratio_min, ratio_max], 10 attempts, else the whole image) resized to image_size; JPEGs are
  decoded only inside the crop window (`decode_and_crop_jpeg`), as big_vision and the
  flax ImageNet example do.
- `random_crop`: pad by `pad` pixels (zeros), random image_size crop (CIFAR/MNIST style).
- `resize_center_crop`: resize the shorter side to resize_size, central image_size crop
  (ImageNet eval: 256 -> 224, as the official MRL inference script `inference/pytorch_inference.py`,
  which produced the paper's tables).
- `center_crop_resize`: central square of crop_ratio x the shorter side, resized to image_size
  (FFCV's validation `CenterCropRGBImageDecoder(ratio=224/256)` at resolution 256, which the
  official training script reports during training).
- `resize`: resize to image_size x image_size.
`flip` adds a random horizontal flip (train presets only).

Output: uint8 pixels. The model normalises them on the device ((x - config.input.mean) /
config.input.std, `models.normalize_pixels`): 4x less to copy to the accelerators than float32,
and no float work on the host (FFCV does the same).

Resampling (`resize`): "area" (default) averages each output pixel's footprint where an axis
shrinks (a box filter: OpenCV's INTER_AREA, which FFCV's decoders apply to every crop, so the
official MRL run trained on it; alias-suppressing, unlike plain bilinear) and interpolates
bilinearly where it grows (the same weights the antialiased triangle filter has there). It costs
~1/4 of "antialias", TensorFlow's antialiased triangle filter in float32 (what PIL and
torchvision's Resize compute), which stays available. On photographs the two differ by a few
levels of 255 on average, more at sharp edges (BENCHMARKS.md, "Preprocessing").
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from mrl_jax.errors import ConfigError

PRESETS = ("inception_crop", "random_crop", "resize_center_crop", "center_crop_resize", "resize")
RESIZE_METHODS = ("area", "antialias")

# JAX owns the accelerators; TF is only used for input ops on the host.
try:
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # Already initialised, or no such device type.
  pass


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """A preprocessing preset with its parameters; `__call__` is the TF implementation."""
  name: str
  image_size: int
  channels: int
  flip: bool = False
  resize: str = "area"
  area_min: float = 0.08
  area_max: float = 1.0
  ratio_min: float = 3 / 4
  ratio_max: float = 4 / 3
  pad: int = 4
  resize_size: int = 256
  crop_ratio: float = 224 / 256

  def __post_init__(self):
    if self.name not in PRESETS:
      raise ConfigError(f"unknown preprocessing {self.name!r} (config.input.pp_*.name); "
                        f"allowed: {list(PRESETS)}")
    if self.resize not in RESIZE_METHODS:
      raise ConfigError(f"unknown resize {self.resize!r} (config.input.pp_*.resize); "
                        f"allowed: {list(RESIZE_METHODS)}")

  def __call__(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """image: encoded bytes (scalar tf.string) or uint8 [H, W, C]; seed: int [2].

    Returns uint8 [image_size, image_size, channels].
    """
    # Rounded by +0.5 and truncation: every filter here is a convex combination of uint8
    # values, so nothing falls outside [0, 255] and no clipping is needed (2 ops, not 4).
    return tf.cast(self.resample(image, seed) + 0.5, tf.uint8)

  def resample(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The output before rounding to uint8: float32 pixels in [0, 255]."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    size = (self.image_size, self.image_size)
    if self.name == "inception_crop":
      x = self._inception_crop(image, crop_seed)
    else:
      x = tf.cast(self._decode(image), tf.float32)
      if self.name == "random_crop":
        x = tf.pad(x, [[self.pad, self.pad], [self.pad, self.pad], [0, 0]])
        x = tf.image.stateless_random_crop(x, (*size, self.channels), crop_seed)
      elif self.name == "resize_center_crop":
        x = self._resize_shorter(x, self.resize_size)
        x = self._center_crop(x, self.image_size)
      elif self.name == "center_crop_resize":  # FFCV: side = int(ratio * shorter side)
        side = tf.cast(self.crop_ratio * tf.cast(tf.reduce_min(tf.shape(x)[:2]), tf.float32),
                       tf.int32)
        x = self._resize(self._center_crop(x, side), size)
      else:  # resize
        x = self._resize(x, size)
    if self.flip:
      x = tf.image.stateless_random_flip_left_right(x, flip_seed)
    return tf.ensure_shape(x, (*size, self.channels))

  def _resize(self, x, size):
    if self.resize == "antialias":
      return tf.image.resize(x, size, method="bilinear", antialias=True)
    return area_resize(x, size)

  def _decode(self, image):
    if image.dtype == tf.string:
      return tf.io.decode_image(image, channels=self.channels, expand_animations=False)
    return image

  def _inception_crop(self, image, seed):
    if image.dtype == tf.string:
      shape = tf.cond(tf.io.is_jpeg(image), lambda: tf.image.extract_jpeg_shape(image),
                      lambda: tf.shape(self._decode(image), out_type=tf.int32))
    else:
      shape = tf.shape(image)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=(self.ratio_min, self.ratio_max),
        area_range=(self.area_min, self.area_max), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    y0, x0, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop_size)
    if image.dtype == tf.string:
      window = tf.stack([y0, x0, h, w])
      crop = tf.cond(
          tf.io.is_jpeg(image),
          lambda: tf.image.decode_and_crop_jpeg(image, window, channels=self.channels),
          lambda: tf.image.crop_to_bounding_box(self._decode(image), y0, x0, h, w))
    else:
      crop = tf.image.crop_to_bounding_box(image, y0, x0, h, w)
    return self._resize(tf.cast(crop, tf.float32), (self.image_size, self.image_size))

  def _resize_shorter(self, x, target):
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    scale = tf.cast(target, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32)
    return self._resize(x, tf.stack([new_h, new_w]))

  def _center_crop(self, x, side):
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    top = (h - side) // 2
    left = (w - side) // 2
    return tf.image.crop_to_bounding_box(x, top, left, side, side)


def area_resize(x: tf.Tensor, size) -> tf.Tensor:
  """float32 [h, w, C] -> [size[0], size[1], C]: an area average along each axis that shrinks,
  bilinear interpolation (half-pixel centres) along each axis that grows. One resize op when
  both axes shrink or both grow, one per axis otherwise. Raw ops: tf.image.resize's checks
  and reshapes cost ~0.1 ms per image, a fifth of the whole resize. Float input: TF's uint8
  resize kernels are slower than casting first (0.35 vs 0.25 ms at 300x280 -> 224, one core)."""
  th, tw = size[0], size[1]
  x = x[None]
  h, w = tf.shape(x)[1], tf.shape(x)[2]

  def resize(y, out_h, out_w, shrink):
    out = tf.stack([out_h, out_w])
    return tf.cond(shrink, lambda: tf.raw_ops.ResizeArea(images=y, size=out),
                   lambda: tf.raw_ops.ResizeBilinear(images=y, size=out, half_pixel_centers=True))

  alike = tf.logical_or(tf.logical_and(h >= th, w >= tw), tf.logical_and(h <= th, w <= tw))
  return tf.cond(alike, lambda: resize(x, th, tw, tf.logical_or(h > th, w > tw)),
                 lambda: resize(resize(x, th, w, h > th), th, tw, w > tw))[0]


def from_config(input_cfg, *, train: bool, channels: int, image_size: int | None = None,
                ) -> Preprocess:
  """The train or eval preset of config.input (image_size override: progressive resizing)."""
  pp = input_cfg.pp_train if train else input_cfg.pp_eval
  kwargs = {k: v for k, v in pp.items() if k not in ("name", "image_size")}
  if not train:
    kwargs.pop("flip", None)  # Eval never flips; flip TTA is an evaluator option.
  # pp_eval.image_size: an eval resolution of its own (FFCV validates ResNet-50 at 256).
  image_size = image_size or pp.get("image_size") or input_cfg.image_size
  return Preprocess(name=pp.name, image_size=image_size, channels=channels, **kwargs)


@dataclasses.dataclass(frozen=True)
class TrainPreprocess:
  """The train preset at each step. Progressive resizing (FFCV's recipe, used by the official MRL
  training) changes image_size at `change_steps`: sizes[0] before change_steps[0], sizes[i] from
  change_steps[i - 1] on. Without it there is one size and no change step."""
  preprocess: Preprocess
  sizes: tuple[int, ...] = ()
  change_steps: tuple[int, ...] = ()

  def for_step(self, step: int) -> Preprocess:
    if not self.change_steps:
      return self.preprocess
    index = int(np.searchsorted(np.asarray(self.change_steps), step, side="right"))
    return dataclasses.replace(self.preprocess, image_size=self.sizes[index])

  def all_sizes(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.sizes))) if self.sizes else (self.preprocess.image_size,)

  def size_for_step_tf(self, step):
    """tf version of for_step(step).image_size."""
    if not self.change_steps:
      return tf.constant(self.preprocess.image_size)
    index = tf.reduce_sum(tf.cast(
        tf.cast(step, tf.int64) >= tf.constant(self.change_steps, tf.int64), tf.int32))
    return tf.gather(tf.constant(self.sizes), index)


def train_from_config(input_cfg, *, channels: int, steps_per_epoch: int) -> TrainPreprocess:
  """TrainPreprocess from config.input, with progressive resizing when enabled.

  FFCV: res(epoch) = interp(epoch, [start_epoch, end_epoch], [min_res, max_res]) rounded to a
  multiple of `multiple`; held constant within an epoch.
  """
  base = from_config(input_cfg, train=True, channels=channels)
  pr = input_cfg.progressive_resize
  if not pr.enabled:
    return TrainPreprocess(base)
  last_epoch = int(math.ceil(pr.end_epoch)) + 1
  sizes, change_steps = [], []
  for epoch in range(last_epoch + 1):
    res = float(np.interp(epoch, [pr.start_epoch, pr.end_epoch], [pr.min_res, pr.max_res]))
    res = int(round(res / pr.multiple)) * pr.multiple
    if not sizes:
      sizes.append(res)
    elif res != sizes[-1]:
      sizes.append(res)
      change_steps.append(epoch * steps_per_epoch)
  return TrainPreprocess(base, tuple(sizes), tuple(change_steps))
