"""Our ResNet + Matryoshka heads <-> the official PyTorch layout, parameter by parameter.

The official MRL code (github.com/RAIVNLab/MRL) trains torchvision's `resnet50()` with
`MRL.py`'s heads as `model.fc`, and FFCV's `apply_blurpool` wrapping every strided conv with at
least 16 input channels as `BlurPoolConv2d` (its conv becomes `<name>.conv`, plus a constant
`<name>.blur_filter` buffer). This module is the one table between the two layouts; the
checkpoint converter (`convert_torch.py`) and the official weight-decay rule ("no decay for
parameters whose name contains `bn`", `train/train_imagenet.py`) both read it.

Heads, by `config.mrl.head`:
- mrl: `fc.nesting_classifier_{i}.weight` [C, m_i] and `.bias` (MRL_Linear_Layer; also the old
  checkpoints' MultiHeadNestedLinear);
- mrle: `fc.nesting_classifier_0.weight` [C, d] and one `.bias` (MRL_Linear_Layer(efficient=
  True)); old checkpoints: `fc.weight` / `fc.bias` (SingleHeadNestedLinear);
- ff: `fc.weight` [C, m] and `fc.bias` (FixedFeatureLayer).
"""

import dataclasses

import numpy as np

from mrl_jax.models import resnet

# BatchNorm: torch name -> (our collection, our leaf).
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: where it lives in our state and under which torch key, and how to convert."""
  collection: str  # "params" | "batch_stats"
  path: tuple  # path inside that collection, e.g. ("encoder", "stem", "conv", "kernel")
  torch_key: str
  kind: str  # "conv" (OIHW <-> HWIO), "linear" (transpose), "vector" (as is)

  def to_ours(self, value: np.ndarray) -> np.ndarray:
    if self.kind == "conv":
      return np.transpose(value, (2, 3, 1, 0))
    return np.transpose(value) if self.kind == "linear" else value

  def torch_shape(self, our_shape: tuple) -> tuple:
    if self.kind == "conv":
      h, w, i, o = our_shape
      return (o, i, h, w)
    return tuple(reversed(our_shape)) if self.kind == "linear" else tuple(our_shape)


def _conv_bn(path: tuple, conv_name: str, bn_name: str, blurred: bool) -> list[Entry]:
  conv_key = f"{conv_name}.conv.weight" if blurred else f"{conv_name}.weight"
  out = [Entry("params", ("encoder", *path, "conv", "kernel"), conv_key, "conv")]
  for torch_leaf, (collection, leaf) in _BN.items():
    out.append(Entry(collection, ("encoder", *path, "bn", leaf), f"{bn_name}.{torch_leaf}",
                     "vector"))
  return out


def encoder_entries(encoder: resnet.ResNet) -> list[Entry]:
  """Every encoder tensor of a (possibly abstract) ResNet, in torchvision's names."""
  out = _conv_bn(("stem",), "conv1", "bn1", encoder.stem.blur)
  stage_sizes, _ = resnet.DEPTHS[encoder.depth]
  j = 0
  for stage, num_blocks in enumerate(stage_sizes):
    for b in range(num_blocks):
      block = encoder.blocks[j]
      prefix = f"layer{stage + 1}.{b}"
      for k in (1, 2, 3):
        conv = getattr(block, f"conv{k}", None)
        if conv is not None:
          out += _conv_bn(("blocks", j, f"conv{k}"), f"{prefix}.conv{k}", f"{prefix}.bn{k}",
                          conv.blur)
      if block.shortcut is not None:
        out += _conv_bn(("blocks", j, "shortcut"), f"{prefix}.downsample.0",
                        f"{prefix}.downsample.1", block.shortcut.blur)
      j += 1
  return out


def blur_filter_keys(encoder: resnet.ResNet) -> list[str]:
  """The `<name>.blur_filter` buffers the official BlurPool wrapping adds (constants)."""
  return [e.torch_key[:-len(".conv.weight")] + ".blur_filter"
          for e in encoder_entries(encoder) if e.torch_key.endswith(".conv.weight")]


def head_entries(head: str, sizes: tuple[int, ...], *, old_mrle: bool = False) -> list[Entry]:
  """The heads' tensors in the official names (module docstring)."""
  if head == "mrle":
    name = "fc" if old_mrle else "fc.nesting_classifier_0"
    return [Entry("params", ("heads", "tied", "kernel"), f"{name}.weight", "linear"),
            Entry("params", ("heads", "tied", "bias"), f"{name}.bias", "vector")]
  if head == "ff":
    (m,) = sizes
    return [Entry("params", ("heads", f"head_{m}", "kernel"), "fc.weight", "linear"),
            Entry("params", ("heads", f"head_{m}", "bias"), "fc.bias", "vector")]
  out = []
  for i, m in enumerate(sizes):
    out += [Entry("params", ("heads", f"head_{m}", "kernel"), f"fc.nesting_classifier_{i}.weight",
                  "linear"),
            Entry("params", ("heads", f"head_{m}", "bias"), f"fc.nesting_classifier_{i}.bias",
                  "vector")]
  return out


def param_names(encoder: resnet.ResNet, head: str, sizes: tuple[int, ...]) -> dict[tuple, str]:
  """{path in our params: official torch name} of every parameter."""
  return {e.path: e.torch_key for e in encoder_entries(encoder) + head_entries(head, sizes)
          if e.collection == "params"}
