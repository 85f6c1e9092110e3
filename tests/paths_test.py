"""Paths: a leading ~ is the home directory in every path a user gives, config field or flag.

bash expands ~ only at the start of a word, so `--config.input.data_dir=~/tfds` reaches the
program as the literal "~/tfds"; TFDS does not expand it (its error then asked the user to run
the prepare command they had just run)."""

import os

import jax
import numpy as np

from mrl_jax import paths
from mrl_jax import validation
from mrl_jax.data import pipeline
from mrl_jax.evaluation import embeddings
from mrl_jax.evaluation import evaluate


def test_every_config_path_field_has_its_tilde_expanded_before_use(trained_digits, data_dir,
                                                                    tmp_path, monkeypatch):
  """HOME is a fresh directory holding links to the prepared data and a trained run; the run's
  config with every path as ~/...: validation expands each CONFIG_PATHS field, the data opens,
  and a workdir, an export folder, an embeddings folder and a report folder given as ~/... are
  the ones under HOME."""
  config, workdir = trained_digits
  config = config.copy_and_resolve_references()
  monkeypatch.setenv("HOME", str(tmp_path))
  os.symlink(data_dir, tmp_path / "tfds")
  os.symlink(workdir, tmp_path / "run")
  config.input.data_dir, config.init_from = "~/tfds", "~/run"
  config.text.vocab, config.eval.zeroshot_prompts = "~/vocab.txt", "~/prompts.json"
  validation.validate_model(config)
  assert (config.input.data_dir, config.init_from, config.text.vocab,
          config.eval.zeroshot_prompts) == tuple(str(tmp_path / n) for n in (
              "tfds", "run", "vocab.txt", "prompts.json"))
  assert list(paths.CONFIG_PATHS) == ["input.data_dir", "init_from", "text.vocab",
                                             "eval.zeroshot_prompts"]
  assert pipeline.open_source(config.input).num_examples("test") == 359
  config.input.data_dir, config.init_from = "~/tfds", None
  rows = evaluate.export_embeddings(config, "~/run", "~/emb", devices=jax.devices()[:1])
  assert rows and all((tmp_path / "emb" / name).exists() for name in rows)
  results = evaluate.evaluate_embeddings(embeddings.locate("~/emb"), (8,), "~/report",
                                         devices=jax.devices()[:1])
  assert (tmp_path / "report" / "results.json").exists() and results["num_queries"] == 359
  direct = evaluate.evaluate_embeddings(str(tmp_path / "emb"), (8,), str(tmp_path / "direct"),
                                        devices=jax.devices()[:1])
  np.testing.assert_equal(results["sizes"], direct["sizes"])
  assert paths.expand("gs://bucket/~x") == "gs://bucket/~x" and paths.expand(None) is None


def test_the_data_commands_expand_a_tilde_too(data_dir, tmp_path, monkeypatch):
  """prepare's --data_dir and the tokenizer trainer's --data_dir / --out as ~/...: written under
  HOME (os.path.abspath would have made a directory named '~' in the working directory)."""
  from mrl_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  os.makedirs(tmp_path / "home")
  assert prepare.main(["--dataset=sklearn_digits", "--data_dir=~/tfds",
                       "--formats=array_record"]) == 0
  assert (tmp_path / "home" / "tfds" / "sklearn_digits").is_dir()
  os.symlink(data_dir, tmp_path / "home" / "data")
  assert tokenizers.main(["--dataset=lee_corpus", "--data_dir=~/data", "--vocab_size=300",
                          "--out=~/sp/lee300"]) == 0
  assert (tmp_path / "home" / "sp" / "lee300.model").exists()
  assert not (tmp_path / "~").exists()
