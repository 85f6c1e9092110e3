"""Preprocessing geometry against hand-made images whose pixels encode their coordinates."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from tests.conftest import load_config

PLAIN = dict(channels=1)


def _coordinates(h, w):
  """uint8 [h, w, 1]: pixel (y, x) holds 1 + y * w + x (so 0 only ever comes from padding)."""
  assert h * w < 255
  return (1 + np.arange(h * w, dtype=np.uint8).reshape(h, w, 1))


def _seed(i):
  return tf.constant([3, i], tf.int64)


def _record_windows(monkeypatch) -> list:
  """The (y0, x0, h, w) of every crop window, recorded where the crop is cut."""
  windows = []
  crop = getattr(tf.image.crop_to_bounding_box, "original", tf.image.crop_to_bounding_box)

  def record(image, y0, x0, h, w):
    windows.append((int(y0), int(x0), int(h), int(w)))
    return crop(image, y0, x0, h, w)

  record.original = crop  # a second recording replaces this one instead of wrapping it
  monkeypatch.setattr(tf.image, "crop_to_bounding_box", record)
  return windows


def test_flip_mirrors_left_right_about_half_the_time():
  image = _coordinates(6, 9)
  pp = preprocess.Preprocess(name="random_crop", image_size=6, pad=0, flip=True, **PLAIN)
  flipped = 0
  for i in range(200):
    out = pp(tf.constant(image[:6, :6]), _seed(i)).numpy()
    if np.array_equal(out, image[:6, :6]):
      continue
    np.testing.assert_array_equal(out, image[:6, :6][:, ::-1])  # the width axis, exactly
    flipped += 1
  assert 70 <= flipped <= 130  # Binomial(200, 1/2): ~5 sigma either way


def test_random_crop_is_a_window_of_the_zero_padded_image():
  image = _coordinates(8, 8)
  pp = preprocess.Preprocess(name="random_crop", image_size=8, pad=2, **PLAIN)
  padded = np.pad(image, [(2, 2), (2, 2), (0, 0)])
  offsets = set()
  for i in range(300):
    out = pp(tf.constant(image), _seed(i)).numpy()
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(out, padded[dy:dy + 8, dx:dx + 8])]
    assert len(matches) == 1, i
    offsets |= set(matches)
  assert len(offsets) == 25  # every offset in [0, 2 * pad] x [0, 2 * pad] is drawn


def test_inception_crop_area_and_aspect_stay_in_their_bounds(monkeypatch):
  """The crop window (recorded where it is cut) has area in [0.08, 1] of the image and aspect
  w/h in [3/4, 4/3] (up to the rounding of integer sides), and spans those ranges."""
  windows = _record_windows(monkeypatch)
  image = np.zeros((120, 160, 1), np.uint8)
  pp = preprocess.Preprocess(name="inception_crop", image_size=16, **PLAIN)
  for i in range(300):
    assert pp(tf.constant(image), _seed(i)).shape == (16, 16, 1)
  h, w = np.asarray(windows, np.float64)[:, 2:].T
  area, aspect = h * w / (120 * 160), w / h
  whole = area == 1.0  # the fallback after 10 failed attempts: the whole image
  assert np.all((area[~whole] >= 0.08 - 0.01) & (area[~whole] <= 1.0))
  assert np.all((aspect[~whole] >= 3 / 4 - 0.05) & (aspect[~whole] <= 4 / 3 + 0.05))
  # Below 0.1 too: TF's min_object_covered (default 0.1 of the whole-image box) must be 0.
  assert area.min() < 0.1 and area[~whole].max() > 0.7 and whole.mean() < 0.2
  assert aspect.min() < 0.8 and aspect.max() > 1.25


def test_eval_preprocessing_never_flips_even_when_training_does():
  config = load_config("configs/digits_resnet_mrl.py")
  config.input.pp_train.flip = True
  config.input.pp_eval.flip = True  # even when asked to
  assert preprocess.from_config(config.input, train=True, channels=1).flip
  pp = preprocess.from_config(config.input, train=False, channels=1)
  assert not pp.flip
  image = tf.constant(_coordinates(8, 8))
  outs = {pp(image, _seed(i)).numpy().tobytes() for i in range(20)}
  assert len(outs) == 1


@pytest.mark.parametrize("reader", ["grain", "tf_data"])
def test_progressive_resizing_inside_both_readers(data_dir, reader):
  """Batches before the change step have the first size, from it on the second, in the
  stream each reader really produces (and from a resumed position)."""
  config = load_config("configs/digits_resnet_mrl.py")
  config.input.data_dir = data_dir
  config.input.reader = reader
  source = pipeline.open_source(config.input)
  r = pipeline.make_reader(config.input, source)
  base = preprocess.from_config(config.input, train=True, channels=1)
  base = dataclasses.replace(base, name="resize", image_size=8)  # any size from 8x8 digits
  tp = preprocess.TrainPreprocess(base, sizes=(8, 16),
                                  change_steps=(3,))

  def shapes(start, n):
    stream = r.train_batches("train", local_batch=16, start_batch=start, seed=0,
                             train_preprocess=tp, process_index=0, process_count=1,
                             shuffle_buffer=64)
    return [b["image"].shape[1:3] for _, b in zip(range(n), stream)]

  assert shapes(0, 5) == [(8, 8)] * 3 + [(16, 16)] * 2
  assert shapes(2, 2) == [(8, 8), (16, 16)]


def _ramps(h, w):
  """uint8 [h, w, 3] PNG bytes: red = row, green = column (linear ramps survive a linear
  resampling filter unchanged away from the border), blue = 0."""
  y, x = np.mgrid[:h, :w]
  image = np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)
  return tf.io.encode_png(image)


@pytest.mark.parametrize("h, w", [(60, 90), (90, 60)])  # landscape and portrait
def test_eval_resize_keeps_the_aspect_ratio_and_the_shorter_side(h, w):
  """resize_center_crop (the paper's eval: shorter side -> 256, centre 224) on a non-square
  image: the shorter side becomes resize_size with the aspect kept (both axes scale by the
  same factor, here 1/2), then the centre crop. Output pixel (i, j) of the crop samples the
  original at (2 (i + top) + 0.5, 2 (j + left) + 0.5): the ramps read back those coordinates.
  Squashing to a square, or scaling the longer side, moves them."""
  config = load_config("configs/resnet50_imagenet.py:mrl")
  config.input.pp_eval.update(name="resize_center_crop", resize_size=30, image_size=24)
  pp = preprocess.from_config(config.input, train=False, channels=3)
  out = pp.resample(_ramps(h, w), _seed(0)).numpy()
  assert out.shape == (24, 24, 3)
  top, left = ((h // 2) - 24) // 2, ((w // 2) - 24) // 2  # resized to h/2 x w/2
  i = np.arange(24)
  np.testing.assert_allclose(out[:, :, 0], np.broadcast_to((2 * (i + top) + 0.5)[:, None],
                                                           (24, 24)), atol=1e-3)
  np.testing.assert_allclose(out[:, :, 1], np.broadcast_to((2 * (i + left) + 0.5)[None, :],
                                                           (24, 24)), atol=1e-3)


@pytest.mark.parametrize("h, w", [(60, 90), (90, 60)])
def test_ffcv_eval_crops_a_centred_square_of_the_shorter_side(h, w):
  """center_crop_resize (FFCV's validation): the central square of crop_ratio x the shorter
  side (here 30 of 60), resized to image_size (15: factor 1/2). Inside the crop the ramps
  read back the sampled coordinates exactly; the outermost rows and columns see the filter
  clipped at the crop's edge (within 0.25)."""
  config = load_config("configs/resnet50_imagenet.py:mrl")
  config.input.pp_eval.update(name="center_crop_resize", crop_ratio=0.5, image_size=15)
  pp = preprocess.from_config(config.input, train=False, channels=3)
  out = pp.resample(_ramps(h, w), _seed(0)).numpy()
  top, left = (h - 30) // 2, (w - 30) // 2
  i = np.arange(15)
  rows = np.broadcast_to((top + 2 * i + 0.5)[:, None], (15, 15))
  cols = np.broadcast_to((left + 2 * i + 0.5)[None, :], (15, 15))
  for got, want in ((out[:, :, 0], rows), (out[:, :, 1], cols)):
    np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], atol=1e-3)
    np.testing.assert_allclose(got, want, atol=0.25)


