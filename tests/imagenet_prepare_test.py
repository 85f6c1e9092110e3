"""ImageNet from ILSVRC archives: the real TFDS imagenet2012 builder, offline, on small archives
of real photographs in ILSVRC's layout, then the paper's ResNet-50 config trained on the result
through both readers."""

import io
import os
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mrl_jax import train_lib
from mrl_jax.data import pipeline
from mrl_jax.data import prepare
from mrl_jax.errors import ConfigError
from tests.conftest import REPO
from tests.conftest import load_config

# Classes whose file names the builder treats specially (imagenet2012_dataset_builder.py:
# CMYK_IMAGES, PNG_IMAGES), next to an ordinary one.
CLASSES = {"n01440764": [], "n01739381": ["n01739381_1309.JPEG"],
           "n02105855": ["n02105855_2933.JPEG"]}


def photographs(n, seed=0):
  """n crops of scikit-learn's two sample photographs (427 x 640), ImageNet-like sizes."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  images = load_sample_images().images
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    src = images[i % 2]
    h, w = rng.integers(200, 400), rng.integers(250, 500)
    y, x = rng.integers(0, src.shape[0] - h + 1), rng.integers(0, src.shape[1] - w + 1)
    out.append(src[y:y + h, x:x + w])
  return out


def _encode(image, fmt="JPEG", mode="RGB"):
  buf = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buf, format=fmt, quality=90)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_ilsvrc_archives(manual_dir, per_class=4, num_val=6):
  """ILSVRC2012_img_train.tar (a tar of per-class tars) and ILSVRC2012_img_val.tar, with a CMYK
  JPEG and a PNG named .JPEG where the builder expects them, and the last image of the first
  class and of validation truncated (a corrupt file, which the builder stores as it is)."""
  os.makedirs(manual_dir, exist_ok=True)
  photos = iter(photographs(len(CLASSES) * per_class + num_val))
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for synset, special in CLASSES.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(per_class - len(special)):
          data = _encode(next(photos))
          if synset == "n01440764" and i == per_class - 1:
            data = data[:len(data) // 3]
          _add(tar, f"{synset}_{i + 1}.JPEG", data)
        for name in special:
          cmyk = name == "n01739381_1309.JPEG"
          _add(tar, name, _encode(next(photos), "JPEG" if cmyk else "PNG",
                                  "CMYK" if cmyk else "RGB"))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(num_val):
      data = _encode(next(photos))
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", data[:len(data) // 3] if i == num_val - 1
           else data)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  write_ilsvrc_archives(str(root / "manual"))
  prepare.prepare("imagenet2012", str(root / "tfds"), str(root / "manual"))
  return str(root / "tfds")


def test_the_real_builder_prepares_both_formats_with_the_oddities_fixed(imagenet_dir):
  builder = tfds.builder("imagenet2012", data_dir=imagenet_dir)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 12,
                                                                         "validation": 6}
  assert "tfrecord" in builder.info.as_proto.alternative_file_formats
  names = builder.info.features["label"].names
  raw = {"image": tfds.decode.SkipDecoding()}  # the truncated JPEG is stored as it is
  train = list(builder.as_data_source(split="train", decoders=raw))
  assert sorted({names[r["label"]] for r in train}) == sorted(CLASSES)
  by_name = {r["file_name"].decode(): r for r in train}
  for special in ("n01739381_1309.JPEG", "n02105855_2933.JPEG"):  # CMYK -> RGB, PNG -> JPEG
    assert tf.io.decode_image(by_name[special]["image"]).shape[-1] == 3
    assert tf.io.extract_jpeg_shape(by_name[special]["image"]).shape == (3,)  # a JPEG now
  # Validation labels: the builder's own validation_labels.txt, in sorted file-name order.
  want = open(os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012",
                           "validation_labels.txt")).read().split()[:6]
  val = sorted(builder.as_data_source(split="validation", decoders=raw),
               key=lambda r: r["file_name"])
  assert [names[r["label"]] for r in val] == want


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["grain", "tf_data"])
def test_the_paper_resnet50_config_trains_on_it(imagenet_dir, reader, tmp_path, capsys):
  config = load_config(f"configs/resnet50_imagenet.py:mrl,runlocal,reader={reader}")
  config.input.data_dir = imagenet_dir
  # One step of 16 examples: grain meets every one of the 12, the corrupt one included. The
  # loop checks for skipped images from step 2 on, so the one warning comes from the check after
  # the final eval, which meets the corrupt validation image. Both readers run the same
  # program (one compile of the ResNet-50 step, not one per reader).
  config.total_steps = 1
  config.input.update(batch_size=16, eval_batch_size=8)
  config.eval.splits = ()
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"),
                                         devices=jax.devices()[:1])
  assert summary["final_step"] == config.total_steps and summary["dataset"] == "imagenet2012"
  # The corrupt validation image always; the corrupt training image where the stream met it
  # (grain's first epoch holds every record; tf.data's shuffle buffer mixes epochs).
  assert summary["skipped_images"] >= (2 if reader == "grain" else 1)
  assert capsys.readouterr().out.count("unreadable image(s) (corrupt files) by step") == 1
  assert set(summary["eval"]) == {"8", "16", "32", "64", "128", "256"}


def _prepare_cli(*args):
  """The prepare command in a user's environment (without the suite's quiet-TF settings)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  return subprocess.run([sys.executable, "-m", "mrl_jax.data.prepare", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


def test_every_archive_is_checked_before_building(tmp_path):
  """No archive, or only the validation archive (the builder would build a validation-only copy
  and exit 0, which no rerun repaired): one line naming the missing archive and where it was
  looked for, exit 2, nothing built."""
  manual = tmp_path / "manual"
  for present in ((), ("ILSVRC2012_img_val.tar",)):
    manual.mkdir(exist_ok=True)
    for name in present:
      (manual / name).write_bytes(b"")
    out = _prepare_cli("--dataset=imagenet2012", f"--data_dir={tmp_path / 'tfds'}",
                       f"--manual_dir={manual}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0] == (f"error: imagenet2012 is built from ILSVRC2012_img_train.tar, "
                        f"ILSVRC2012_img_val.tar: ILSVRC2012_img_train.tar is not in {manual} "
                        f"(--manual_dir={manual}); download it from image-net.org")
    assert not (tmp_path / "tfds" / "imagenet2012").exists()
  with pytest.raises(ConfigError, match=r"ILSVRC2012_img_val.tar is not in .*downloads/manual "
                                        r"\(TFDS's default; set --manual_dir\)"):
    prepare.prepare("imagenet2012_real", str(tmp_path / "tfds"))
  with pytest.raises(ConfigError, match=r"^imagenet2012_subset/1pct is built from "):
    prepare.prepare("imagenet2012_subset/1pct", str(tmp_path / "tfds"), str(manual))


def test_a_builder_of_manual_archives_not_checked_here_says_tfds_instructions_once(tmp_path,
                                                                                  monkeypatch):
  """A manual-download builder prepare has no archive list for: TFDS's own message, once and
  whole (it used to be cut mid-URL at 300 characters and then repeated)."""
  monkeypatch.setattr(prepare, "MANUAL_FILES", {})
  with pytest.raises(ConfigError) as refused:
    prepare.prepare("imagenet2012", str(tmp_path / "tfds"), str(tmp_path / "empty"))
  message = str(refused.value)
  assert "\n" not in message and message.count("image-net.org/download-images") == 1
  assert message.startswith(f"imagenet2012 could not be prepared from --manual_dir="
                            f"{tmp_path / 'empty'}: Manual directory")


def test_a_copy_missing_a_split_is_refused_with_the_command_that_rebuilds_it(tmp_path):
  """A validation-only copy (built by the TFDS builder from the val archive alone, as this tool
  used to accept): prepare refuses with the exact command, train.py's missing split names it
  too, and that command, run as printed once the train archive is there, gives both splits."""
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  write_ilsvrc_archives(str(manual), per_class=1, num_val=2)
  train_tar = manual / "ILSVRC2012_img_train.tar"
  os.replace(train_tar, tmp_path / "train.tar")
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual)))
  with pytest.raises(ConfigError) as refused:
    prepare.prepare("imagenet2012", str(data_dir), str(manual))
  message = str(refused.value)
  assert "has splits ['validation'] but not ['train']" in message
  rebuild = message.split("rebuild it: ", 1)[1]
  copy = tfds.builder("imagenet2012", data_dir=str(data_dir)).data_dir
  assert rebuild == (f"rm -r {copy} && python -m mrl_jax.data.prepare --dataset=imagenet2012 "
                     f"--manual_dir={manual} --data_dir={data_dir}")
  config = load_config("configs/resnet50_imagenet.py:mrl,runlocal")
  config.input.data_dir = str(data_dir)
  with pytest.raises(ConfigError, match=r"has no split 'train'.*python -m mrl_jax.data.prepare "
                                        r"--dataset=imagenet2012"):
    pipeline.open_source(config.input).num_examples("train")
  os.replace(tmp_path / "train.tar", train_tar)
  out = subprocess.run(rebuild, shell=True, cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  splits = tfds.builder("imagenet2012", data_dir=str(data_dir)).info.splits
  assert {s: i.num_examples for s, i in splits.items()} == {"train": 3, "validation": 2}


def test_the_wrong_format_is_one_line_with_the_command(tmp_path):
  only_array_record = str(tmp_path / "ar")
  write_ilsvrc_archives(str(tmp_path / "manual"), per_class=1, num_val=1)
  prepare.prepare("imagenet2012", only_array_record, str(tmp_path / "manual"),
                  formats=("array_record",))
  config = load_config("configs/resnet50_imagenet.py:mrl,runlocal,reader=tf_data")
  config.input.data_dir = only_array_record
  source = pipeline.open_source(config.input)
  with pytest.raises(ConfigError, match=r"has \['array_record'\] files but reader 'tf_data' "
                                        r"needs tfrecord .*python -m mrl_jax.data.prepare "
                                        r"--dataset=imagenet2012"):
    pipeline.make_reader(config.input, source).eval_batches(
        "validation", local_batch=1, num_batches=1, preprocess=None, process_index=0,
        process_count=1)
