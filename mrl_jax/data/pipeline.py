"""TFDS input pipelines: one interface, two readers, global sharded batches.

Readers (config.input.reader):
- `grain` (default): `tfds.data_source` over ArrayRecord files + grain `MapDataset`. Random access
  gives one global stream, a fresh global shuffle per epoch, that is a pure function of (seed,
  position). Global batch b is positions [b*B, (b+1)*B) of it and process p reads only its rows
  of each global batch, so the examples, their order and their augmentations are the same for
  any number of processes (a 2-process run equals a 1-process run), and resuming at step s
  starts at batch s: exact, nothing skipped or repeated, at no cost.
- `tf_data`: `tfds.load`-style `builder.as_dataset` over TFRecord files (how most ImageNet copies
  are prepared) with file shuffling + a shuffle buffer. Each process reads its own
  `tfds.even_splits` part (file-level sharding, the efficient choice for TFRecords), so the
  example order depends on the process count. Deterministic for a fixed seed, so resuming skips
  the already consumed records before decoding (exact; costs reading them once).

Both readers call the same `preprocess.Preprocess` (TF ops) with per-example seeds derived from
the example's position in the global stream. An image that cannot be decoded (a corrupt file) is
skipped and counted in `Reader.skipped`, not a crash: tf.data drops it (`ignore_errors`) and the
batch fills from the next records; grain, whose batches are fixed positions, uses another record
of the same batch in its place in training and masks it out in evaluation. Training batches have
`image` (uint8; the model normalises on the device)/`label`; eval batches also have `mask` (0 for the padding that makes every process yield
the same number of batches). `label` is int32 [B] for a ClassLabel feature and a multi-hot
uint8 [B, C] for a multi-label one (JFT-style: a Sequence of ClassLabel ids, or a [C] 0/1
Tensor), sharded like the images. `global_batches` turns process-local numpy batches into global
`jax.Array`s sharded over the mesh's batch axes, prefetched on a background thread.
"""

import abc
import dataclasses
import functools
import math
import queue
import threading
from collections.abc import Iterator

import grain
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_parser

from mrl_jax.data import builtin
from mrl_jax.data import image_text
from mrl_jax.data import prepare
from mrl_jax.data import preprocess as preprocess_lib
from mrl_jax.errors import ConfigError
from mrl_jax.errors import DataError

Batch = dict[str, np.ndarray]

FILE_FORMAT = {"grain": "array_record", "tf_data": "tfrecord"}


@dataclasses.dataclass(frozen=True)
class Source:
  """A prepared TFDS dataset: where it is, and what its image/label features look like."""
  name: str
  data_dir: str | None
  image_key: str
  label_key: str
  channels: int
  num_classes: int
  split_sizes: dict[str, int]
  # "single" (ClassLabel), "ids" (Sequence of ClassLabel ids) or "multi_hot" ([C] Tensor)
  label_format: str = "single"
  kind: str = "image"  # "image" | "text" (Text features only) | "image_text" (image + caption)
  text_keys: tuple[str, ...] = ()  # the Text features (text sources)

  @property
  def multi_label(self) -> bool:
    return self.label_format != "single"

  def num_examples(self, split: str) -> int:
    try:
      return self.builder().info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      hint = ""
      if split.split("[")[0] in prepare.SPLITS.get(prepare.family(self.name), ()):  # too few
        hint = (f"; the copy was prepared without that split's archive, rebuild it: rm -r "
                f"{self.builder().data_dir} && {prepare.command(self.name, self.data_dir)}")
      raise ConfigError(f"dataset {self.name!r} has no split {split!r} ({e}); available: "
                        f"{sorted(self.split_sizes)}{hint}") from None

  def builder(self, file_format: str | None = None):
    """A fresh builder, reading `file_format` (checked against the prepared formats)."""
    b = tfds.builder(self.name, data_dir=self.data_dir)
    if file_format is None:
      return b
    formats = {b.info.file_format.value if b.info.file_format else "tfrecord"}
    formats |= set(b.info.as_proto.alternative_file_formats)
    if file_format not in formats:
      reader = {v: k for k, v in FILE_FORMAT.items()}[file_format]
      other = [r for r, f in FILE_FORMAT.items() if f in formats]
      raise ConfigError(
          f"dataset {self.name!r} in {b.data_dir} has {sorted(formats)} files but reader "
          f"{reader!r} needs {file_format} (config.input.reader); add it with "
          f"`{prepare.command(self.name, self.data_dir, formats=file_format)}`"
          + (f" or set config.input.reader={other[0]!r}" if other else ""))
    if b.info.file_format is None or b.info.file_format.value != file_format:
      b.info.set_file_format(file_format, override=True, override_if_initialized=True)
    return b


