r"""MRL ResNet-18 (width 16, d = 128) on scikit-learn's 8x8 digits: the built-in offline job.

  python train.py --config=configs/digits_resnet_mrl.py --workdir=runs/digits
  python eval.py  --config=configs/digits_resnet_mrl.py --workdir=runs/digits

Nesting sizes 2, 4, ..., 128. The data (1,797 images, 10 classes; 1,438 train / 359 test,
stratified and fixed) ships inside scikit-learn and is prepared as a TFDS dataset on first use.
Args: see configs.common.builtin_resnet_config (`mrle`, `ff=<m>`, `reader=tf_data`, `runlocal`..).
Runtime and accuracy: the README's first section; bf16 vs f32: docs/training_and_evaluation.md
"Mixed precision".
"""

from configs import common


def get_config(arg=None):
  return common.builtin_resnet_config(arg, dataset="sklearn_digits", image_size=8, pad=1,
                                      mean=77.9, std=95.9, epochs=40.0, eval_every_steps=200,
                                      database_block=1024)
