r"""Converts a released PyTorch MRL / MRL-E / FF ResNet checkpoint into this project's checkpoint.

  python -m mrl_jax.convert_torch --checkpoint=r50_mrl1_e0_ff2048.pt \
      --config=configs/resnet50_imagenet.py:mrl,dtype=float32 --workdir=runs/r50_mrl_official
  python eval.py --config=configs/resnet50_imagenet.py:mrl,dtype=float32 \
      --workdir=runs/r50_mrl_official

The official checkpoints (github.com/RAIVNLab/MRL, "Our model checkpoints") are state dicts of
torchvision's ResNet-50 saved through DDP (`module.` prefix), with FFCV's BlurPool wrappers and
the Matryoshka heads as `fc` (layouts: mrl_jax/models/torchvision_layout.py). The config decides
the head (`:mrl`, `:mrle`, `:ff=<m>`) and the architecture (BlurPool on in the paper recipe).
Every tensor is checked against the config's model first; missing, unknown or mis-shaped keys
are one line naming them. The result is a step-0 checkpoint (BatchNorm running statistics
included, a fresh optimizer state) in `<workdir>/checkpoints` plus `<workdir>/config.json`: what
eval.py evaluates, train.py fine-tunes from (or `config.init_from` points at).

PyTorch is needed only here (the `convert` extra: `pip install torch`).
"""

import sys

import numpy as np
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from mrl_jax import cli
from mrl_jax import models
from mrl_jax import paths
from mrl_jax import state as state_lib
from mrl_jax import validation
from mrl_jax.errors import ConfigError
from mrl_jax.models import torchvision_layout

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def load_state_dict(path) -> dict[str, np.ndarray]:
  """{key: float32 array} of a .pt state dict, without the DDP `module.` prefix."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("converting PyTorch checkpoints needs torch: pip install torch") from None
  with paths.path(path).open("rb") as f:
    loaded = torch.load(f, map_location="cpu", weights_only=True)
  loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
  out = {}
  for key, value in loaded.items():
    key = key[len("module."):] if key.startswith("module.") else key
    out[key] = value.detach().to(torch.float32).numpy() if value.is_floating_point() else (
        value.numpy())
  return out


def _list(keys, limit=6) -> str:
  keys = sorted(keys)
  more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
  return "[" + ", ".join(keys[:limit]) + "]" + more


def convert(state_dict: dict[str, np.ndarray], config, spec, abstract_params,
            abstract_batch_stats, source: str = "the checkpoint"):
  """(params, batch_stats): the abstract trees with every leaf a converted numpy array."""
  encoder = nnx.eval_shape(lambda: models.create_model(config, spec, nnx.Rngs(0))).encoder
  old_mrle = spec.head == "mrle" and "fc.weight" in state_dict
  entries = (torchvision_layout.encoder_entries(encoder)
             + torchvision_layout.head_entries(spec.head, spec.head_sizes, old_mrle=old_mrle))
  blur_keys = set(torchvision_layout.blur_filter_keys(encoder))
  expected = {e.torch_key for e in entries} | blur_keys
  given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
  missing, unknown = expected - given, given - expected
  if missing or unknown:
    hint = ""
    if any(k.endswith(".conv.weight") for k in missing) and not any(
        k.endswith(".blur_filter") for k in given):
      hint = "; the checkpoint has no BlurPool: set --config.model.blurpool=False"
    elif any(k.startswith("fc.") for k in missing | unknown):
      hint = ("; check the head (:mrl, :mrle, :ff=<m>), config.mrl.nesting and "
              "config.num_classes")
    raise ConfigError(f"{source} does not match the config: missing keys {_list(missing)}, "
                      f"unknown keys {_list(unknown)}{hint}")
  blur = np.broadcast_to(np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0, (1, 1, 3, 3))
  for key in sorted(blur_keys):
    value = state_dict[key]
    if value.shape[1:] != (1, 3, 3) or not np.allclose(value, blur):
      raise ConfigError(f"{source}: {key} is not the BlurPool filter [1,2,1]x[1,2,1]/16")
  abstract = {"params": state_lib.flat_paths(abstract_params),
              "batch_stats": state_lib.flat_paths(abstract_batch_stats)}
  out = {"params": {}, "batch_stats": {}}
  for e in entries:
    want = abstract[e.collection][e.path].shape
    value = state_dict[e.torch_key]
    if tuple(value.shape) != e.torch_shape(want):
      raise ConfigError(f"{source}: {e.torch_key} has shape {list(value.shape)} but the config "
                        f"needs {list(e.torch_shape(want))}")
    out[e.collection][e.path] = np.ascontiguousarray(e.to_ours(value), np.float32)
  return (state_lib.fill_paths(abstract_params, out["params"]),
          state_lib.fill_paths(abstract_batch_stats, out["batch_stats"]))


def convert_checkpoint(checkpoint, config, workdir) -> int:
  """Writes the converted step-0 checkpoint and config.json into workdir; returns the step."""
  spec = validation.validate_model(config)
  if spec.model_name != "resnet":
    raise ConfigError("released PyTorch MRL checkpoints are ResNets; config.model_name="
                      f"{spec.model_name!r}")
  state_lib.check_new_checkpoints(workdir)
  state_dict = load_state_dict(checkpoint)
  _, abstract_params, abstract_batch_stats = state_lib.build_model(config, spec)
  params, batch_stats = convert(state_dict, config, spec, abstract_params,
                                abstract_batch_stats, source=str(checkpoint))
  state_lib.save_converted(config, spec, params, batch_stats, workdir, str(checkpoint))
  return 0


FLAGS = flags.FLAGS


def main(argv):
  del argv

  def run():
    convert_checkpoint(FLAGS.checkpoint, FLAGS.config, FLAGS.workdir)
    print(f"converted {FLAGS.checkpoint} -> {paths.join(FLAGS.workdir, 'checkpoints')} "
          "(step 0)")

  return cli.run(run, verbose=FLAGS.verbose)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "The PyTorch .pt state dict.")
  flags.DEFINE_string("workdir", None, "Where to write the converted checkpoint.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for config errors.")
  flags.mark_flags_as_required(["config", "checkpoint", "workdir"])
  sys.exit(app.run(main, flags_parser=cli.parse_flags))