def open_source(input_cfg, dataset: str | None = None, label_key: str | None = None) -> Source:
  """Opens config.input.dataset (or `dataset`, with its own `label_key`), preparing a built-in
  one on first use."""
  name = dataset or input_cfg.dataset
  data_dir = input_cfg.get("data_dir")
  if name in builtin.BUILTIN:
    data_dir = builtin.prepare(name, data_dir)
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"unknown dataset {name!r} (config.input.dataset); allowed: a registered "
                      f"TFDS name (e.g. imagenet2012, cifar10) or a built-in: "
                      f"{sorted(builtin.BUILTIN)}") from None
  if not b.info.splits:
    raise ConfigError(
        f"dataset {name!r} is not prepared in {b.data_dir} (config.input.data_dir); run "
        f"`{prepare.command(name, data_dir)}` first (docs/data.md)")
  image_key = input_cfg.get("image_key", "image")
  label_key = label_key or input_cfg.get("label_key", "label")
  features = b.info.features
  if image_key not in features:
    text_keys = tuple(k for k, f in features.items() if isinstance(f, tfds.features.Text))
    if text_keys:  # a text dataset: its Text features, and a label or score when it has one
      label = label_key if label_key in features else None
      num_classes, label_format = label_kind(features[label]) if label else (0, "single")
      return Source(name=name, data_dir=data_dir, image_key="", label_key=label or "",
                    channels=0, num_classes=num_classes, label_format=label_format,
                    split_sizes={k: v.num_examples for k, v in b.info.splits.items()},
                    kind="text", text_keys=text_keys)
  caption_key = input_cfg.get("caption_key") or ""
  has_captions = caption_key and caption_key.split("/")[0] in features
  if caption_key and image_key in features and not has_captions and name == input_cfg.dataset:
    raise ConfigError(f"dataset {name!r} has no text feature {caption_key!r} "
                      f"(config.input.caption_key); available: {sorted(features.keys())}")
  if has_captions and image_key in features:  # an image-text dataset: the label is optional
    label = label_key if label_key in features else None
    num_classes, label_format = label_kind(features[label]) if label else (0, "single")
    shape = features[image_key].shape
    return Source(name=name, data_dir=data_dir, image_key=image_key, label_key=label or "",
                  channels=int(shape[-1]) if shape and shape[-1] else 3,
                  num_classes=num_classes, label_format=label_format,
                  split_sizes={k: v.num_examples for k, v in b.info.splits.items()},
                  kind="image_text", text_keys=(caption_key,))
  for key, field in ((image_key, "image_key"), (label_key, "label_key")):
    if key not in features:
      raise ConfigError(f"dataset {name!r} has no feature {key!r} (config.input.{field}); "
                        f"available: {sorted(features.keys())}")
  shape = features[image_key].shape
  num_classes, label_format = label_kind(features[label_key])
  return Source(name=name, data_dir=data_dir, image_key=image_key, label_key=label_key,
                channels=int(shape[-1]) if shape and shape[-1] else 3,
                num_classes=num_classes, label_format=label_format,
                split_sizes={k: v.num_examples for k, v in b.info.splits.items()})


def label_kind(feature) -> tuple[int, str]:
  """(number of classes (0: not declared), label format) of a TFDS label feature."""
  if isinstance(feature, tfds.features.Sequence):
    return int(getattr(feature.feature, "num_classes", 0) or 0), "ids"
  if isinstance(feature, tfds.features.Tensor) and len(feature.shape) == 1:
    return int(feature.shape[0] or 0), "multi_hot"
  return int(getattr(feature, "num_classes", 0) or 0), "single"


def process_split(split: str, process_index: int, process_count: int):
  """This process's disjoint part of `split` (sizes differ by at most one example)."""
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


