"""Released PyTorch checkpoints: the official layout, converted, gives PyTorch's outputs.

The PyTorch side is written here from the official code's definitions (torchvision's ResNet,
FFCV's BlurPoolConv2d / apply_blurpool, MRL.py's heads and utils.py's old-checkpoint heads),
with random weights and non-trivial BatchNorm statistics, and saved as the official checkpoints
are (a state dict, with or without DDP's `module.` prefix). The converted model must give the
same features and logits of every size in eval mode (relative error < 1e-4, float32).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import convert_torch
from mrl_jax import train_lib
from mrl_jax.errors import ConfigError
from tests.conftest import REPO
from tests.conftest import build_model
from tests.conftest import digits_config
from tests.conftest import load_config


class BlurPoolConv2d(nn.Module):
  """FFCV's train_imagenet.py wrapper: a fixed [1,2,1]x[1,2,1]/16 depthwise blur, then conv."""

  def __init__(self, conv):
    super().__init__()
    default_filter = torch.tensor([[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]) / 16.0
    self.conv = conv
    self.register_buffer("blur_filter", default_filter.repeat(conv.in_channels, 1, 1, 1))

  def forward(self, x):
    blurred = F.conv2d(x, self.blur_filter, stride=1, padding=(1, 1),
                       groups=self.conv.in_channels)
    return self.conv(blurred)


def apply_blurpool(module):
  for name, child in module.named_children():
    if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
      setattr(module, name, BlurPoolConv2d(child))
    else:
      apply_blurpool(child)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet(nn.Module):
  """torchvision.models.resnet layout (v1.5) at a given base width."""

  def __init__(self, depth, width, fc, in_channels=3, small_stem=False):
    super().__init__()
    block, layers = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}[depth]
    self.small_stem = small_stem
    self.conv1 = (nn.Conv2d(in_channels, width, 3, 1, 1, bias=False) if small_stem else
                  nn.Conv2d(in_channels, width, 7, 2, 3, bias=False))
    self.bn1 = nn.BatchNorm2d(width)
    inplanes = width
    for i, n in enumerate(layers):
      planes, blocks = width * 2**i, []
      for b in range(n):
        stride = 2 if i > 0 and b == 0 else 1
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
          downsample = nn.Sequential(
              nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
              nn.BatchNorm2d(planes * block.expansion))
        blocks.append(block(inplanes, planes, stride, downsample))
        inplanes = planes * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = fc

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if not self.small_stem:
      x = F.max_pool2d(x, 3, 2, 1)
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    z = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return z, self.fc(z)


class MRLLinearLayer(nn.Module):
  """MRL.py's MRL_Linear_Layer (efficient=True: MRL-E)."""

  def __init__(self, nesting_list, num_classes, efficient):
    super().__init__()
    self.nesting_list, self.efficient = nesting_list, efficient
    if efficient:
      self.nesting_classifier_0 = nn.Linear(nesting_list[-1], num_classes)
    else:
      for i, m in enumerate(nesting_list):
        setattr(self, f"nesting_classifier_{i}", nn.Linear(m, num_classes))

  def forward(self, x):
    if self.efficient:
      w, b = self.nesting_classifier_0.weight, self.nesting_classifier_0.bias
      return tuple(x[:, :m] @ w[:, :m].t() + b for m in self.nesting_list)
    return tuple(getattr(self, f"nesting_classifier_{i}")(x[:, :m])
                 for i, m in enumerate(self.nesting_list))


class SingleHeadNestedLinear(nn.Linear):
  """utils.py's old MRL-E checkpoints: one nn.Linear named `fc`, logits of every prefix."""

  def __init__(self, nesting_list, num_classes):
    super().__init__(nesting_list[-1], num_classes)
    self.nesting_list = nesting_list

  def forward(self, x):
    return tuple(x[:, :m] @ self.weight[:, :m].t() + self.bias for m in self.nesting_list)


class FixedFeatureLayer(nn.Linear):
  """MRL.py's FF-m head: reads the first in_features of z."""

  def forward(self, x):
    return (x[:, :self.in_features] @ self.weight.t() + self.bias,)


