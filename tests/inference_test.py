"""The inference API: load a workdir, embed texts or images at any size and precision."""

import jax
import numpy as np
import pytest

from mrl_jax import inference
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax import validation
from mrl_jax.data import builtin
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import evaluate
from mrl_jax.evaluation import metrics
from mrl_jax.evaluation import quantize
from mrl_jax.evaluation import text as text_eval
from tests.conftest import load_config


@pytest.fixture(scope="module")
def text_run(data_dir, tmp_path_factory):
  for name in ("wiki_passages", "lee_similarity"):
    builtin.prepare(name, data_dir)
  config = load_config("configs/text_wiki.py:contrastive,runlocal")
  config.input.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp("text_run"))
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return config, workdir


def test_embed_truncates_renormalises_and_quantises(text_run):
  config, workdir = text_run
  model = inference.load(workdir, devices=jax.devices()[:2])  # config from config.json
  assert model.config.text.features == config.text.features  # tuples restored
  texts = ["the first text", "a second, longer text about something else", "third"]
  z = model.encode(texts)
  assert z.shape == (3, 128)
  for m in (8, 32, 128):
    e = model.embed(texts, dim=m)
    want = z[:, :m] / np.linalg.norm(z[:, :m], axis=1, keepdims=True)
    np.testing.assert_allclose(e, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)
  # int8: ranges from the calibration inputs (or given); one text is quantised as it is in a
  # batch (it used to get ranges of its own: every code -128).
  calibration = texts + ["more text to calibrate on", "and a fifth"]
  ranges = quantize.int8_ranges(model.embed(calibration, dim=32))
  np.testing.assert_array_equal(
      model.embed(texts, dim=32, quantize="int8", calibration=calibration),
      quantize.quantize(model.embed(texts, dim=32), "int8", ranges))
  one = model.embed(texts[:1], dim=32, quantize="int8", ranges=ranges)
  np.testing.assert_array_equal(one, quantize.quantize(model.embed(texts, dim=32), "int8",
                                                       ranges)[:1])
  assert len(np.unique(one)) > 10
  with pytest.raises(ConfigError, match="quantize='int8' needs calibration: pass calibration="):
    model.embed(texts[:1], dim=32, quantize="int8")
  with pytest.raises(ConfigError, match=r"int8 ranges of shape \[2, 32\] for size-16 "):
    model.embed(texts, dim=16, quantize="int8", ranges=ranges)
  with pytest.raises(ConfigError, match=r"int8 ranges from 1 embedding\(s\)"):
    model.embed(texts, dim=16, quantize="int8", calibration=["only one"])
  # No inputs: an empty array of the stored shape.
  for kind, dtype, width in ((None, np.float32, 12), ("int8", np.int8, 12),
                             ("binary", np.uint8, 2)):
    empty = model.embed([], dim=12, quantize=kind, ranges=ranges[:, :12])
    assert empty.shape == (0, width) and empty.dtype == dtype
  bits = model.embed(texts, dim=32, quantize="binary")
  assert bits.dtype == np.uint8 and bits.shape == (3, 4)
  np.testing.assert_array_equal(np.unpackbits(bits, axis=1), (z[:, :32] > 0).astype(np.uint8))
  # One text or batch boundaries do not change a row (the last batch is padded).
  np.testing.assert_allclose(model.embed("third"), model.embed(texts)[2:], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ConfigError, match=r"dim=129 is outside \[1, 128\]"):
    model.embed(texts, dim=129)
  with pytest.raises(ConfigError, match="quantize='fp8'"):
    model.embed(texts, quantize="fp8")
  # A blank text is [CLS] [SEP], as sentence-transformers embeds it (compared with it on
  # all-MiniLM-L6-v2 in convert_hf_test): "" and whitespace alike.
  blank = model.embed(["fine", "", "   "])
  np.testing.assert_array_equal(blank[1], blank[2])
  assert np.isfinite(blank).all() and not np.allclose(blank[0], blank[1])


def test_eval_spearman_is_the_embeddings_of_the_api(text_run):
  """eval.py's Spearman at size m equals Spearman(cos(embed(a, m), embed(b, m)), ratings) with
  the public API's embeddings and scipy-free numpy (metrics.spearman is checked against scipy)."""
  config, workdir = text_run
  results = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])
  model = inference.load(workdir, devices=jax.devices()[:1])
  data = text_eval.read_split(config.input, "lee_similarity", "test",
                              ("text_a", "text_b", "score"))
  for m in (8, 128):
    cos = np.sum(model.embed(data["text_a"], dim=m) * model.embed(data["text_b"], dim=m), 1)
    # float32 cosines of 1,225 pairs: a near-tie may swap ranks (measured 5e-6 apart)
    assert results["lee_similarity"]["sizes"][str(m)]["spearman"] == pytest.approx(
        metrics.spearman(cos, np.asarray(data["score"])), abs=1e-4)
  assert results["lee_similarity"]["sizes"]["32"]["bytes_per_vector_binary"] == 4
  assert results["lee_similarity"]["quantize"] == list(config.eval.quantize) == ["int8", "binary"]


def test_image_models_embed_images(trained_digits):
  """The same API on an image model: uint8 images through the eval preprocessing, z equal to
  the model applied to the eval pipeline's images."""
  config, workdir = trained_digits
  model = inference.load(workdir, config=config, devices=jax.devices()[:1])
  source = pipeline.open_source(config.input)
  pp = preprocess.from_config(config.input, train=False, channels=1)
  batch = next(iter(pipeline.make_reader(config.input, source).eval_batches(
      "test", local_batch=16, num_batches=1, preprocess=pp, process_index=0, process_count=1)))
  spec = validation.validate(config, 1, 1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  net, params, stats, _ = state_lib.restore(config, spec, workdir, mesh)
  want = np.asarray(net.apply(params, stats, batch["image"])[0])
  raw = [source.builder("array_record").as_data_source("test")[i]["image"] for i in range(16)]
  np.testing.assert_allclose(model.encode(np.stack(raw)), want, rtol=1e-4, atol=1e-4)
  assert model.embed(np.stack(raw), dim=8).shape == (16, 8)
