r"""The paper's BERT-Base Matryoshka MLM run (Kusupati et al. 2022, Sec. 3 / Appendix C).

  python train.py --config=configs/bert_base_mlm.py:mrl --workdir=gs://bucket/bert_mrl
  python train.py --config=configs/bert_base_mlm.py:standard --workdir=...  # non-MRL baseline
  python eval.py  --config=configs/bert_base_mlm.py:mrl --workdir=...

BERT-Base (12 layers, 768 wide, 12 heads, vocab 30,522, 512 positions; 109,482,240 parameters
with the pooler, as Devlin et al. 2019) trained with masked-LM only, its tied output layer nested
(MLM "reduces to MRL-E": paper Sec. 3) at 12, 24, 48, ..., 768 (the paper's nesting for
768-d models), weights 1. Paper Fig. 8 (`BERT MLM` plots of the official repository): masked
token accuracy MRL 59.92 @12, 62.05 @24, 63.40 @48, 64.15 @96, 64.58 @192, 64.81 @384,
65.00 @768 (FF 60.12 ... 65.54).

| field | value | source |
|---|---|---|
| model | BERT-Base, uncased WordPiece (bert-base-uncased's vocab.txt), pooler kept | Devlin et al. 2019 |
| objective | MLM, 15 % of tokens, 80/10/10, at most 20 predictions per 128-token sequence | Devlin et al. 2019 §3.1, A.2 |
| nesting | 12, 24, 48, 96, 192, 384, 768, weights 1 | MRL paper Appendix C |
| data | English Wikipedia + BooksCorpus | MRL paper Appendix C; Devlin et al. 2019 §3.1 |
| optimizer | AdamW, lr 1e-4, beta 0.9 / 0.999, eps 1e-6, weight decay 0.01 (not on LayerNorm or biases), gradient clipping at global norm 1 | MRL paper Appendix C; Devlin et al. 2019 A.2; google-research/bert `optimization.py` |
| schedule | 10k steps linear warmup, then linear decay to 0 | Devlin et al. 2019 A.2 |
| batch, steps | 1,024 sequences, 450,000 steps | MRL paper Appendix C |
| sequence length | 128 tokens | Devlin et al. 2019 A.2 (phase 1) |
| dropout | 0.1 (hidden and attention probabilities) | Devlin et al. 2019 A.2 |

Data: TFDS has English Wikipedia (`wikipedia/20230601.en`, `text` feature), a Beam builder:
with apache-beam installed, `python -m mrl_jax.data.prepare --dataset=wikipedia/20230601.en
--data_dir=...` builds it (TFDS's Beam runner; not run in this project's tests). BooksCorpus is
not in TFDS (it is no longer distributed): register your own builder with a `text` feature,
prepare it with `--module=<the module that defines it>` and set `--config.input.dataset=<it>`,
or a builder that mixes both. Args: `mrl` (default) / `standard`
(the non-MRL baseline: only 768 trained, smaller sizes by truncation of the tied head),
`dataset=<tfds name>`, `reader=tf_data`, `runlocal`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, standard=False, runlocal=False, reader="grain",
                         dataset="wikipedia/20230601.en")
  c = common.base_config()
  c.model_name = "bert"
  c.objective = "mlm"
  c.model.update(variant="base", vocab_size=30522, max_len=512, type_vocab_size=2, pool="cls",
                 pooler=True, dropout_rate=0.1, attention_dropout_rate=0.1, num_layers=0)
  c.mrl.nesting = "12,24,48,96,192,384,768"
  if arg.standard:  # the full size only; every other size evaluated by truncation
    c.mrl.nesting = "768"
    c.eval.extra_sizes = (12, 24, 48, 96, 192, 384)
  c.text.update(tokenizer="wordpiece", vocab="builtin:bert-base-uncased", lowercase=True,
                features=("text",), max_length=128, mask_rate=0.15, max_predictions=20)
  c.input.update(dataset=arg.dataset, reader=arg.reader, train_split="train",
                 eval_split="train[:10000]", batch_size=1024, shuffle_buffer=100_000)
  c.optim.update(name="adamw", b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
                 weight_decay_rule="kernels", clip_grad_norm=1.0)
  c.schedule.update(name="linear", base_lr=1e-4, lr_batch_size=1024, warmup_steps=10_000,
                    end_lr_factor=0.0)
  c.total_epochs = 0.0
  c.total_steps = 450_000
  c.dtype = "bfloat16"
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  c.eval.update(text_sets=(f"mlm:{arg.dataset}:train[:10000]",), quantize=("int8", "binary"))
  if arg.runlocal:
    c.model.update(variant="tiny")
    c.mrl.nesting = "8,16,32,64,128"
    c.eval.extra_sizes = ()
    c.text.update(max_length=32, max_predictions=5)
    c.input.update(batch_size=8, eval_split="train[:16]")
    c.schedule.update(lr_batch_size=8, warmup_steps=1)
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
    c.eval.text_sets = (f"mlm:{arg.dataset}:train[:16]",)
  return c