# --- the fast resampling ------------------------------------------------------------------------

def _area_weights(n_in, n_out):
  """[n_out, n_in]: output pixel i averages the input over [i s, (i + 1) s), s = n_in / n_out,
  each input pixel j weighted by its overlap with that interval (a box filter)."""
  s = n_in / n_out
  lo, hi = np.arange(n_out)[:, None] * s, (np.arange(n_out)[:, None] + 1) * s
  j = np.arange(n_in)[None, :]
  return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) / s


def _bilinear_weights(n_in, n_out):
  """[n_out, n_in]: linear interpolation at (i + 0.5) s - 0.5, clamped to the edge pixels."""
  c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  j0 = np.floor(c).astype(int)
  w = np.zeros((n_out, n_in))
  w[np.arange(n_out), j0] += 1 - (c - j0)
  w[np.arange(n_out), np.minimum(j0 + 1, n_in - 1)] += c - j0
  return w


@pytest.mark.parametrize("shape, size", [((30, 41), (12, 16)),  # both shrink (2.5x, 2.56x)
                                         ((10, 12), (25, 31)),  # both grow
                                         ((30, 10), (12, 25)),  # rows shrink, columns grow
                                         ((9, 37), (20, 14)),   # rows grow, columns shrink
                                         ((17, 23), (17, 13)),  # one axis unchanged
                                         ((17, 8), (17, 16)),  # unchanged rows, growing
                                         ((8, 23), (16, 23))])  # growing rows, unchanged