class Reader(abc.ABC):
  """Yields process-local numpy batches of one split."""

  def __init__(self, source: Source, *, num_workers: int = 0):
    self.source = source
    self.num_workers = num_workers
    self.skipped = 0  # unreadable images skipped so far (train and eval)

  def _counted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
    """Moves each batch's `skipped` count into self.skipped."""
    for batch in batches:
      self.skipped += int(batch.pop(SKIPPED, 0))
      yield batch

  @abc.abstractmethod
  def train_batches(self, split: str, *, local_batch: int, start_batch: int, seed: int,
                    train_preprocess: preprocess_lib.TrainPreprocess, process_index: int,
                    process_count: int, shuffle_buffer: int) -> Iterator[Batch]:
    """Endless shuffled batches, starting at batch `start_batch` of the stream."""

  @abc.abstractmethod
  def eval_batches(self, split: str, *, local_batch: int, num_batches: int,
                   preprocess: preprocess_lib.Preprocess, process_index: int,
                   process_count: int) -> Iterator[Batch]:
    """`num_batches` batches in dataset order, padded with mask=0 examples."""


SKIPPED = "skipped"  # batch key: unreadable images skipped while making this batch
DECODE_ERRORS = (tf.errors.InvalidArgumentError,)  # what TF's decoders raise on a corrupt file


def _built_once(build):
  """functools.cache that builds once per key even when grain's read threads first ask at the
  same moment: with a bare cache each concurrent miss built and traced its own tf.function
  (three of one preprocessing at a run's start). With _mapped tracing at build time, the calls
  never trace; TF counts a call as retracing whenever another thread's trace ran during it,
  which printed "triggered tf.function retracing" in every grain run."""
  cached, lock = functools.cache(build), threading.Lock()

  @functools.wraps(build)
  def once(*args):
    with lock:
      return cached(*args)

  return once


def _mapped(one, out):
  """one(encoded, seed) mapped over a batch in one TF call (5x fewer TF dispatches)."""

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string),
                                tf.TensorSpec([None, 2], tf.int64)])
  def fn(encoded, seeds):
    return tf.map_fn(lambda a: one(a[0], a[1]), (encoded, seeds), fn_output_signature=out,
                     parallel_iterations=32)

  fn.get_concrete_function()  # traced now, once, not inside some thread's first call
  return fn


@_built_once
def _batch_fn(pp: preprocess_lib.Preprocess):
  """Encoded images of a batch -> uint8 images."""
  return _mapped(pp, tf.TensorSpec([pp.image_size, pp.image_size, pp.channels], tf.uint8))


def _label_tf(label, label_format: str, num_classes: int):
  """int32 [] or, multi-label, uint8 [C] (ids -> multi-hot; a [C] vector as is)."""
  if label_format == "single":
    return tf.cast(label, tf.int32)
  if label_format == "multi_hot":
    return tf.cast(label > 0, tf.uint8)
  counts = tf.math.bincount(tf.cast(label, tf.int32), minlength=num_classes,
                            maxlength=num_classes)
  return tf.cast(tf.minimum(counts, 1), tf.uint8)


def _source_key(source: Source) -> tuple:
  return (source.name, source.data_dir, source.image_key, source.label_key,
          source.label_format, source.num_classes)


@_built_once
def _record_batch_fn(pp: preprocess_lib.Preprocess, source_key: tuple):
  """Serialized tf.Examples of a batch -> (uint8 images, labels) in one TF call. The records
  are parsed by TFDS's own graph parser, as builder.as_dataset does for tf.data, rather than
  by tfds.data_source's per-record Python deserialisation (~40 us a record, 4 % of the
  whole training preprocessing at 224 px)."""
  name, data_dir, image_key, label_key, label_format, num_classes = source_key
  features = tfds.builder(name, data_dir=data_dir).info.features
  parser = example_parser.ExampleParser(features.get_serialized_info())
  decoders = {image_key: tfds.decode.SkipDecoding()}
  single = label_format == "single"
  out = (tf.TensorSpec([pp.image_size, pp.image_size, pp.channels], tf.uint8),
         tf.TensorSpec([] if single else [num_classes], tf.int32 if single else tf.uint8))

  def one(serialized, seed):
    record = features.decode_example(parser.parse_example(serialized), decoders=decoders)
    return pp(record[image_key], seed), _label_tf(record[label_key], label_format,
                                                  num_classes)

  return _mapped(one, out)


