r"""ResNet-50 on ImageNet-1K: MRL, MRL-E and FF-m, with the official MRL recipe (paper Sec. 4).

  python train.py --config=configs/resnet50_imagenet.py:mrl    --workdir=gs://.../r50_mrl
  python train.py --config=configs/resnet50_imagenet.py:mrle   --workdir=...
  python train.py --config=configs/resnet50_imagenet.py:ff=64  --workdir=...
  python train.py --config=configs/resnet50_imagenet.py:mrl,recipe=standard90 --workdir=...

Recipe `ffcv40` (default) is the run behind the paper's ResNet-50 numbers: the official code
(github.com/RAIVNLab/MRL, README and `train/train_imagenet.py`) trains FFCV's
`rn50_configs/rn50_40_epochs.yaml` (github.com/libffcv/ffcv-imagenet) on 2 GPUs x 512 images
with `--lr.lr=0.425` ("we linearly downscale the learning rate by 4" from FFCV's 8 x 512 at 1.7):
- 40 epochs, global batch 1024, SGD momentum 0.9 (no Nesterov), peak lr 0.425 per 1024 images
  (scaled linearly with the batch: 1.7 at 4096), FFCV's cyclic schedule: 1e-4 x lr at epoch 0,
  lr at epoch 2, 0 at epoch 40, interpolated per step;
- weight decay 1e-4 on every parameter whose PyTorch name has no "bn" (so the shortcut
  BatchNorms, `downsample.1`, and the head biases are decayed), label smoothing 0.1;
- torchvision ResNet-50 (no zero-init of the last BN) with BlurPool before every strided conv
  of >= 16 input channels, heads initialised as PyTorch's nn.Linear;
- progressive resizing: 160 px until epoch 29, linear to 192 px at epoch 34, rounded to
  multiples of 32 (so 160 through epoch 31, 192 from epoch 32); Inception crop + flip.
Evaluation: the paper's tables come from the official inference script
(`inference/pytorch_inference.py`: resize 256, centre crop 224, no TTA), the default here;
`eval=ffcv` uses FFCV's validation instead (resolution 256 of a 224/256 centre crop, flip TTA).
The official run used fp16 autocast; here compute is bfloat16 (`dtype=float32` for full).
Every field is checked against these sources in tests/configs_test.py.
Recipe `standard90`: 90 epochs, batch 256, lr 0.1, warmup 5 epochs + cosine, zero-init residual,
no BlurPool. Nesting 8, 16, ..., 2048 (9 sizes). Expected top-1 (paper Table 1, MRL): 66.6 @8
... 76.8 @2048. Data: TFDS `imagenet2012` prepared by the user, in both readers' formats
(`python -m mrl_jax.data.prepare --dataset=imagenet2012 --manual_dir=... --data_dir=...`).
Args: `mrl` | `mrle` | `ff=<m>`, `recipe=ffcv40|standard90`, `progressive=false`, `eval=ffcv`,
`reader=tf_data`, `dtype=`, `batch_size=`, `runlocal`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, recipe="ffcv40", progressive=True, eval="official",
                         reader="grain", dtype="bfloat16", batch_size=0, runlocal=False)
  c = common.base_config()
  common.set_head(c, arg)
  c.num_classes = 1000
  c.dtype = arg.dtype
  c.model_name = "resnet"
  c.model.update(depth=50, width=64, stem="imagenet", in_channels=3)
  c.mrl.nesting = "halving:8"

  c.input.update(dataset="imagenet2012", reader=arg.reader, train_split="train",
                 eval_split="validation", image_size=224, mean=common.IMAGENET_MEAN,
                 std=common.IMAGENET_STD)
  c.input.pp_train.update(name="inception_crop", flip=True)
  c.input.pp_eval.update(name="resize_center_crop", resize_size=256)

  c.optim.update(name="sgd", momentum=0.9, nesterov=False, weight_decay=1e-4)
  if arg.recipe == "ffcv40":
    c.model.update(zero_init_residual=False, blurpool=True)
    c.mrl.head_init = "torch_linear"
    c.optim.weight_decay_rule = "official"
    c.input.batch_size = 1024
    c.loss.label_smoothing = 0.1
    c.schedule.update(name="one_cycle", base_lr=0.425, lr_batch_size=1024, peak_epoch=2.0,
                      start_lr_factor=1e-4, end_lr_factor=0.0)
    c.total_epochs = 40.0
    c.input.progressive_resize.update(enabled=arg.progressive, min_res=160, max_res=192,
                                      start_epoch=29.0, end_epoch=34.0, multiple=32)
  elif arg.recipe == "standard90":
    c.model.update(zero_init_residual=True, blurpool=False)
    c.optim.weight_decay_rule = "kernels"
    c.input.batch_size = 256
    c.loss.label_smoothing = 0.0
    c.schedule.update(name="cosine", base_lr=0.1, lr_batch_size=256, warmup_epochs=5.0)
    c.total_epochs = 90.0
  else:
    raise ValueError(f"unknown recipe {arg.recipe!r}; allowed: ffcv40, standard90")
  if arg.eval == "ffcv":  # FFCV's validation during training: 256 px, 224/256 crop, flip TTA
    c.input.pp_eval.update(name="center_crop_resize", crop_ratio=224 / 256, image_size=256)
    c.eval.flip_tta = True
  elif arg.eval != "official":
    raise ValueError(f"unknown eval {arg.eval!r}; allowed: official, ffcv")
  if arg.batch_size:
    c.input.batch_size = arg.batch_size

  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2500
  c.keep_checkpoints = 3
  c.eval.update(database_split="train", knn_k=(1,), retrieval_k=(10, 25, 50, 100),
                extra_sizes=(12, 24, 48, 96, 192, 384, 768, 1536), feature_dtype="float32",
                query_block=1024, database_block=4096,
                # The paper's adaptive retrieval (K=200 -> 2048) and funnels, and cascades.
                adaptive_retrieval=True, shortlist_sizes=(8, 16, 32), rerank_sizes=(512, 2048),
                shortlist_k=(200,),
                funnels=((8, (16, 32, 64, 128, 2048), (800, 400, 200, 50, 10)),
                         (16, (32, 64, 128, 2048), (800, 400, 200, 50)),
                         (32, (64, 128, 2048), (800, 400, 200))),
                adaptive_classification=True, ac_seeds=30,
                # ImageNet-ReaL (Beyer et al. 2020): the validation images' reassessed,
                # multi-label labels; images without one are left out, as the ViT papers do.
                splits=("imagenet2012_real:validation",))
  if arg.runlocal:  # the real architecture at width 8 and 64px: mock-data tests on CPU.
    c.model.width = 8
    c.eval.splits = ()
    c.mrl.nesting = "halving:8"
    c.eval.update(extra_sizes=(12, 24, 48, 96, 192), rerank_sizes=(256,),
                  funnels=((8, (16, 32, 256), (16, 8, 4)),), shortlist_k=(16,))
    c.input.batch_size = 8
    c.input.image_size = 64
    c.input.pp_eval.resize_size = 72
    c.input.progressive_resize.update(min_res=64, max_res=64)
    if arg.eval == "ffcv":
      c.input.pp_eval.image_size = 72
    c.total_epochs = 0.0
    c.total_steps = 2
    c.dtype = "float32"
  return c