def test_area_resize_is_a_box_filter_shrinking_and_bilinear_growing(shape, size):
  """Against the filters written out in numpy: out = Wy x Wx^T per channel."""
  x = np.random.default_rng(0).uniform(0, 255, (*shape, 3)).astype(np.float32)
  weights = [(_area_weights if n > m else _bilinear_weights)(n, m) for n, m in zip(shape, size)]
  want = np.einsum("ih,hwc,jw->ijc", weights[0], x, weights[1])
  got = preprocess.area_resize(tf.constant(x), size).numpy()
  np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize("shape, size", [((10, 12), (25, 31)), ((7, 30), (31, 30))])
def test_growing_axes_get_the_antialiased_filters_weights(shape, size):
  """Where an axis grows, the triangle filter's support is one pixel: bilinear, exactly."""
  x = np.random.default_rng(1).uniform(0, 255, (*shape, 1)).astype(np.float32)
  np.testing.assert_allclose(
      preprocess.area_resize(tf.constant(x), size).numpy(),
      tf.image.resize(x, size, method="bilinear", antialias=True).numpy(), atol=2e-3)


def _coordinate_image(h=120, w=160):
  """uint8 [h, w, 3]: red = row, green = column, blue = their mean (linear ramps, which any
  normalised filter reproduces, so the output's values read back where it sampled)."""
  y, x = np.mgrid[:h, :w]
  return np.stack([y, x, (y + x) // 2], -1).astype(np.uint8)


@pytest.mark.parametrize("size", [16, 96, 224])  # shrinking, mixed and growing windows
def test_area_path_draws_todays_windows_within_one_level(size, monkeypatch):
  """For the same seeds both filters crop the same windows (recorded where they are cut) and
  flip alike; the area output reads back the window's coordinates (rows and columns sampled
  at y0 + (i + 0.5) h / size - 0.5) and stays within 1 level of 255 of the antialiased one."""
  windows, outs = {}, {}
  image = _coordinate_image()
  for resize in ("area", "antialias"):
    windows[resize] = _record_windows(monkeypatch)
    pp = preprocess.Preprocess(name="inception_crop", image_size=size, channels=3, flip=True,
                               resize=resize)
    outs[resize] = [pp(tf.constant(image), _seed(i)).numpy().astype(int) for i in range(40)]
  assert windows["area"] == windows["antialias"] and len(set(windows["area"])) > 30
  for (y0, x0, h, w), a, b in zip(windows["area"], outs["area"], outs["antialias"]):
    assert np.abs(a - b).max() <= 1
    i = np.arange(size)
    rows, cols = y0 + (i + 0.5) * h / size - 0.5, x0 + (i + 0.5) * w / size - 0.5
    inner = slice(1, -1)  # growing: the outermost samples clamp to the edge pixel
    np.testing.assert_allclose(a[inner, 0, 0], rows[inner], atol=0.51)
    flipped = a[0, 0, 1] > a[0, -1, 1]
    np.testing.assert_allclose(a[0, inner, 1][::-1] if flipped else a[0, inner, 1], cols[inner],
                               atol=0.51)


def test_on_photographs_area_stays_within_the_stated_bound_of_antialias():
  """docs/data.md / BENCHMARKS.md state, over 256 photographs at 224 px: mean |difference| 0.3
  levels of 255, 99.9% of values within 12, max 41 (sharp edges). Here 24 of them, bounds with
  a margin for the smaller sample: the area path is a close substitute, not a different image."""
  from mrl_jax.data import photos  # pylint: disable=g-import-not-at-top
  kwargs = dict(name="inception_crop", image_size=224, channels=3, flip=True)
  area = preprocess.Preprocess(**kwargs)
  antialias = preprocess.Preprocess(**kwargs, resize="antialias")
  diffs = []
  for i, data in enumerate(photos.jpegs(24)):
    data = tf.constant(data)
    diffs.append(np.abs(area(data, _seed(i)).numpy().astype(int)
                        - antialias(data, _seed(i)).numpy().astype(int)).ravel())
  d = np.concatenate(diffs)
  assert d.mean() < 0.6 and np.percentile(d, 99.9) <= 16 and d.max() <= 64
  assert d.mean() > 0.05  # not the same filter: the bound is measured, not vacuous


def test_default_parameters_are_the_published_recipes():
  """A preset built without parameters uses the recipes it is named after: the Inception crop
  of Szegedy et al. 2015 as torchvision's RandomResizedCrop defaults it (area 8-100 %, aspect
  3/4-4/3), He et al. 2016's CIFAR crop (4 px of zero padding per side, Sec. 4.2) and the
  ImageNet evaluation resize to 256 then centre crop 224 (ratio 0.875)."""
  pp = preprocess.Preprocess(name="inception_crop", image_size=224, channels=3)
  assert (pp.area_min, pp.area_max) == (0.08, 1.0)
  assert (pp.ratio_min, pp.ratio_max) == pytest.approx((0.75, 4 / 3), abs=0)
  assert pp.pad == 4 and pp.resize_size == 256 and pp.crop_ratio == 0.875
  assert pp.resize == "area" and not pp.flip


def test_configured_aspect_range_reaches_the_window_sampler(monkeypatch):
  """ratio_min = ratio_max = 1: every window is square (to the rounding of integer sides)."""
  windows = _record_windows(monkeypatch)
  pp = preprocess.Preprocess(name="inception_crop", image_size=8, ratio_min=1.0, ratio_max=1.0,
                             **PLAIN)
  for i in range(100):
    pp(tf.constant(np.zeros((120, 160, 1), np.uint8)), _seed(i))
  h, w = np.asarray([hw for _, _, *hw in windows if hw != [120, 160]]).T
  assert len(h) > 50 and np.all(np.abs(h - w) <= 1)


@pytest.mark.parametrize("resize", ["area", "antialias"])
def test_each_resize_method_is_its_filter_on_a_halving(resize):
  """An 8x8 noise image resized to 4x4 ('resize' preset): `area` is the 2x2 block mean
  (numpy); `antialias` is TF's triangle filter, whose 4-tap kernel differs from the box."""
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 1)).astype(np.uint8)
  pp = preprocess.Preprocess(name="resize", image_size=4, resize=resize, **PLAIN)
  got = pp.resample(tf.constant(image), _seed(0)).numpy()
  box = image.astype(np.float64).reshape(4, 2, 4, 2, 1).mean(axis=(1, 3))
  if resize == "area":
    np.testing.assert_allclose(got, box, atol=1e-3)
  else:
    want = tf.image.resize(image.astype(np.float32), (4, 4), antialias=True).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.abs(got - box).max() > 5


