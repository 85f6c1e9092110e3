r"""Prepares a TFDS dataset for both readers: the builder once, then its records copied to the
other file format.

  python -m mrl_jax.data.prepare --dataset=imagenet2012 --manual_dir=/data/ilsvrc2012 \
      --data_dir=~/tensorflow_datasets                 # ArrayRecord (grain) + TFRecord (tf.data)
  python -m mrl_jax.data.prepare --dataset=imagenet_v2 --data_dir=...   # downloads itself
  python -m mrl_jax.data.prepare --dataset=imagenet2012 --data_dir=... --formats=tfrecord
      # adds TFRecord files to a copy prepared with ArrayRecord only (or the other way round)
  python -m mrl_jax.data.prepare --dataset=my_jft --module=my_project.my_jft --data_dir=...
      # a builder of your own: --module imports the module that registers it

The TFDS builder generates the dataset once (for ImageNet-1K from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in --manual_dir, fixing the CMYK and PNG files as TFDS does); the
records are then copied shard by shard into the other format (ArrayRecord and TFRecord hold the
same serialized examples), and dataset_info.json lists both, as `tfds convert_format` does.
This replaces `tfds build` + `tfds convert_format`, whose CLI needs apache-beam (not a
dependency here: `tfds` fails at import without it).

Nothing is half-done silently: every archive a builder reads (MANUAL_FILES) is checked before it
starts, since the ImageNet builder builds whatever splits it finds archives for; a copy missing a
split (SPLITS) is refused with the command that rebuilds it; a conversion writes every shard
beside the originals, compares each shard's record count with dataset_info.json's, and only
then renames them into place and records the format. `--formats` lists what the copy must hold
in any order: the formats it lacks are converted from the one it has.
"""

import argparse
import importlib
import os
import re
import sys

from mrl_jax import cli  # noqa: F401  (before TensorFlow: its quiet start-up settings)

import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from mrl_jax import paths
from mrl_jax.errors import ConfigError

FORMATS = ("array_record", "tfrecord")
# What a builder reads from its manual_dir (the datasets the configs name): the ImageNet builder
# builds whatever splits it finds archives for, so a missing train archive gave a validation-only
# copy and exit 0.
MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_subset": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_real": ("ILSVRC2012_img_val.tar",),
}
# The splits a prepared copy must have.
SPLITS = {"imagenet2012": ("train", "validation"), "imagenet2012_subset": ("train", "validation"),
          "imagenet2012_real": ("validation",)}


def family(name: str) -> str:
  """A dataset's builder name without its config or version ('imagenet2012_subset/1pct')."""
  return name.split("/")[0].split(":")[0]
CHUNK = 256  # ArrayRecord records read per call when converting


def command(name: str, data_dir: str | None, manual_dir: str | None = None,
            formats: str | None = None) -> str:
  """The prepare command line for a dataset (what error messages tell the user to run): a
  build, or with `formats` the formats to add to a prepared copy (no archives needed)."""
  out = f"python -m mrl_jax.data.prepare --dataset={name}"
  if family(name) in MANUAL_FILES and formats is None:
    holding = MANUAL_FILES[family(name)][0]
    out += f" --manual_dir={manual_dir or '<the directory holding ' + holding + '>'}"
  out += f" --data_dir={data_dir or '~/tensorflow_datasets'}"
  return out + (f" --formats={formats}" if formats else "")


def prepared_formats(builder) -> set[str]:
  """The file formats a prepared dataset holds (the one it was built in and the converted)."""
  formats = {builder.info.file_format.value if builder.info.file_format else "tfrecord"}
  return formats | set(builder.info.as_proto.alternative_file_formats)


def _shard_files(builder, file_format: str) -> list[tuple[str, str, int]]:
  """[(path, split, shard index)] of a prepared format's files, from their TFDS names
  (`<name>-<split>.<format>-<index>-of-<count>`)."""
  pattern = re.compile(rf"^.+-(.+)\.{file_format}-(\d+)-of-\d+$")
  out = []
  for name in sorted(os.listdir(builder.data_dir)):
    match = pattern.match(name)
    if match:
      out.append((os.path.join(builder.data_dir, name), match.group(1), int(match.group(2))))
  return out


def _copy_shard(src: str, tmp: str, source_format: str) -> int:
  """Copies one shard's records into the other format at `tmp`; returns the records written
  (for ArrayRecord, as its own reader counts them in the file)."""
  count = 0
  if source_format == "array_record":
    reader = array_record_module.ArrayRecordReader(src)
    with tf.io.TFRecordWriter(tmp) as writer:
      for start in range(0, reader.num_records(), CHUNK):
        for record in reader.read(list(range(start, min(start + CHUNK, reader.num_records())))):
          writer.write(record)
          count += 1
    reader.close()
    return count
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for record in tf.data.TFRecordDataset(src).as_numpy_iterator():
    writer.write(record)
  writer.close()
  reader = array_record_module.ArrayRecordReader(tmp)
  count = reader.num_records()
  reader.close()
  return count


