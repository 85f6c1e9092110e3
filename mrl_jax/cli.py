"""What train.py and eval.py share around their work: flags, process setup, error reporting.

User mistakes (ConfigError) print one line and exit with code 2, with no traceback unless
--verbose; a non-finite loss exits with code 3, an unreadable or unwritable checkpoint with 4;
anything else is a bug and keeps its traceback. This module imports neither JAX nor TF, so
--help and flag errors stay fast.
"""

import os
import re
import sys
import traceback

from absl import flags
from absl import logging

from mrl_jax.errors import CheckpointError
from mrl_jax.errors import ConfigError
from mrl_jax.errors import NonFiniteError

# Quieter TF/XLA start-up logs; must be set before tensorflow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TF only preprocesses images here; its oneDNN custom ops would make pixel values depend on the
# host CPU's instruction set (and print an INFO line that TF_CPP_MIN_LOG_LEVEL does not hide).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4


def define_run_flags() -> None:
  """The flags train.py and eval.py share: tracebacks, and the multi-process start."""
  flags.DEFINE_bool("verbose", False, "Show tracebacks for config errors.")
  flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
  flags.DEFINE_string("local_device_ids", None, "Multi-host: comma-separated local GPU ids "
                      "this process drives (default: decided from the launcher, "
                      "docs/scaling.md).")


def start_processes() -> None:
  """distributed.start with the flags of define_run_flags."""
  from mrl_jax import distributed  # pylint: disable=g-import-not-at-top  (imports jax)
  f = flags.FLAGS
  distributed.start(f.coordinator_address, f.num_processes, f.process_id, f.local_device_ids)


def ints(values, flag: str) -> tuple[int, ...]:
  """A list flag's values as integers >= 1 (one-line error otherwise)."""
  out = []
  for v in values or ():
    try:
      out.append(int(v))
    except ValueError:
      raise ConfigError(f"--{flag}={','.join(values)} is not a list of integers") from None
    if out[-1] < 1:
      raise ConfigError(f"--{flag} has {v}; allowed: integers >= 1")
  return tuple(out)


def run(fn, *, verbose: bool = False) -> int:
  """Runs fn() and maps known failures to one line and an exit code.

  The console shows our progress lines and warnings; absl INFO logs (jax backend probing, clu's
  per-step records) only with --verbosity=0 (the records are in TensorBoard and metrics.jsonl).
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Kept after fn returns: orbax's threads may still raise while the interpreter shuts down.
  sys.unraisablehook = _unraisable(sys.unraisablehook)
  try:
    return fn() or 0
  except ConfigError as e:
    if verbose:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_CONFIG_ERROR
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_NONFINITE
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_CHECKPOINT


def _unraisable(previous):
  """sys.unraisablehook minus the "Event loop is closed" errors TensorStore's write callbacks
  raise into orbax's event loop after a failed save (printed as bare tracebacks, dozens of
  them): the failure itself is reported as one CheckpointError line. Others are printed."""
  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)
  return hook


def _one_line(error: BaseException) -> str:
  """The informative last line of an error whose text may embed a traceback."""
  text = str(error).replace("\\n", "\n")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
  return " ".join(" ".join(lines).split())


def parse_flags(argv):
  """absl flags parser for app.run: a bad flag, config file, config arg or override (e.g. a
  typo under lock_config) is one line and exit code 2, not a usage dump or a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # a config file that failed to load raises only when used
    return remaining
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    message = _one_line(e)
    if isinstance(e, (AttributeError, KeyError)):
      overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
      suggestion = re.search(r'Did you mean "([^"]+)"', message)
      message = (f"unknown config field in {', '.join(overrides) or 'an override'}"
                 + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else "")
                 + "; only fields that exist in the config can be set")
    elif isinstance(e, OSError) and "No such file" in message:
      path = next((a.split("=", 1)[1].split(":")[0] for a in argv if a.startswith("--config=")),
                  "?")
      message = f"config file {path} not found (--config)"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)
