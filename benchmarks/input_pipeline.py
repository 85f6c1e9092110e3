r"""Training preprocessing per CPU core, next to the bare decode-and-crop, on real photographs.

The dataset: `photos.jpegs` (photographs from installed wheels re-encoded at ImageNet's sizes and
JPEG qualities, ~43 KB each) prepared as a TFDS dataset in both file formats. Each measurement
runs in its own process with TensorFlow and the reader restricted to one thread (`--threads`),
so its images/s is a per-core figure, and all of them run in one invocation:

- `decode_crop`: the Inception-crop window drawn and `decode_and_crop_jpeg` on it, per example
  in a one-thread tf.data map over the files in memory, nothing else: the floor the
  preprocessing cannot beat.
- `grain` / `tf_data`, resize `area` (the default) or `antialias` (the earlier float32 triangle
  filter): the whole training input of the readers, reading the records, Inception crop, resize,
  flip, uint8 batch, at 160, 192 and 224 px; `share` is its rate over decode_crop's.
- `read`: the readers alone (records to batches of bytes): their per-example overhead.
- grain's shuffle alone (`index_shuffle`, one call per record) at several split lengths.
- the pixel difference of area vs antialias on the same windows (levels of 255).

grain reads the photos as a split of ImageNet-1k's length (`--grain_split_length`, 1,281,167:
record i is photo i mod --num_images): its shuffle's cost per record depends on the split
length alone (4.6 us at ImageNet-1k's, ~53 us at 512 records, printed by the same run), so a
512-record split would charge grain a cost it does not have on ImageNet. tf.data's buffer
shuffle costs the same per record at any length.

The last column is how many such cores a target rate needs (default 8 GPUs x 3,000 img/s).

  python benchmarks/input_pipeline.py --num_images=512
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = (160, 192, 224)


def _builder_cls(num_images: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import photos  # pylint: disable=g-import-not-at-top

  class RealPhotos(tfds.core.GeneratorBasedBuilder):
    """num_images photographs at ImageNet's sizes and JPEG qualities, 1000 classes."""
    VERSION = tfds.core.Version(f"1.0.{num_images}")
    url_infos = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, data in enumerate(photos.jpegs(num_images)):
        yield i, {"image": data, "label": i % 1000}  # stored as is (JPEG bytes)

  return RealPhotos