@dataclasses.dataclass(frozen=True)
class _GrainBatch:
  """Module-level (picklable for grain workers): raw records of one batch -> numpy batch."""
  source: Source
  seed: int
  train_preprocess: preprocess_lib.TrainPreprocess | None = None
  preprocess: preprocess_lib.Preprocess | None = None

  def __call__(self, batch_index: int, records) -> Batch:
    try:
      return self._batch(batch_index, records)
    except DECODE_ERRORS:
      if self.source.kind not in ("image", "image_text"):
        raise
    records, skipped = self._readable(batch_index, records)
    return dict(self._batch(batch_index, records), **{SKIPPED: skipped})

  def _readable(self, batch_index: int, records):
    """The batch with each record whose image does not decode replaced: in training by the
    next readable record of the batch (at the replaced one's position, so with its own
    augmentation seed), in evaluation by a masked-out copy (position -1)."""
    if self.source.kind == "image_text":
      pp = self.train_preprocess.image.for_step(batch_index)
    else:
      pp = self.preprocess or self.train_preprocess.for_step(batch_index)
    readable = []
    for position, record in records:
      seed = np.asarray([[self.seed, max(position, 0)]], np.int64)
      try:
        if self.source.kind == "image":
          self._images_labels(pp, [record], seed)
        else:
          _call(_batch_fn(pp), [_as_bytes(record[self.source.image_key])], seed)
        readable.append(True)
      except DECODE_ERRORS:
        readable.append(False)
    good = [i for i, ok in enumerate(readable) if ok]
    if not good:
      raise DataError(f"no image of batch {batch_index} ({len(records)} records) can be "
                      "decoded; the dataset's image files are corrupt")
    out = []
    for i, (position, record) in enumerate(records):
      if readable[i]:
        out.append((position, record))
      else:
        donor = records[next((j for j in good if j > i), good[0])][1]
        out.append((-1 if self.preprocess is not None else position, donor))
    return out, len(records) - len(good)

  def _batch(self, batch_index: int, records) -> Batch:
    positions = np.asarray([p for p, _ in records], np.int64)  # global stream positions
    record_level = self.preprocess is not None and not isinstance(self.preprocess,
                                                                   preprocess_lib.Preprocess)
    if self.source.kind == "text" or record_level:  # numpy on the raw records (text.py)
      pp = self.preprocess or self.train_preprocess
      out = pp([r for _, r in records], positions, self.seed)
      if self.preprocess is not None:
        out["mask"] = (positions >= 0).astype(np.float32)
      return out
    if self.source.kind == "image_text":  # data/image_text.py: the image, then one caption
      tp = self.train_preprocess
      seeds = np.stack([np.full_like(positions, self.seed), np.maximum(positions, 0)], 1)
      images = np.asarray([_as_bytes(r[self.source.image_key]) for _, r in records], object)
      out = tp.text_batch([r for _, r in records], positions, self.seed)
      out["image"] = _call(_batch_fn(tp.image.for_step(batch_index)), images, seeds).numpy()
      return out
    pp = self.preprocess or self.train_preprocess.for_step(batch_index)
    seeds = np.stack([np.full_like(positions, self.seed), np.maximum(positions, 0)], 1)
    images, labels = self._images_labels(pp, [r for _, r in records], seeds)
    out = {"image": images, "label": labels}
    if self.preprocess is not None:  # eval: padding records have position -1
      out["mask"] = (positions >= 0).astype(np.float32)
    return out

  def _images_labels(self, pp, records, seeds):
    """Serialized records are parsed in the graph; deserialised ones (tfds's mock data
    source, which has no files) are preprocessed from their image and label."""
    if isinstance(records[0], bytes):
      images, labels = _call(_record_batch_fn(pp, _source_key(self.source)), records, seeds)
      return images.numpy(), labels.numpy()
    s = self.source
    images = _call(_batch_fn(pp), [_as_bytes(r[s.image_key]) for r in records], seeds)
    labels = [_label_tf(r[s.label_key], s.label_format, s.num_classes).numpy() for r in records]
    return images.numpy(), np.stack(labels)


