"""What train.py and eval.py share around their work: process setup and error reporting.

User mistakes (ConfigError) print one line and exit with code 2, with no traceback unless
--verbose; a non-finite loss exits with code 3; anything else is a bug and keeps its traceback.
"""

import os
import sys
import traceback

# Quieter TF/XLA start-up logs; must be set before tensorflow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3


def run(fn, *, verbose: bool = False) -> int:
  """Runs fn() and maps known failures to one line and an exit code."""
  from mrl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from mrl_jax.train_lib import NonFiniteError  # pylint: disable=g-import-not-at-top
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
