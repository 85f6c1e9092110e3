r"""Input pipeline throughput per CPU core: grain (ArrayRecord) vs tf.data (TFRecord).

ImageNet-style JPEG training preprocessing (Inception crop at 224 + flip + normalise) on a
synthetic TFDS dataset of JPEGs with ImageNet's typical size (500x375, smooth content so the
files are ~50-100 KB like photographs rather than incompressible noise). Both readers run the same
`preprocess.Preprocess` definition. Each measurement runs in its own process with TensorFlow,
grain and tf.data restricted to `--threads` threads, so images/s at 1 thread is the per-core
figure.

  python benchmarks/input_pipeline.py --num_images=1024 --threads=1,2
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


def _builder_cls(num_images: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class SyntheticJpeg(tfds.core.GeneratorBasedBuilder):
    """num_images photographs-like JPEGs, 500x375 (ImageNet's most common size), 1000 classes."""
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
      from PIL import Image  # pylint: disable=g-import-not-at-top
      import io  # pylint: disable=g-import-not-at-top
      rng = np.random.default_rng(0)
      for i in range(num_images):
        # Low-frequency colour field + a few edges: compresses like a photograph.
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC))
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        yield i, {"image": buf.getvalue(), "label": int(rng.integers(1000))}

  return SyntheticJpeg


def measure(reader: str, data_dir: str, threads: int, num_images: int, batch: int) -> dict:
  """Runs in a fresh process (TF thread settings must precede TF initialisation)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  from configs import common  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  _builder_cls(num_images)  # registers the dataset name
  config = common.base_config()
  config.input.update(dataset="synthetic_jpeg", data_dir=data_dir, reader=reader,
                      num_workers=threads, image_size=224)
  source = pipeline.open_source(config.input)
  r = pipeline.make_reader(config.input, source)
  tp = preprocess.train_from_config(config.input, channels=3, steps_per_epoch=1)
  it = r.train_batches("train", local_batch=batch, start_batch=0, seed=0, train_preprocess=tp,
                       process_index=0, process_count=1, shuffle_buffer=num_images)
  next(it)  # warm-up: tracing, file opening
  n_batches = max(2, num_images // batch)
  t0 = time.perf_counter()
  for _ in range(n_batches):
    b = next(it)
  seconds = time.perf_counter() - t0
  assert b["image"].shape == (batch, 224, 224, 3)
  return {"reader": reader, "threads": threads, "images": n_batches * batch,
          "images_per_second": n_batches * batch / seconds,
          "images_per_second_per_thread": n_batches * batch / seconds / threads}


FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 1024, "synthetic JPEGs in the benchmark dataset")
flags.DEFINE_list("threads", ["1", "2"], "reader threads to measure")
flags.DEFINE_integer("batch", 64, "batch size")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: a temporary one)")
flags.DEFINE_string("measure", None, "internal: 'reader:threads' measured in a subprocess")


def main(argv):
  del argv
  if FLAGS.measure:
    reader, threads = FLAGS.measure.split(":")
    print(json.dumps(measure(reader, FLAGS.data_dir, int(threads), FLAGS.num_images,
                             FLAGS.batch)))
    return 0
  data_dir = FLAGS.data_dir or os.path.join(tempfile.gettempdir(), "mrl_jax_bench_tfds")
  from mrl_jax.data import builtin  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  builtin.prepare_both_formats(_builder_cls(FLAGS.num_images), data_dir)
  print(f"dataset ready in {time.perf_counter() - t0:.1f}s ({data_dir})", flush=True)
  rows = []
  for threads in [int(t) for t in FLAGS.threads]:
    for reader in ("grain", "tf_data"):
      out = subprocess.run(
          [sys.executable, __file__, f"--measure={reader}:{threads}", f"--data_dir={data_dir}",
           f"--num_images={FLAGS.num_images}", f"--batch={FLAGS.batch}"],
          capture_output=True, text=True, check=True, env=dict(os.environ,
                                                              TF_CPP_MIN_LOG_LEVEL="2"))
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  print("\n| reader | threads | images/s | images/s per thread |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['reader']} | {r['threads']} | {r['images_per_second']:.0f} | "
          f"{r['images_per_second_per_thread']:.0f} |")
  return 0


if __name__ == "__main__":
  app.run(main)