def _torch_model(depth, width, layout, sizes, num_classes, seed=0, **kwargs):
  torch.manual_seed(seed)
  fc = {"mrl": lambda: MRLLinearLayer(sizes, num_classes, efficient=False),
        "mrle": lambda: MRLLinearLayer(sizes, num_classes, efficient=True),
        "mrle_old": lambda: SingleHeadNestedLinear(sizes, num_classes),
        "ff": lambda: FixedFeatureLayer(sizes[0], num_classes)}[layout]()
  model = TorchResNet(depth, width, fc, **kwargs)
  apply_blurpool(model)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):  # statistics far from the defaults
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


def _config(depth, layout, width=16, ff_size=64):
  head = {"mrle_old": "mrle", "ff": f"ff={ff_size}"}.get(layout, layout)
  config = load_config(f"configs/resnet50_imagenet.py:{head},runlocal")
  config.model.update(depth=depth, width=width)
  config.eval.extra_sizes = ()
  config.num_classes = 10
  config.dtype = "float32"
  return config


def _save(model, path, ddp_prefix):
  state = model.state_dict()
  if ddp_prefix:
    state = {f"module.{k}": v for k, v in state.items()}
  torch.save(state, path)


LAYOUTS = [(18, "mrl", True), (18, "mrle_old", False), (18, "ff", True), (50, "mrl", False),
           (50, "mrle", True), (50, "mrle_old", True), (50, "ff", False)]


@pytest.mark.parametrize("depth, layout, ddp_prefix", LAYOUTS,
                         ids=[f"r{d}-{l}-{'module' if p else 'plain'}" for d, l, p in LAYOUTS])
def test_converted_checkpoint_gives_pytorchs_features_and_logits(tmp_path, depth, layout,
                                                                 ddp_prefix):
  config = _config(depth, layout)
  spec, ours, abstract_params, abstract_stats = build_model(config)
  sizes = list(spec.head_sizes)
  model = _torch_model(depth, 16, layout, sizes, config.num_classes)
  path = str(tmp_path / "final_weights.pt")
  _save(model, path, ddp_prefix)
  images = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    z_ref, logits_ref = model(torch.from_numpy(images))

  params, batch_stats = convert_torch.convert(convert_torch.load_state_dict(path), config, spec,
                                              abstract_params, abstract_stats)
  z, logits = jax.jit(ours.apply)(params, batch_stats, images.transpose(0, 2, 3, 1))

  def close(got, want):
    want = want.numpy()
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()

  close(z, z_ref)
  assert sorted(logits) == sizes and len(logits_ref) == len(sizes)
  for m, want in zip(sizes, logits_ref):
    close(logits[m], want)


def test_wrong_head_missing_blurpool_and_shapes_are_one_line_errors(tmp_path):
  config = _config(18, "mrl")
  spec, _, abstract_params, abstract_stats = build_model(config)
  sizes = list(spec.head_sizes)

  def error(state_dict):
    with pytest.raises(ConfigError) as e:
      convert_torch.convert(state_dict, config, spec, abstract_params, abstract_stats,
                            source="x.pt")
    assert "\n" not in str(e.value)
    return str(e.value)

  state = {k: v.numpy() for k, v in _torch_model(18, 16, "mrl", sizes, 10).state_dict().items()}
  mrle = {k: v.numpy() for k, v in
          _torch_model(18, 16, "mrle", sizes, 10).state_dict().items()}
  message = error(mrle)
  assert "missing keys [fc.nesting_classifier_1.bias, fc.nesting_classifier_1.weight" in message
  assert "check the head (:mrl, :mrle, :ff=<m>)" in message
  plain = {k.replace(".conv.weight", ".weight"): v for k, v in state.items()
           if not k.endswith("blur_filter")}
  assert "set --config.model.blurpool=False" in error(plain)
  wide = dict(state, **{"fc.nesting_classifier_0.weight": np.zeros((12, 8), np.float32)})
  assert ("fc.nesting_classifier_0.weight has shape [12, 8] but the config needs [10, 8]"
          in error(wide))
  extra = dict(state, **{"fc.extra.weight": np.zeros(3, np.float32)})
  assert "unknown keys [fc.extra.weight]" in error(extra)


