r"""Prepares a TFDS dataset for both readers: the builder once, then its records copied to the
other file format.

  python -m mrl_jax.data.prepare --dataset=imagenet2012 --manual_dir=/data/ilsvrc2012 \
      --data_dir=~/tensorflow_datasets                 # ArrayRecord (grain) + TFRecord (tf.data)
  python -m mrl_jax.data.prepare --dataset=imagenet_v2 --data_dir=...   # downloads itself

The TFDS builder generates the dataset once (for ImageNet-1K from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in --manual_dir, fixing the CMYK and PNG files as TFDS does); the
records are then copied shard by shard into the other format (ArrayRecord and TFRecord hold the
same serialized examples), and dataset_info.json lists both, as `tfds convert_format` does.
This replaces `tfds build` + `tfds convert_format`, whose CLI needs apache-beam (not a
dependency here: `tfds` fails at import without it). A missing manual archive is one line.
"""

import argparse
import os
import sys

import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from mrl_jax import paths
from mrl_jax.errors import ConfigError

FORMATS = ("array_record", "tfrecord")


def _shards(builder, file_format: str) -> list[tuple[str, str]]:
  """[(shard path in file_format, the same shard's path in the other format)]."""
  other = FORMATS[1 - FORMATS.index(file_format)]
  out = []
  for name in sorted(os.listdir(builder.data_dir)):
    if f".{file_format}-" in name:
      out.append((os.path.join(builder.data_dir, name),
                  os.path.join(builder.data_dir, name.replace(f".{file_format}-",
                                                              f".{other}-"))))
  return out


def convert(builder, to_format: str) -> int:
  """Copies every shard of the prepared format into `to_format` beside it; returns records."""
  formats = {builder.info.file_format.value if builder.info.file_format else "tfrecord"}
  formats |= set(builder.info.as_proto.alternative_file_formats)
  if to_format in formats:
    return 0
  source_format = next(f for f in FORMATS if f in formats)
  count = 0
  for src, dst in _shards(builder, source_format):
    tmp = dst + ".incomplete"
    if source_format == "array_record":
      reader = array_record_module.ArrayRecordReader(src)
      with tf.io.TFRecordWriter(tmp) as writer:
        for start in range(0, reader.num_records(), 256):
          for record in reader.read(list(range(start, min(start + 256,
                                                          reader.num_records())))):
            writer.write(record)
            count += 1
      reader.close()
    else:
      writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
      for record in tf.data.TFRecordDataset(src).as_numpy_iterator():
        writer.write(record)
        count += 1
      writer.close()
    os.replace(tmp, dst)
  builder.info.add_alternative_file_format(to_format)
  builder.info.write_to_directory(builder.data_dir)
  return count


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None,
            formats=FORMATS) -> str:
  """Builds `name` (once) and adds the other formats; returns the dataset directory."""
  for f in formats:
    if f not in FORMATS:
      raise ConfigError(f"--formats has {f!r}; allowed: {list(FORMATS)}")
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format=formats[0])
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"unknown TFDS dataset {name!r} (--dataset)") from None
  if not builder.info.splits:
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
      builder.download_and_prepare(download_config=config)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
      instructions = " ".join(str(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", "")).split())
      first = " ".join(str(e).split())[:300]
      raise ConfigError(f"{name} could not be prepared from --manual_dir={manual_dir}: "
                        f"{first}" + (f" ({instructions})" if instructions else "")) from None
    builder = tfds.builder(name, data_dir=data_dir, file_format=formats[0])
  for f in formats[1:]:
    convert(builder, f)
  return builder.data_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True, help="a TFDS name, e.g. imagenet2012")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
  parser.add_argument("--manual_dir", default=None, help="where manual archives are")
  parser.add_argument("--formats", default=",".join(FORMATS),
                      help="file formats, the first built, the others converted")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.dataset, args.data_dir and str(paths.path(args.data_dir).expanduser()),
                   args.manual_dir, tuple(args.formats.split(",")))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {args.dataset} in {path} ({args.formats})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