def _limit_threads(threads: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  return tf


def measure_decode_crop(data_dir: str, threads: int, num_images: int, timed: int, size: int
                        ) -> dict:
  tf = _limit_threads(threads)
  from mrl_jax.data import photos  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  del data_dir
  pp = preprocess.Preprocess(name="inception_crop", image_size=size, channels=3)

  def decode_crop(position, data):  # the window of _inception_crop, decoded, nothing more
    seed = tf.random.experimental.stateless_split(tf.stack([tf.constant(0, tf.int64),
                                                            position]), 2)[0]
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(data), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=(pp.ratio_min, pp.ratio_max),
        area_range=(pp.area_min, pp.area_max), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  ds = tf.data.Dataset.from_tensor_slices(photos.jpegs(num_images)).repeat().enumerate()
  ds = ds.map(decode_crop, num_parallel_calls=threads)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  return _time_examples(iter(ds.with_options(options)), timed)


def measure_memory(data_dir: str, threads: int, num_images: int, timed: int, size: int,
                   max_side: int | None) -> dict:
  """The whole training preprocessing over files in memory (no reader), optionally on the
  photographs re-encoded at max_side."""
  tf = _limit_threads(threads)
  from mrl_jax.data import photos  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  del data_dir
  pp = preprocess.Preprocess(name="inception_crop", image_size=size, channels=3, flip=True)
  ds = tf.data.Dataset.from_tensor_slices(photos.jpegs(num_images, max_side=max_side))
  ds = ds.repeat().enumerate().map(
      lambda i, data: pp(data, tf.stack([tf.constant(0, tf.int64), i])),
      num_parallel_calls=threads)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  return _time_examples(iter(ds.with_options(options)), timed)


def _time_examples(it, n: int) -> dict:
  for _ in range(32):  # warm-up: tracing
    next(it)
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  return {"images_per_second": n / (time.perf_counter() - t0)}


class _LongSplit:
  """A data source seen as `length` records: record i is record i mod len(source)."""

  def __init__(self, source, length: int):
    self.source, self.length = source, length

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    return self.source[i % len(self.source)]


def _long_grain_split(reader, length: int):
  """The grain reader's data sources made `length` records long (0: as prepared)."""
  if length:
    data_source = reader._data_source  # pylint: disable=protected-access
    reader._data_source = lambda *a, **k: _LongSplit(data_source(*a, **k), length)  # pylint: disable=protected-access


def measure_index_shuffle(length: int) -> dict:
  """grain's shuffle alone: one `index_shuffle` call per record, as MapDataset.shuffle makes."""
  import grain  # pylint: disable=g-import-not-at-top
  n = 2000
  t0 = time.perf_counter()
  for i in range(n):
    grain.experimental.index_shuffle(i % length, max_index=length - 1, seed=3, rounds=4)
  return {"us_per_record": (time.perf_counter() - t0) / n * 1e6}


def measure_reader(reader: str, data_dir: str, threads: int, num_images: int, timed: int,
                   size: int, resize: str, batch: int, split_length: int) -> dict:
  _limit_threads(threads)
  from configs import common  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  _builder_cls(num_images)  # registers the dataset name
  config = common.base_config()
  config.input.update(dataset="real_photos", data_dir=data_dir, reader=reader,
                      num_workers=threads, image_size=size)
  config.input.pp_train.resize = resize
  source = pipeline.open_source(config.input)
  r = pipeline.make_reader(config.input, source)
  if reader == "grain":
    _long_grain_split(r, split_length)
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=1)
  it = r.train_batches("train", local_batch=batch, start_batch=0, seed=0, train_preprocess=tp,
                       process_index=0, process_count=1, shuffle_buffer=num_images)
  next(it)  # warm-up: tracing, file opening
  n_batches = max(2, timed // batch)
  t0 = time.perf_counter()
  for _ in range(n_batches):
    b = next(it)
  seconds = time.perf_counter() - t0
  assert b["image"].shape == (batch, size, size, 3) and b["image"].dtype == np.uint8
  return {"images_per_second": n_batches * batch / seconds}


def measure_read(reader: str, data_dir: str, threads: int, num_images: int, timed: int,
                 batch: int, split_length: int) -> dict:
  """The reader alone: records (image bytes undecoded) to batches."""
  tf = _limit_threads(threads)
  import grain  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _builder_cls(num_images)  # registers the dataset name
  config = common.base_config()
  config.input.update(dataset="real_photos", data_dir=data_dir)
  builder = pipeline.open_source(config.input).builder(pipeline.FILE_FORMAT[reader])
  skip = {"image": tfds.decode.SkipDecoding()}
  if reader == "grain":
    src = builder.as_data_source(split="train", decoders=skip)
    ds = grain.MapDataset.source(_LongSplit(src, split_length) if split_length else src)
    ds = ds.seed(0).shuffle().repeat(None).batch(batch, batch_fn=list).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads + 1))
  else:
    ds = builder.as_dataset(split="train", shuffle_files=True, decoders=skip)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = ds.repeat().shuffle(num_images).with_options(options).batch(batch)
    ds = ds.as_numpy_iterator()
  it = iter(ds)
  next(it)
  n_batches = max(4, 4 * timed // batch)
  t0 = time.perf_counter()
  for _ in range(n_batches):
    next(it)
  return {"images_per_second": n_batches * batch / (time.perf_counter() - t0)}


def pixel_difference(num_images: int, size: int) -> dict:
  """|area - antialias| (uint8 outputs, same windows and flips) over num_images photographs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import photos  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  area = preprocess.Preprocess(name="inception_crop", image_size=size, channels=3, flip=True)
  antialias = preprocess.Preprocess(name="inception_crop", image_size=size, channels=3,
                                    flip=True, resize="antialias")
  diffs = []
  for i, data in enumerate(photos.jpegs(num_images)):
    seed = tf.constant([0, i], tf.int64)
    a, b = area(tf.constant(data), seed).numpy(), antialias(tf.constant(data), seed).numpy()
    diffs.append(np.abs(a.astype(np.int32) - b.astype(np.int32)).ravel())
  d = np.concatenate(diffs)
  return {"mean": float(d.mean()), "p99": float(np.percentile(d, 99)),
          "p99.9": float(np.percentile(d, 99.9)), "max": int(d.max())}


FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 512, "photographs in the benchmark dataset")
flags.DEFINE_integer("threads", 1, "threads per measurement (1: per-core figures)")
flags.DEFINE_integer("batch", 64, "batch size")
flags.DEFINE_list("sizes", [str(s) for s in SIZES], "output sizes (px)")
flags.DEFINE_float("target", 8 * 3000, "images/s the cores-needed column is computed for")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: a temporary one)")
flags.DEFINE_integer("timed_images", 2048, "images timed per measurement (after warm-up)")
flags.DEFINE_integer("repeats", 3, "runs per figure (the median is reported)")
flags.DEFINE_integer("grain_split_length", 1281167, "the split length grain's shuffle sees "
                     "(ImageNet-1k's train split; 0: the prepared num_images)")
flags.DEFINE_string("measure", None, "internal: one measurement as JSON, in a subprocess")


def _run(kind: str, key: str = "images_per_second", **kwargs) -> float:
  """One measurement in a fresh process (TF thread settings precede TF initialisation)."""
  spec = json.dumps(dict(kwargs, kind=kind))
  out = subprocess.run([sys.executable, __file__, f"--measure={spec}"], capture_output=True,
                       text=True, check=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0"))
  return json.loads(out.stdout.strip().splitlines()[-1])[key]


def main(argv):
  del argv
  if FLAGS.measure:
    spec = json.loads(FLAGS.measure)
    kind = spec.pop("kind")
    fn = {"decode_crop": measure_decode_crop, "reader": measure_reader,
          "read": measure_read, "memory": measure_memory,
          "index_shuffle": measure_index_shuffle}[kind]
    print(json.dumps(fn(**spec)))
    return 0
  data_dir = FLAGS.data_dir or os.path.join(tempfile.gettempdir(), "mrl_jax_bench_photos")
  from mrl_jax.data import builtin  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  builtin.prepare_both_formats(_builder_cls(FLAGS.num_images), data_dir)
  print(f"dataset ready in {time.perf_counter() - t0:.1f}s ({data_dir})", flush=True)
  common = dict(data_dir=data_dir, threads=FLAGS.threads, num_images=FLAGS.num_images,
                timed=FLAGS.timed_images)
  per = "per core" if FLAGS.threads == 1 else f"per {FLAGS.threads} threads"
  rows = []
  for size in [int(s) for s in FLAGS.sizes]:
    # Each figure is the median of --repeats runs, interleaved so that a noisy minute of the
    # machine is spread over every pipeline rather than landing on one.
    names = [("decode_crop", "-")] + [(reader, resize) for reader in ("grain", "tf_data")
                                      for resize in ("area", "antialias")]
    rates = {name: [] for name in names}
    for _ in range(FLAGS.repeats):
      for name, resize in names:
        if name == "decode_crop":
          rate = _run("decode_crop", size=size, **common)
        else:
          rate = _run("reader", reader=name, size=size, resize=resize, batch=FLAGS.batch,
                      split_length=FLAGS.grain_split_length, **common)
        rates[(name, resize)].append(rate)
    for (name, resize), runs in rates.items():
      rows.append((size, name, resize, float(np.median(runs))))
      print(rows[-1], [round(r) for r in runs], flush=True)
  reads = {reader: _run("read", reader=reader, batch=FLAGS.batch,
                       split_length=FLAGS.grain_split_length, **common)
           for reader in ("grain", "tf_data")}
  lengths = (FLAGS.num_images, 1281167, 14197122)  # ImageNet-1k's and -21k's train splits
  shuffle_us = {n: _run("index_shuffle", length=n, key="us_per_record") for n in lengths}
  size = max(int(s) for s in FLAGS.sizes)
  reencoded = {side: _run("memory", size=size, max_side=side, **common) for side in (None, 256)}
  print(f"\n| px | pipeline | resize | images/s {per} | share of decode_crop | "
        f"cores for {FLAGS.target:.0f} img/s |\n|---|---|---|---|---|---|")
  bare = {}
  for size, name, resize, rate in rows:
    bare.setdefault(size, rate)
    print(f"| {size} | {name} | {resize} | {rate:.0f} | {rate / bare[size]:.0%} | "
          f"{FLAGS.target / rate * FLAGS.threads:.0f} |")
  print(f"\n| reader alone | records/s {per} | us per record |\n|---|---|---|")
  for reader, rate in reads.items():
    print(f"| {reader} | {rate:.0f} | {1e6 / rate:.0f} |")
  print("\n| grain shuffle, split length | us per record |\n|---|---|")
  for n, us in shuffle_us.items():
    print(f"| {n:,} | {us:.1f} |")
  print(f"\n| files (preprocessing at {size} px, in memory) | images/s {per} |\n|---|---|")
  print(f"| as prepared | {reencoded[None]:.0f} |\n| re-encoded, longer side 256, "
        f"quality 90 | {reencoded[256]:.0f} ({reencoded[256] / reencoded[None]:.2f}x) |")
  print("\n| px | mean | 99th pct | 99.9th pct | max |  (|area - antialias|, levels of 255)\n"
        "|---|---|---|---|---|")
  for size in [int(s) for s in FLAGS.sizes]:
    d = pixel_difference(min(FLAGS.num_images, 256), size)
    print(f"| {size} | {d['mean']:.2f} | {d['p99']:.0f} | {d['p99.9']:.0f} | {d['max']} |")
  return 0


if __name__ == "__main__":
  app.run(main)
