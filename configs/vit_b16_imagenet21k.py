r"""ViT-B/16 MRL / MRL-E pretraining on ImageNet-21k (the paper's ViT nesting 12, 24, ..., 768).

  python train.py --config=configs/vit_b16_imagenet21k.py:mrl  --workdir=...
  python train.py --config=configs/vit_b16_imagenet21k.py:mrle --workdir=...

Recipe: the original ViT ImageNet-21k pretraining for B/16 (Dosovitskiy et al. 2021, Table 3
and App. B.1): 90 epochs at 224px, batch 4096, Adam b1=0.9 b2=0.999, lr 1e-3, weight decay 0.03
(decoupled; not on norms/biases), 10k warmup steps then linear decay, gradient clip at global
norm 1, dropout 0.1; Inception crop + flip, pixels scaled to [-1, 1]. Loss: sigmoid
cross-entropy (big_vision `vit_i21k.py` / `bit_i21k.py`: `loss = 'sigmoid_xent'`, the loss of
the original ViT pretraining), summed over the nesting sizes, with the heads' bias starting at
big_vision's `init_head_bias = -10.0` (a 1/21,843 prior: the first steps do not push 21,842
negatives down at once). Data: TFDS `imagenet21k` (a builder the user registers/prepares;
21,843 classes). ImageNet-21k has no official train/validation split: its TFDS builder has one
split, `full`, and big_vision trains on `full[51200:]` and evaluates on `full[:25600]` (test) /
`full[25600:51200]` (val); so do we (the k-NN database is the training slice).
Args: `mrl` | `mrle`, `variant=<Ti|S|B|L|H>/<patch>`, `reader=tf_data`, `dataset=<tfds name>`,
`num_classes=<C>`, `loss=sigmoid_xent|softmax_xent`, `train_split=` / `eval_split=` (TFDS split
strings), `runlocal`. The paper reports ImageNet-1K 1-NN for JFT-pretrained MRL ViT-B/16:
53.6 @12 ... 71.9 @768.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="B/16", reader="grain", dataset="imagenet21k",
                         num_classes=21843, dtype="bfloat16", batch_size=4096, epochs=90.0,
                         train_split="", eval_split="", loss="sigmoid_xent", runlocal=False)
  # big_vision's slices of `full` (runlocal: 16 examples held out, as its runlocal evals).
  train_split = arg.train_split or ("full[16:]" if arg.runlocal else "full[51200:]")
  eval_split = arg.eval_split or ("full[:16]" if arg.runlocal else "full[:25600]")
  c = common.base_config()
  common.set_head(c, arg)
  c.num_classes = arg.num_classes
  c.dtype = arg.dtype
  c.model_name = "vit"
  c.model.update(variant=arg.variant, image_size=224, pool="cls", dropout_rate=0.1)
  c.mrl.nesting = "halving:12"  # B/16: 12, 24, ..., 768 (the paper's); Ti/S/L/H likewise
  c.loss.name = arg.loss
  if arg.loss == "sigmoid_xent":
    c.mrl.head_bias_init = -10.0  # big_vision init_head_bias

  c.input.update(dataset=arg.dataset, reader=arg.reader, train_split=train_split,
                 eval_split=eval_split, batch_size=arg.batch_size, image_size=224,
                 mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5))
  c.input.pp_train.update(name="inception_crop", flip=True, area_min=0.05)
  c.input.pp_eval.update(name="resize_center_crop", resize_size=256)

  c.optim.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.03, weight_decay_rule="kernels",
                 clip_grad_norm=1.0)
  c.schedule.update(name="linear", base_lr=1e-3, lr_batch_size=4096, warmup_steps=10_000)
  c.total_epochs = arg.epochs
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2500
  c.eval.update(database_split=train_split, knn_k=(1,), retrieval_k=(10,),
                extra_sizes=(16, 32, 64, 128, 256, 512))
  if arg.runlocal:
    c.model.update(variant="Ti/16", image_size=32, dropout_rate=0.0, num_layers=2)
    c.eval.extra_sizes = (16, 32, 64, 128)
    c.num_classes = 10
    c.input.update(batch_size=8, image_size=32)
    c.input.pp_eval.resize_size = 36
    c.total_epochs = 0.0
    c.total_steps = 2
    c.schedule.warmup_steps = 1
    c.dtype = "float32"
  return c
