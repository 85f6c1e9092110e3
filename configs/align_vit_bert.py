r"""The paper's ALIGN-MRL dual encoder, and its SigLIP and LiT variants.

  python train.py --config=configs/align_vit_bert.py:mrl --workdir=gs://bucket/align_mrl
  python train.py --config=configs/align_vit_bert.py:siglip --workdir=...
  python train.py --config=configs/align_vit_bert.py:lit \
      --config.init_from=<an MRL ResNet-50 workdir> --workdir=...
  python eval.py  --config=configs/align_vit_bert.py:mrl --workdir=...

`mrl` (MRL paper Sec. 3 / Appendix C): ViT-B/16 image tower and BERT-Base text tower, trained
contrastively on ALIGN's noisy image-text pairs with MRL "applied to both the embeddings that
are being contrasted", each prefix normalised on its own, weights 1, nesting 12, 24, ..., 768;
the training setup is ALIGN's (Jia et al. 2021, §5: the text [CLS] embedding projected to the
image tower's width, softmax loss both ways with a learned temperature and label smoothing
0.1, LAMB, lr 1e-3 with 10k warmup steps and linear decay, weight decay 1e-5,
batch 16,384, 1.2M steps, 64 text tokens, 289 px crops for their EfficientNet, 224 for the
ViT-B/16 here). Paper Fig. 4 / Table 4 (ImageNet 1-NN of the image tower): 43.57 @12 ...
67.85 @768.

| field | value | source |
|---|---|---|
| image tower | ViT-B/16 at 224 px, CLS | MRL Appendix C |
| text tower | BERT-Base, [CLS], projected to 768 | MRL Appendix C; ALIGN §5 |
| nesting | 12, 24, ..., 768, weights 1, both towers | MRL Sec. 3 / Appendix C |
| loss | softmax both directions, label smoothing 0.1 | ALIGN §3 (Eq. 1-2), §5 |
| temperature | learned (ALIGN §3); initialised at 1.0 here (scale 1.0) | ALIGN §3 |
| optimizer | LAMB, weight decay 1e-5 | ALIGN §5 |
| schedule | lr 1e-3, 10k warmup steps, then linear decay to 0 | ALIGN §5 |
| batch, steps | 16,384 pairs, 1.2M steps | ALIGN §5 |
| text length | 64 tokens | ALIGN §5 |

`siglip`: the same towers with SigLIP's sigmoid loss (Zhai et al. 2023: bias initialised at
-10, scale log-parametrised at 10), AdamW. `lit` (Zhai et al. 2022, LiT): a locked MRL
ResNet-50 image tower (config.model.freeze = "image"; init_from an MRL ResNet-50 run or the
converted released checkpoint) and a BERT-Base text tower projected to 2048, trained to it at
the image tower's nesting 8, 16, ..., 2048.

Data: any TFDS builder with an image and captions (`config.input.caption_key`), e.g.
`coco_captions` (`captions/text`, five per image); ALIGN's 1.8B pairs are not public. Zero-shot
on ImageNet (and V2, R, A with their 200-class masks) needs a prompts file:
`--config.eval.zeroshot_prompts=prompts.json` with {"classnames": [...1000...], "templates":
["a photo of a {}.", ...]} (e.g. the class names and 80 templates CLIP published).
Args: `mrl` (default), `siglip`, `lit`, `standard` (only the full size trained),
`dataset=<tfds name>`, `caption_key=<feature>`, `runlocal` (tests, on the built-in digits).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, siglip=False, lit=False, standard=False, runlocal=False,
                         dataset="coco_captions", caption_key="captions/text", reader="grain")
  c = common.base_config()
  c.model_name = "two_towers"
  c.objective = "contrastive"
  c.image_tower.update(model_name="vit", variant="B/16", image_size=224, pool="cls",
                       in_channels=3, dropout_rate=0.0, num_layers=0)
  c.text_tower.update(model_name="bert", variant="base", vocab_size=30522, max_len=512,
                      pool="cls", pooler=False, dropout_rate=0.1, attention_dropout_rate=0.1,
                      num_layers=0)
  c.model.update(projection=768, freeze="")
  c.text.update(tokenizer="wordpiece", vocab="builtin:bert-base-uncased", lowercase=True,
                features=("caption",), max_length=64)
  c.mrl.nesting = "12,24,48,96,192,384,768"
  c.contrastive.update(loss="softmax", scale=1.0, per_size_scale=False, label_smoothing=0.1)
  c.input.update(dataset=arg.dataset, caption_key=arg.caption_key, reader=arg.reader,
                 train_split="train", eval_split="val", batch_size=16_384, image_size=224,
                 shuffle_buffer=100_000)
  c.input.pp_train.update(name="inception_crop", flip=False)  # captions name left / right
  c.input.pp_eval.update(name="resize_center_crop", resize_size=256)
  c.optim.update(name="lamb", b1=0.9, b2=0.999, eps=1e-6, weight_decay=1e-5,
                 weight_decay_rule="kernels", clip_grad_norm=0.0)
  c.schedule.update(name="linear", base_lr=1e-3, lr_batch_size=16_384, warmup_steps=10_000,
                    end_lr_factor=0.0)
  c.total_epochs = 0.0
  c.total_steps = 1_200_000
  c.dtype = "bfloat16"
  c.log_every_steps = 100
  c.eval_every_steps = 50_000
  c.checkpoint_every_steps = 5_000
  c.eval.update(
      extra_sizes=(16, 32, 64, 128, 256, 512),  # untrained (paper Table 5)
      image_text_sets=(f"retrieval:{arg.dataset}:val", "zeroshot:imagenet2012:validation",
                       "zeroshot:imagenet_v2:test", "zeroshot:imagenet_r:test",
                       "zeroshot:imagenet_a:test", "neighbors:imagenet2012:train:validation"),
      zeroshot_prompts="imagenet_prompts.json")
  if arg.siglip:
    c.contrastive.update(loss="sigmoid", scale=10.0, bias_init=-10.0, label_smoothing=0.0)
    c.optim.update(name="adamw", weight_decay=1e-4)
  if arg.lit:  # a locked MRL ResNet-50 (its nesting) and a BERT-Base text tower onto it
    c.image_tower.update(model_name="resnet", depth=50, width=64, stem="imagenet",
                         blurpool=True, zero_init_residual=False)
    c.model.update(projection=2048, freeze="image")
    c.mrl.nesting = "halving:8"
    c.eval.extra_sizes = (12, 24, 48, 96, 192, 384, 768, 1536)
    c.init_from_heads = False  # the image tower (encoder) only
  if arg.standard:
    c.mrl.nesting = "full"
  if arg.runlocal:  # the built-in captioned digits, tiny towers
    c.image_tower.update(model_name="resnet", depth=18, width=4, stem="small", blurpool=False)
    c.text_tower.update(variant="tiny", num_layers=1)
    c.model.projection = 32
    c.mrl.nesting = "halving:8"
    c.eval.extra_sizes = ()
    c.text.max_length = 16
    c.input.update(dataset="mnist_captions", caption_key="captions", batch_size=32,
                   image_size=32, eval_split="test", mean=(0.0,), std=(255.0,))
    c.input.pp_train.update(name="random_crop", pad=2)
    c.input.pp_eval.update(name="resize")
    c.schedule.update(lr_batch_size=32, warmup_steps=1)
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
    c.eval.update(image_text_sets=("retrieval:mnist_captions:test[:32]",), zeroshot_prompts="")
  return c
