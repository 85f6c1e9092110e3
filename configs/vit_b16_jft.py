r"""ViT-B/16 MRL on a JFT-style private dataset: only a TFDS builder name and its class count.

  python train.py --config=configs/vit_b16_jft.py:dataset=my_jft,num_classes=18291 \
      --workdir=gs://.../vit_b16_jft_mrl

Any TFDS builder the user registers and prepares works (`python -m mrl_jax.data.prepare
--dataset=my_jft --module=<the module that defines it> --data_dir=...`: ArrayRecord for the
default grain reader and TFRecord for `reader=tf_data`); it needs an image
feature and a label feature (names via `image_key=`, `label_key=`): JFT-style multi-label, a
Sequence of ClassLabel ids or a [C] multi-hot Tensor (JFT-300M has about 1.9 labels per
image), or one integer class. Recipe: the original ViT JFT-300M pretraining for B/16
(Dosovitskiy et al. 2021, Table 3 and App. B.1): 7 epochs at 224px, batch 4096, Adam(0.9,
0.999), lr 8e-4, decoupled weight decay 0.1, 10k warmup steps then linear decay, gradient clip
1.0, no dropout; sigmoid cross-entropy on the multi-hot labels (big_vision's `sigmoid_xent`,
as for ImageNet-21k), summed over the nesting sizes, heads' bias starting at -10 (big_vision's
`init_head_bias`). Nesting 12, 24, ..., 768 (the paper's ViT sizes). The paper reports
ImageNet-1K 1-NN of its JFT MRL ViT-B/16 from 53.6 @12 to 71.9 @768 (paper Table 8).
Args: `mrl` | `mrle`, `dataset=`, `num_classes=`, `variant=`, `reader=`, `image_key=`,
`label_key=`, `epochs=`, `batch_size=`, `train_split=`, `eval_split=` (default train /
validation), `runlocal`.
"""

from configs import common
from configs import vit_b16_imagenet21k


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="", num_classes=0, variant="B/16", reader="grain",
                         image_key="image", label_key="label", epochs=7.0, batch_size=4096,
                         train_split="train", eval_split="validation", runlocal=False)
  if not arg.runlocal and (not arg.dataset or arg.num_classes < 1):
    raise ValueError("configs/vit_b16_jft.py needs dataset=<TFDS builder> and "
                     "num_classes=<C>, e.g. :dataset=my_jft,num_classes=18291")
  head = "ff=" + str(arg.ff) if arg.head == "ff" else arg.head
  c = vit_b16_imagenet21k.get_config(
      f"{head},variant={arg.variant},reader={arg.reader},batch_size={arg.batch_size},"
      f"epochs={arg.epochs},train_split={arg.train_split},eval_split={arg.eval_split}"
      + (",runlocal" if arg.runlocal else
                               f",dataset={arg.dataset},num_classes={arg.num_classes}"))
  c.input.update(image_key=arg.image_key, label_key=arg.label_key)
  if arg.runlocal:
    c.input.dataset = arg.dataset or c.input.dataset
    return c
  c.model.dropout_rate = 0.0
  c.optim.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.1, clip_grad_norm=1.0)
  c.schedule.update(name="linear", base_lr=8e-4, lr_batch_size=4096, warmup_steps=10_000)
  return c