def convert(builder, to_format: str) -> int:
  """Copies every shard of a prepared format into `to_format` beside it; returns the records
  copied (0 when the format is already there). Each shard's count must equal the one
  dataset_info.json records for it before any file is renamed into place."""
  formats = prepared_formats(builder)
  if to_format in formats:
    return 0
  source_format = next(f for f in FORMATS if f in formats)
  shards = _shard_files(builder, source_format)
  written = []
  try:
    for src, split, index in shards:
      dst = src.replace(f".{source_format}-", f".{to_format}-")
      count = _copy_shard(src, dst + ".incomplete", source_format)
      expected = builder.info.splits[split].shard_lengths[index]
      written.append((dst, count))
      if count != expected:
        raise ConfigError(f"converting {os.path.basename(src)} to {to_format} gave {count} "
                          f"records but dataset_info.json has {expected} for it; nothing was "
                          "replaced (the copy or the source files are damaged)")
    copied = sum(count for _, count in written)
    if copied != sum(s.num_examples for s in builder.info.splits.values()):
      raise ConfigError(f"converting {builder.name} to {to_format} gave {copied} records for "
                        f"{len(shards)} shard files, not the dataset's; nothing was replaced")
  except BaseException:
    for dst, _ in written:
      if os.path.exists(dst + ".incomplete"):
        os.remove(dst + ".incomplete")
    raise
  for dst, _ in written:
    os.replace(dst + ".incomplete", dst)
  builder.info.add_alternative_file_format(to_format)
  builder.info.write_to_directory(builder.data_dir)
  return copied


def _manual_dir(builder, manual_dir: str | None) -> str:
  """--manual_dir, or TFDS's default (<data_dir>/downloads/manual)."""
  if manual_dir:
    return paths.expand(manual_dir)
  return os.path.join(os.path.dirname(os.path.dirname(builder.data_dir)), "downloads", "manual")


def check_manual_files(builder, name: str, manual_dir: str | None) -> None:
  """Every archive the builder reads is there before it starts (one line naming the first
  missing one and where it was looked for)."""
  where = _manual_dir(builder, manual_dir)
  files = MANUAL_FILES.get(family(name), ())
  for file in files:
    if not os.path.exists(os.path.join(where, file)):
      flag = f"--manual_dir={manual_dir}" if manual_dir else "TFDS's default; set --manual_dir"
      raise ConfigError(f"{name} is built from {', '.join(files)}: {file} is not in {where} "
                        f"({flag}); download it from image-net.org")


def check_splits(builder, name: str, data_dir: str | None, manual_dir: str | None) -> None:
  """A prepared copy holds every split the dataset has (else it was built from fewer archives
  and must be rebuilt: TFDS cannot add a split to a prepared copy)."""
  missing = [s for s in SPLITS.get(family(name), ()) if s not in builder.info.splits]
  if missing:
    raise ConfigError(
        f"{name} in {builder.data_dir} has splits {sorted(builder.info.splits)} but not "
        f"{missing} (it was prepared without all of {', '.join(MANUAL_FILES[family(name)])}); "
        "rebuild "
        f"it: rm -r {builder.data_dir} && {command(name, data_dir, manual_dir)}")


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None,
            formats=FORMATS) -> str:
  """Builds `name` once (in formats[0]) and adds the other formats; returns the dataset
  directory. A copy already prepared keeps its format and gets the ones it lacks."""
  formats = tuple(formats)
  for f in formats:
    if f not in FORMATS:
      raise ConfigError(f"--formats has {f!r}; allowed: {list(FORMATS)}")
  if not formats:
    raise ConfigError(f"--formats is empty; allowed: any of {list(FORMATS)}")
  data_dir = paths.expand(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)  # a prepared copy's own format
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"unknown TFDS dataset {name!r} (--dataset)") from None
  if not builder.info.splits:
    check_manual_files(builder, name, manual_dir)
    builder = tfds.builder(name, data_dir=data_dir, file_format=formats[0])
    config = (tfds.download.DownloadConfig(manual_dir=paths.expand(manual_dir)) if manual_dir
              else None)
    try:
      builder.download_and_prepare(download_config=config)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
      raise ConfigError(f"{name} could not be prepared from --manual_dir={manual_dir}: "
                        + " ".join(str(e).split())) from None
    builder = tfds.builder(name, data_dir=data_dir)
  check_splits(builder, name, data_dir, manual_dir)
  for f in formats:
    convert(builder, f)
  return builder.data_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True, help="a TFDS name, e.g. imagenet2012")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
  parser.add_argument("--manual_dir", default=None, help="where manual archives are")
  parser.add_argument("--module", default=None,
                      help="a module to import first (it registers the --dataset builder)")
  parser.add_argument("--formats", default=",".join(FORMATS),
                      help="file formats the copy must hold; the first is built, the others "
                           "converted (a prepared copy keeps its own and gets the rest)")
  args = parser.parse_args(argv)
  try:
    if args.module:
      try:
        importlib.import_module(args.module)
      except ImportError as e:
        raise ConfigError(f"--module={args.module} cannot be imported: {e}") from None
    path = prepare(args.dataset, args.data_dir, args.manual_dir,
                   tuple(f for f in args.formats.split(",") if f))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {args.dataset} in {path} ({args.formats})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
