"""The BERT-style text encoder: published parameter counts, masking, pooling, shared blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models import bert
from mrl_jax.models import vit
from tests.conftest import jit_build
from tests.conftest import jit_call


def _count(**kwargs) -> int:
  module = nnx.eval_shape(lambda: bert.Bert(**kwargs, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("variant, pooler, published", [
    # HF BertModel.from_pretrained("bert-base-uncased"): 109,482,240 parameters, pooler included
    # (Devlin et al. 2019's "110M"); without the pooler (768 x 768 + 768) 108,891,648.
    ("base", True, 109_482_240),
    ("base", False, 109_482_240 - 768 * 768 - 768),
    # bert-large-uncased: 335,141,888 (the paper's "340M").
    ("large", True, 335_141_888),
    # sentence-transformers/all-MiniLM-L6-v2 (MiniLM-L6-H384): 22,713,216 with its pooler.
    ("minilm_l6", True, 22_713_216),
])
def test_parameter_counts_equal_the_published_ones(variant, pooler, published):
  """Counted: token (30,522), position (512) and segment (2) embeddings, the embedding
  LayerNorm, every block (fused qkv, attention output, 2 LayerNorms, the MLP), and the pooler
  when built; no MLM head (BERT's is tied to the token embedding; its transform and bias are
  the MLM objective's)."""
  assert _count(variant=variant, pooler=pooler) == published


def test_padding_is_invisible_to_the_real_tokens():
  """Appending [PAD] tokens (mask 0) changes neither the real tokens' states nor mean
  pooling: attention never looks at masked keys."""
  model = jit_build(lambda: bert.Bert("tiny", vocab_size=50, max_len=32, pool="mean",
                                      dropout_rate=0.0, attention_dropout_rate=0.0,
                                      rngs=nnx.Rngs(0)))
  ids = np.random.default_rng(0).integers(5, 50, (2, 6)).astype(np.int32)
  short = {"input_ids": ids, "segment_ids": np.zeros_like(ids), "input_mask": np.ones_like(ids)}
  padded = {k: np.pad(v, [(0, 0), (0, 10)]) for k, v in short.items()}
  z_short, aux_short = jit_call(model, short)
  z_padded, aux_padded = jit_call(model, padded)
  np.testing.assert_allclose(np.asarray(z_padded), np.asarray(z_short), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aux_padded["tokens"])[:, :6],
                             np.asarray(aux_short["tokens"]), rtol=1e-5, atol=1e-5)
  assert aux_padded["layers"].shape == (3, 2, 128)  # embedding output + 2 layers


def test_dropout_is_random_in_training_and_attention_dropout_drops_probabilities():
  model = jit_build(lambda: bert.Bert("tiny", vocab_size=50, max_len=32, rngs=nnx.Rngs(0)))
  ids = np.random.default_rng(1).integers(5, 50, (2, 8)).astype(np.int32)
  tokens = {"input_ids": ids, "segment_ids": np.zeros_like(ids), "input_mask": np.ones_like(ids)}
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, k: nnx.merge(graphdef, s)(tokens, rngs=nnx.Rngs(dropout=k))[0])
  a, b = run(state, jax.random.key(1)), run(state, jax.random.key(2))
  assert not np.allclose(a, b, atol=1e-4)
  np.testing.assert_array_equal(a, run(state, jax.random.key(1)))
  eval_model = nnx.view(model, deterministic=True, raise_if_not_found=False)
  e1 = jit_call(eval_model, tokens)[0]
  np.testing.assert_array_equal(e1, jit_call(eval_model, tokens)[0])


def test_the_blocks_are_the_vits_blocks_in_post_norm_order():
  """One block class serves both encoders (transformer.py): the ViT's is pre-LN, BERT's
  post-LN, with the same parameter names."""
  b = nnx.eval_shape(lambda: bert.Bert("tiny", rngs=nnx.Rngs(0)))
  v = nnx.eval_shape(lambda: vit.ViT("Ti/16", num_layers=1, rngs=nnx.Rngs(0)))
  assert type(b.blocks[0]) is type(v.blocks[0])
  assert b.blocks[0].post_norm and not v.blocks[0].post_norm
  names = lambda m: {k for k, _ in nnx.state(m, nnx.Param).flat_state()}
  assert names(b.blocks[0]) == names(v.blocks[0])


def test_bad_architecture_fields_are_one_line_errors():
  with pytest.raises(ConfigError, match="BERT variant 'huge' is not supported"):
    bert.Bert("huge", rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="BERT pool 'max' is not supported"):
    bert.Bert("tiny", pool="max", rngs=nnx.Rngs(0))
  model = nnx.eval_shape(lambda: bert.Bert("tiny", max_len=8, rngs=nnx.Rngs(0)))
  ids = jnp.zeros((1, 9), jnp.int32)
  with pytest.raises(ValueError, match="sequences of 9 tokens but the model has 8 positions"):
    model.embed({"input_ids": ids})


def test_shape_overrides_build_any_published_shape_and_refuse_impossible_ones():
  """TinyBERT-General-4L-312D (hidden 312, 4 layers, 12 heads, intermediate 1,200) is no named
  variant: through the overrides it has transformers' own BertModel parameter count; a ViT's
  overrides count as the hand derivation of the ViT-B/16 test, at the new shape."""
  import transformers  # pylint: disable=g-import-not-at-top
  shape = dict(hidden_size=312, num_layers=4, num_heads=12, mlp_dim=1200)
  reference = transformers.BertModel(transformers.BertConfig(
      hidden_size=312, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1200))
  assert _count(variant="tiny", pooler=True, **shape) == reference.num_parameters()
  d, mlp, tokens, layers = 96, 200, 4 * 4 + 1, 3
  block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  model = nnx.eval_shape(lambda: vit.ViT("Ti/8", image_size=32, hidden_size=d, mlp_dim=mlp,
                                         num_layers=layers, num_heads=4, rngs=nnx.Rngs(0)))
  assert model.feature_dim == d
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == (
      (8 * 8 * 3 * d + d) + d + tokens * d + layers * block + 2 * d)
  with pytest.raises(ConfigError, match="width 100 is not divisible by 12 attention heads"):
    bert.Bert("tiny", hidden_size=100, num_heads=12, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r"config.model.mlp_dim=-1; allowed: >= 0 \(0 = the "
                                        r"variant's 512\)"):
    bert.Bert("tiny", mlp_dim=-1, rngs=nnx.Rngs(0))
