r"""ResNet-50 on ImageNet-1K: MRL, MRL-E and FF-m, with the official MRL recipe (paper Sec. 4).

  python train.py --config=configs/resnet50_imagenet.py:mrl    --workdir=gs://.../r50_mrl
  python train.py --config=configs/resnet50_imagenet.py:mrle   --workdir=...
  python train.py --config=configs/resnet50_imagenet.py:ff=64  --workdir=...
  python train.py --config=configs/resnet50_imagenet.py:mrl,recipe=standard90 --workdir=...

Recipe `ffcv40` (default; the official code trains with FFCV's ResNet-50 recipe): 40 epochs, SGD
momentum 0.9, global batch 1024, peak lr 1.7 (scaled linearly with batch), one-cycle schedule
(linear 0 -> peak at epoch 2 -> 0 at the end), weight decay 1e-4 without BN/bias decay, label
smoothing 0.1, eval at 224 after resize 256; `progressive` adds FFCV's 160 -> 192 train-resolution
ramp (epochs 11..34). Recipe `standard90`: 90 epochs, batch 256, lr 0.1, warmup 5 epochs + cosine.
Nesting 8, 16, ..., 2048 (9 sizes). Expected top-1 (paper Table 1, MRL): 66.6 @8 ... 76.8 @2048;
see ../shared/reference and README. Data: TFDS `imagenet2012` prepared by the user (`tfds build
imagenet2012 --manual_dir=...`, add `--file_format=array_record` for the default grain reader).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, recipe="ffcv40", progressive=False, reader="grain",
                         dtype="bfloat16", batch_size=0, runlocal=False)
  c = common.base_config()
  common.set_head(c, arg)
  c.num_classes = 1000
  c.dtype = arg.dtype
  c.model_name = "resnet"
  c.model.update(depth=50, width=64, stem="imagenet", in_channels=3, zero_init_residual=True)
  c.mrl.nesting = "halving:8"

  c.input.update(dataset="imagenet2012", reader=arg.reader, train_split="train",
                 eval_split="validation", image_size=224, mean=common.IMAGENET_MEAN,
                 std=common.IMAGENET_STD)
  c.input.pp_train.update(name="inception_crop", flip=True)
  c.input.pp_eval.update(name="resize_center_crop", resize_size=256)

  c.optim.update(name="sgd", momentum=0.9, nesterov=False, weight_decay=1e-4,
                 decay_norm_and_bias=False)
  if arg.recipe == "ffcv40":
    c.input.batch_size = 1024
    c.loss.label_smoothing = 0.1
    c.schedule.update(name="one_cycle", base_lr=1.7, lr_batch_size=1024, peak_epoch=2.0)
    c.total_epochs = 40.0
    if arg.progressive:
      c.input.progressive_resize.update(enabled=True, min_res=160, max_res=192,
                                        start_epoch=11.0, end_epoch=34.0, multiple=32)
  elif arg.recipe == "standard90":
    c.input.batch_size = 256
    c.loss.label_smoothing = 0.0
    c.schedule.update(name="cosine", base_lr=0.1, lr_batch_size=256, warmup_epochs=5.0)
    c.total_epochs = 90.0
  else:
    raise ValueError(f"unknown recipe {arg.recipe!r}; allowed: ffcv40, standard90")
  if arg.batch_size:
    c.input.batch_size = arg.batch_size

  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2500
  c.keep_checkpoints = 3
  c.eval.update(database_split="train", knn_k="1", retrieval_k="10,25,50,100",
                extra_sizes="12,24,48,96,192,384,768,1536", feature_dtype="float32",
                query_block=1024, database_block=65536,
                # The paper's adaptive retrieval (K=200 -> 2048) and funnels, and cascades.
                adaptive_retrieval=True, shortlist_sizes="8,16,32", rerank_sizes="512,2048",
                shortlist_k="200",
                funnels=("8:16,32,64,128,2048:800,400,200,50,10;"
                         "16:32,64,128,2048:800,400,200,50;32:64,128,2048:800,400,200"),
                adaptive_classification=True, ac_seeds=30)
  if arg.runlocal:  # the real architecture at width 8 and 64px: mock-data tests on CPU.
    c.model.width = 8
    c.mrl.nesting = "halving:8"
    c.eval.update(extra_sizes="12,24,48,96,192", rerank_sizes="256",
                  funnels="8:16,32,256:16,8,4", shortlist_k="16")
    c.input.batch_size = 8
    c.input.image_size = 64
    c.input.pp_eval.resize_size = 72
    c.total_epochs = 0.0
    c.total_steps = 2
    c.dtype = "float32"
  return c