def _encoded(fmt, mode):
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (40, 50, 1 if mode == "L" else 3)).astype(np.uint8)
  out = io.BytesIO()
  image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels)
  image.convert(mode).save(out, format=fmt)
  return out.getvalue()


@pytest.mark.parametrize("fmt, mode", [("JPEG", "L"), ("PNG", "L"), ("GIF", "P"),
                                       ("PNG", "RGB")])
@pytest.mark.parametrize("name", ["inception_crop", "resize_center_crop"])
def test_grayscale_palette_and_gif_files_decode_to_the_configured_channels(fmt, mode, name):
  """ImageNet holds grayscale JPEGs (and TFDS builders may store PNG or GIF): every file
  decodes to `channels` (3) and to one frame, in training and in evaluation."""
  pp = preprocess.Preprocess(name=name, image_size=16, channels=3, resize_size=20)
  out = pp(tf.constant(_encoded(fmt, mode)), _seed(0)).numpy()
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  if mode == "L":  # gray stays gray: three equal channels
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_train_preset_and_progressive_schedule_from_config():
  """train_from_config builds config.input.pp_train (not pp_eval); without progressive resizing
  the size is image_size at every step (also in TF); with it the schedule is FFCV's formula
  computed by hand: interp(epoch, [0, 2], [64, 128]) rounded to 32 -> 64, 96, 128 at epochs 0,
  1, 2, the last change exactly at end_epoch."""
  config = load_config("configs/resnet50_imagenet.py:mrl")
  config.input.progressive_resize.enabled = False
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=10)
  assert tp.preprocess.name == config.input.pp_train.name == "inception_crop"
  assert tp.preprocess.flip and tp.all_sizes() == (config.input.image_size,)
  assert int(tp.size_for_step_tf(12345)) == config.input.image_size
  config.input.progressive_resize.update(enabled=True, start_epoch=0, end_epoch=2, min_res=64,
                                         max_res=128, multiple=32)
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=10)
  assert tp.sizes == (64, 96, 128) and tp.change_steps == (10, 20)