def _call(fn, encoded, seeds):
  """fn(records, seeds) with the inputs made tensors first. A tf.function that fails to bind
  its inputs keeps its lock (TF 2.x polymorphic_function._call acquires it before binding and
  releases it only after), so every other grain thread calling it would hang; failing here,
  outside the call, raises in this thread and leaves the function usable."""
  return fn(tf.constant(np.asarray(encoded, object), tf.string),
            tf.constant(np.asarray(seeds, np.int64)))


def _as_bytes(image):
  """Encoded bytes as stored; raw uint8 arrays (Tensor features) are PNG-encoded once."""
  if isinstance(image, bytes):
    return image
  return tf.io.encode_png(np.asarray(image, np.uint8)).numpy()


def _read(src, indices: list[int]) -> list:
  """Records of a tfds data source, in the order of indices."""
  return [src[i] for i in indices]


def _process_rows(i, local_batch: int, process_index: int, process_count: int):
  """Global stream position of this process's i-th example: its rows of each global batch."""
  return (i // local_batch) * local_batch * process_count + process_index * local_batch + (
      i % local_batch)


class GrainReader(Reader):
  """tfds.data_source (ArrayRecord) + grain MapDataset over one global stream."""

  def _data_source(self, split, preprocess=None):
    """Image preprocessing: the serialized records (parsed in the graph, _record_batch_fn);
    others (text, image-text, record-level evaluators): tfds.data_source's deserialised
    records."""
    src = self.source.builder(FILE_FORMAT["grain"]).as_data_source(split=split)
    serialized = self.source.kind == "image" and (
        preprocess is None or isinstance(preprocess, preprocess_lib.Preprocess))
    return src.data_source if serialized else src

  def _iterate(self, ds: grain.MapDataset) -> Iterator[Batch]:
    # Threads, not worker processes: the preprocessing is TF ops, which release the GIL, and
    # TF parallelises within a batch (map_fn) on its own thread pool.
    threads = self.num_workers or 4
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads + 1)
    return self._counted(iter(ds.to_iter_dataset(options)))

  def train_batches(self, split, *, local_batch, start_batch, seed, train_preprocess,
                    process_index, process_count, shuffle_buffer):
    del shuffle_buffer  # grain shuffles the whole split (random access).
    src = self._data_source(split)
    # The global stream: position p holds record order[p], a fresh permutation per epoch.
    order = grain.MapDataset.range(len(src)).seed(seed).shuffle().repeat(None)

    def batch_records(b):  # one grain element per batch: its per-element cost is ~100 us
      positions = [_process_rows(i, local_batch, process_index, process_count)
                   for i in range(b * local_batch, (b + 1) * local_batch)]
      return list(zip(positions, _read(src, [order[p] for p in positions])))

    ds = grain.MapDataset.range(2**62 // local_batch).map(batch_records)
    ds = ds.map_with_index(_GrainBatch(self.source, seed, train_preprocess=train_preprocess))
    return self._iterate(ds[start_batch:])

  def eval_batches(self, split, *, local_batch, num_batches, preprocess, process_index,
                   process_count):
    src = self._data_source(split, preprocess)
    n = len(src)
    padding = None

    def batch_records(b):
      nonlocal padding
      positions = [_process_rows(i, local_batch, process_index, process_count)
                   for i in range(b * local_batch, (b + 1) * local_batch)]
      records = _read(src, [p for p in positions if p < n])
      if len(records) < local_batch and padding is None:
        padding = src[0]  # A real record at position -1: masked out, same shapes.
      records += [padding] * (local_batch - len(records))
      return [(p if p < n else -1, r) for p, r in zip(positions, records)]

    ds = grain.MapDataset.range(num_batches).map(batch_records)
    ds = ds.map_with_index(_GrainBatch(self.source, 0, preprocess=preprocess))
    return self._iterate(ds)


class TfDataReader(Reader):
  """builder.as_dataset (TFRecord) + tf.data."""

  def _dataset(self, split, process_index, process_count, *, shuffle, seed):
    b = self.source.builder(FILE_FORMAT["tf_data"])
    read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16,
                                  add_tfds_id=False)
    text = self.source.kind == "text"
    ds = b.as_dataset(split=process_split(split, process_index, process_count),
                      shuffle_files=shuffle, read_config=read_config,
                      decoders=None if text else {
                          self.source.image_key: tfds.decode.SkipDecoding()})
    if self.source.kind == "image_text":  # the encoded image and the raw captions
      return ds.with_options(tf.data.Options())
    options = tf.data.Options()
    options.deterministic = True
    if self.num_workers:
      options.threading.private_threadpool_size = self.num_workers
    if text:  # raw records; text.TextPreprocess runs on each batch of them in numpy
      return ds.with_options(options)
    return ds.with_options(options).map(
        lambda r: (r[self.source.image_key], _label_tf(
            r[self.source.label_key], self.source.label_format, self.source.num_classes)))

  def _image_text_batches(self, ds, start, local_batch, tp, seed, process_index, process_count):
    """Images preprocessed per example in the graph (as image batches), captions drawn and
    tokenized per batch in numpy (as text batches), both seeded by stream position."""
    key = self.source.image_key
    if len(tp.image.all_sizes()) > 1:
      raise ConfigError("progressive resizing of image-text data is not supported by the "
                        "tf_data reader; use config.input.reader='grain'")

    def map_fn(position, record):
      seed_vec = self._seeds(position, seed, process_index, process_count)
      captions = record
      for part in tp.caption_key.split("/"):
        captions = captions[part]
      if captions.shape.rank:
        captions = tf.strings.reduce_join(captions, separator=image_text.SEPARATOR)
      return position, {key: tp.image.preprocess(record[key], seed_vec),
                        image_text.JOINED_KEY: captions}

    ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(local_batch, drop_remainder=True).prefetch(2)
    gaps = _Gaps(start)
    for positions, records in ds.as_numpy_iterator():
      rows = [{k: v[i] for k, v in records.items()} for i in range(len(positions))]
      counters = np.asarray(positions, np.int64) * process_count + process_index
      out = tp.text_batch(rows, counters, seed)
      out["image"] = records[key]
      out[SKIPPED] = gaps(positions)
      yield out

  def _text_batches(self, ds, local_batch, pp, seed, process_index, process_count, *,
                    evaluation: bool):
    """Batches of raw records -> pp(records, global positions, seed) (+ mask in eval)."""
    ds = ds.batch(local_batch, drop_remainder=not evaluation).prefetch(2)
    for positions, records, *mask in ds.as_numpy_iterator():
      rows = [{k: v[i] for k, v in records.items()} for i in range(len(positions))]
      counters = np.asarray(positions, np.int64) * process_count + process_index
      if evaluation:  # padding examples stand at position -1, as in the grain reader
        counters = np.where(np.asarray(mask[0]) > 0, counters, -1)
      out = pp(rows, counters, seed)
      if evaluation:
        out["mask"] = np.asarray(mask[0], np.float32)
      yield out

  def _seeds(self, positions, seed, process_index, process_count):
    # This process's i-th record stands at i * P + p of the interleaved global stream.
    counter = tf.cast(positions, tf.int64) * process_count + process_index
    return tf.stack([tf.constant(seed, tf.int64), counter])

  def train_batches(self, split, *, local_batch, start_batch, seed, train_preprocess,
                    process_index, process_count, shuffle_buffer):
    return self._counted(self._train_batches(
        split, local_batch, start_batch, seed, train_preprocess, process_index, process_count,
        shuffle_buffer))

  def _train_batches(self, split, local_batch, start_batch, seed, train_preprocess,
                     process_index, process_count, shuffle_buffer):
    ds = self._dataset(split, process_index, process_count, shuffle=True, seed=seed)
    ds = ds.repeat().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    # Skip consumed records before decoding: positions stay those of the uninterrupted run.
    ds = ds.enumerate().skip(start_batch * local_batch)
    if self.source.kind == "text":
      yield from self._text_batches(ds, local_batch, train_preprocess, seed, process_index,
                                    process_count, evaluation=False)
      return
    if self.source.kind == "image_text":
      yield from self._image_text_batches(ds, start_batch * local_batch, local_batch,
                                          train_preprocess, seed, process_index, process_count)
      return
    sizes = train_preprocess.all_sizes()

    def map_fn(position, record):
      image, label = record
      seed_vec = self._seeds(position, seed, process_index, process_count)
      if len(sizes) == 1:
        return position, train_preprocess.preprocess(image, seed_vec), label
      # Progressive resizing: the image size is a function of the batch (= step) index.
      size = train_preprocess.size_for_step_tf(position // local_batch)
      branches = [functools.partial(
          dataclasses.replace(train_preprocess.preprocess, image_size=s), image, seed_vec)
                  for s in sizes]
      index = tf.argmax(tf.cast(tf.equal(tf.constant(sizes), size), tf.int32))
      return position, tf.switch_case(tf.cast(index, tf.int32), branches), label

    ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(local_batch, drop_remainder=True).prefetch(2)
    gaps = _Gaps(start_batch * local_batch)
    for positions, images, labels in ds.as_numpy_iterator():
      yield {"image": images, "label": labels, SKIPPED: gaps(positions)}

  def eval_batches(self, split, *, local_batch, num_batches, preprocess, process_index,
                   process_count):
    ds = self._dataset(split, process_index, process_count, shuffle=False, seed=0)
    if self.source.kind in ("text", "image_text"):  # records -> numpy preprocessing
      ds = ds.map(lambda r: (r, 1.0))
      ds = ds.concatenate(ds.take(1).map(lambda r, m: (r, 0.0)).repeat())
      ds = ds.take(num_batches * local_batch).enumerate().map(lambda p, rm: (p, *rm))
      return self._text_batches(ds, local_batch, preprocess, 0, process_index, process_count,
                                evaluation=True)

    def map_fn(position, record):
      image, label = record
      seed_vec = self._seeds(position, 0, process_index, process_count)
      return {"image": preprocess(image, seed_vec), "label": label, "mask": 1.0}

    # Unreadable images are dropped before the padding (mask 0) that fills the last batches.
    ds = ds.enumerate().map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    ds = ds.concatenate(ds.take(1).map(lambda e: dict(e, mask=0.0)).repeat())
    ds = ds.take(num_batches * local_batch).batch(local_batch).prefetch(2)
    expected = self.source.builder(FILE_FORMAT["tf_data"]).info.splits[
        process_split(split, process_index, process_count)].num_examples
    return self._counted(_count_eval(ds.as_numpy_iterator(), expected))


class _Gaps:
  """Records dropped between consecutive batches: gaps in their enumerate() positions."""

  def __init__(self, first_position: int):
    self.next = first_position

  def __call__(self, positions) -> int:
    skipped = int(positions[-1]) + 1 - self.next - len(positions)
    self.next = int(positions[-1]) + 1
    return skipped


def _count_eval(batches: Iterator[Batch], expected: int) -> Iterator[Batch]:
  """Eval batches, the last one carrying how many of the `expected` examples were dropped."""
  seen = 0
  batch = None
  for following in batches:
    if batch is not None:
      yield batch
    batch = following
    seen += int(np.sum(batch["mask"]))
  if batch is not None:
    batch[SKIPPED] = max(expected - seen, 0)
    yield batch


READERS: dict[str, type[Reader]] = {"grain": GrainReader, "tf_data": TfDataReader}


def make_reader(input_cfg, source: Source) -> Reader:
  if input_cfg.reader not in READERS:
    raise ConfigError(f"unknown reader {input_cfg.reader!r} (config.input.reader); "
                      f"allowed: {sorted(READERS)}")
  return READERS[input_cfg.reader](source, num_workers=input_cfg.num_workers)


def num_eval_batches(num_examples: int, local_batch: int, process_count: int) -> int:
  """Batches per process so the largest process part (ceil(N / P)) is covered."""
  return max(1, math.ceil(math.ceil(num_examples / process_count) / local_batch))


def global_batches(local_batches: Iterator[Batch], sharding: jax.sharding.Sharding,
                   prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Process-local numpy batches -> global jax.Arrays sharded on the batch axis, prefetched."""

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  if prefetch <= 0:
    yield from map(to_global, local_batches)
    return
  q: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()
  sentinel = object()

  def producer():
    try:
      for batch in local_batches:
        if stop.is_set():
          return
        q.put(to_global(batch))
      q.put(sentinel)
    except BaseException as e:  # pylint: disable=broad-except  # Re-raised in the consumer.
      q.put(e)

  thread = threading.Thread(target=producer, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is sentinel:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
