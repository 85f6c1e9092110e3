"""The one exception type for user mistakes.

Everything a user can get wrong before training starts (config fields, nesting sizes, dataset
names, mesh shapes, saved arrays) raises `ConfigError` with a one-line message naming the field,
the bad value and what is allowed. `train.py`/`eval.py` print it and exit with code 2 without a
traceback; everything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A user-facing, one-line error: field, bad value, what is allowed."""
