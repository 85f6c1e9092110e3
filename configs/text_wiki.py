r"""Matryoshka text encoders on the built-in offline text: the language half of the paper, on CPU.

  python train.py --config=configs/text_wiki.py --workdir=runs/text        # MLM, ~27 min, 2 cores
  python eval.py  --config=configs/text_wiki.py --workdir=runs/text
  python train.py --config=configs/text_wiki.py:contrastive --workdir=runs/text_sent

MLM: 2,000 steps of 64 sequences at 78-85 sequences/s on a 2-core AMD EPYC host (measured over
steps 300-500 of this command, 2026-12-07; the total extrapolated from that rate).

Data (mrl_jax/data/builtin_text.py, real text from the gensim wheel): `wiki_passages` (2,543
train / 641 test paragraphs of gensim's English Wikipedia sample, split by article) for
training; evaluation on Lee et al.'s human similarity ratings (`lee_similarity`: Spearman), the
test articles' inverse-cloze retrieval (`wiki_passages:test`: nDCG@10, MRR@10, recall@k),
labelled movie-review sentences (`polarity_sentences`: k-NN, mAP@k, adaptive retrieval), and
for MLM the masked-token accuracy on the test paragraphs, each at every size, quantised too.

Args (comma-separated):
- `mlm` (default): BERT masked-LM pretraining with the tied head nested (paper Sec. 3, MRL-E),
  BERT-Tiny from scratch (2 layers, d = 128), nesting 8, 16, ..., 128;
- `contrastive`: sentence embeddings, in-batch negatives on the (query, document) pairs
  (sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss)); `two_d`: 2D Matryoshka;
- `standard`: the non-MRL baseline (only the full size trained; every size evaluated by
  truncation);
- `minilm`: all-MiniLM-L6-v2's architecture (6 layers, d = 384, mean pooling, nesting 24..384),
  fine-tuned from its released weights: first `python -m mrl_jax.convert_hf
  --checkpoint=builtin:all-MiniLM-L6-v2 --config=configs/text_wiki.py:contrastive,minilm
  --workdir=runs/minilm`, then train with `--config.init_from=runs/minilm`;
- `reader=tf_data`, `seed=<s>`, `steps=<n>`, `runlocal` (a few steps of a tiny model, tests).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, mlm=False, contrastive=False, two_d=False, standard=False,
                         minilm=False, runlocal=False, reader="grain", seed=0, steps=0)
  c = common.base_config()
  c.seed = arg.seed
  c.model_name = "bert"
  c.objective = "contrastive" if arg.contrastive else "mlm"
  c.model.update(variant="tiny", vocab_size=30522, max_len=512, type_vocab_size=2,
                 pool="mean" if arg.contrastive else "cls", pooler=False, dropout_rate=0.1,
                 attention_dropout_rate=0.1)
  c.mrl.nesting = "halving:8"
  if arg.contrastive:  # bert-base-uncased's WordPiece (all-MiniLM's), 64-token texts
    c.init_from_heads = False  # no heads: init_from takes the encoder
    c.text.update(tokenizer="wordpiece", vocab="builtin:bert-base-uncased", lowercase=True,
                  features=("query", "document"), pair_mode="columns", max_length=64)
    c.contrastive.update(scale=20.0, symmetric=False, two_d=arg.two_d)
    batch = 32
  else:  # an 8,000-piece sentencepiece vocabulary trained on the corpus: a softmax over 8k
    c.model.vocab_size = 8000
    c.text.update(tokenizer="sentencepiece", vocab="builtin:wiki_passages-sp8000",
                  features=("text",), max_length=64, max_predictions=10)
    batch = 64

  c.input.update(dataset="wiki_passages", reader=arg.reader, train_split="train",
                 eval_split="test", batch_size=batch, shuffle_buffer=4096)
  c.optim.update(name="adamw", b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
                 weight_decay_rule="kernels", clip_grad_norm=1.0)
  c.schedule.update(name="linear", base_lr=5e-4 if arg.contrastive else 1e-3,
                    lr_batch_size=batch, warmup_steps=100)
  c.total_epochs = 0.0
  c.total_steps = arg.steps or (1500 if arg.contrastive else 2000)
  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 500

  if arg.minilm:  # all-MiniLM-L6-v2 (sentence-transformers): fine-tuned, not from scratch
    c.model.update(variant="minilm_l6", pool="mean", vocab_size=30522)
    c.mrl.nesting = "24,48,96,192,384"
    c.text.update(tokenizer="wordpiece", vocab="builtin:bert-base-uncased", max_length=64)
    c.schedule.update(base_lr=2e-5, lr_batch_size=32, warmup_steps=30)
    c.total_steps = arg.steps or 300
  if arg.standard:  # the baseline: the full size only, smaller sizes by truncation
    c.mrl.nesting = "full"
    d = 384 if arg.minilm else 128
    c.eval.extra_sizes = tuple(m for m in (8, 16, 24, 32, 48, 64, 96, 128, 192) if m < d)

  c.eval.update(knn=True, knn_k=(1, 5), retrieval_k=(10,), query_block=256,
                database_block=1024, adaptive_retrieval=True, shortlist_sizes=(8, 16),
                rerank_sizes=(), shortlist_k=(50,), funnels=(), quantize=("int8", "binary"),
                text_sets=("similarity:lee_similarity:test", "retrieval:wiki_passages:test",
                           "neighbors:polarity_sentences:train:test"))
  if c.objective == "mlm":
    c.eval.text_sets += ("mlm:wiki_passages:test",)
  if arg.minilm:
    c.eval.shortlist_sizes = (24, 48)

  if arg.runlocal:
    c.model.update(num_layers=1)
    c.text.update(max_length=32, max_predictions=5)
    c.input.batch_size = 16
    c.schedule.lr_batch_size = 16
    c.total_steps = arg.steps or 4
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.eval.update(text_sets=("similarity:lee_similarity:test",) + (
        ("mlm:lee_corpus:test",) if c.objective == "mlm" else ()), adaptive_retrieval=False)
  return c