def test_full_width_resnet50_mrl_converts_with_the_published_shapes(tmp_path):
  """The released checkpoints' architecture (width 64, 2048-d, 1000 classes, BlurPool)."""
  config = _config(50, "mrl", width=64)
  config.num_classes = 1000
  spec, _, abstract_params, abstract_stats = build_model(config)
  sizes = list(spec.head_sizes)
  assert sizes == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
  model = _torch_model(50, 64, "mrl", sizes, 1000)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sum(v.size for k, v in state.items() if not k.endswith(
      ("running_mean", "running_var", "num_batches_tracked", "blur_filter"))) == (
          25_557_032 - 2_049_000 + (sum(sizes) + len(sizes)) * 1000)
  params, _ = convert_torch.convert(state, config, spec, abstract_params, abstract_stats)
  np.testing.assert_array_equal(params["heads"]["head_2048"]["kernel"],
                                state["fc.nesting_classifier_8.weight"].T)
  np.testing.assert_array_equal(params["encoder"]["blocks"][3]["shortcut"]["conv"]["kernel"],
                                state["layer2.0.downsample.0.conv.weight"].transpose(2, 3, 1, 0))


@pytest.mark.slow
def test_convert_cli_then_eval_and_finetune_from_it(data_dir, tmp_path):
  """convert_torch on a digits-sized official-layout ResNet-18, then eval.py's head accuracy
  equals PyTorch's on the same images; fine-tuning with config.init_from starts from it and
  resumes from its own checkpoints afterwards."""
  config = digits_config(data_dir, 2, "runlocal", **{"model.width": 8, "model.blurpool": True})
  sizes = list(build_model(config)[0].head_sizes)
  model = _torch_model(18, 8, "mrl", sizes, 10, in_channels=1, small_stem=True)
  pt = str(tmp_path / "official.pt")
  _save(model, pt, ddp_prefix=True)
  converted = str(tmp_path / "converted")
  done = subprocess.run(
      [sys.executable, "-m", "mrl_jax.convert_torch", f"--checkpoint={pt}",
       "--config=configs/digits_resnet_mrl.py:runlocal", f"--workdir={converted}",
       "--config.model.width=8", "--config.model.blurpool=True",
       f"--config.input.data_dir={data_dir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.path.isdir(os.path.join(converted, "checkpoints", "0"))

  from mrl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from mrl_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  from mrl_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  source = pipeline.open_source(config.input)
  batches = list(pipeline.make_reader(config.input, source).eval_batches(
      "test", local_batch=359, num_batches=1, process_index=0, process_count=1,
      preprocess=preprocess.from_config(config.input, train=False, channels=1)))
  from mrl_jax.models import pixels  # pylint: disable=import-outside-toplevel
  mean, std = pixels.stats(config.input, 1)  # the batches are uint8; the model normalises
  images = ((batches[0]["image"] - np.float32(mean)) / np.float32(std)).astype(np.float32)
  with torch.no_grad():
    _, logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  want = {m: float(np.mean(l.numpy().argmax(-1) == batches[0]["label"]))
          for m, l in zip(sizes, logits)}
  config.eval.update(knn=False, adaptive_retrieval=False, adaptive_classification=False,
                     baselines=(), fewshot_shots=())
  results = evaluate.evaluate_checkpoint(config, converted, devices=jax.devices()[:1])
  got = {m: results["sklearn_digits"]["sizes"][str(m)]["linear_top1"] for m in sizes}
  assert got == pytest.approx(want, abs=1e-9)

  # Fine-tune from it (lr 0: the encoder stays the converted one) and resume.
  tune = str(tmp_path / "tune")
  cfg = digits_config(data_dir, 3, "runlocal", **{
      "model.width": 8, "model.blurpool": True, "init_from": converted,
      "init_from_heads": False, "schedule.name": "constant", "schedule.base_lr": 0.0,
      "schedule.warmup_epochs": 0.0, "checkpoint_every_steps": 3})
  train_lib.train_and_evaluate(cfg, tune, devices=jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(os.path.join(tune, "checkpoints"), every_steps=1, keep=3)
  tuned, _ = ckpt.read(3)
  ckpt.close()
  stem = model.state_dict()["conv1.weight"].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(tuned["params"]["encoder"]["stem"]["conv"]["kernel"], stem)
  head = tuned["params"]["heads"][f"head_{sizes[0]}"]["kernel"]
  assert not np.allclose(head, model.state_dict()["fc.nesting_classifier_0.weight"].numpy().T)
  cfg.total_steps = 5
  summary = train_lib.train_and_evaluate(cfg, tune, devices=jax.devices()[:1])
  assert summary["final_step"] == 5
