"""Every exception this project raises on purpose, and the exit code each maps to (cli.py).

- `ConfigError` (exit 2): a user mistake found before work starts (config fields, nesting sizes,
  dataset names, mesh shapes, saved arrays): one line naming the field, the bad value and what
  is allowed. `DataError`, one of them: the dataset's files themselves are unusable.
- `NonFiniteError` (exit 3): a step produced a non-finite loss or gradient and
  config.on_nonfinite='stop'; the last good checkpoint is kept.
- `CheckpointError` (exit 4): no checkpoint of the run can be read, or one cannot be written
  (disk full, permission, quota): one line naming the step, the path and the cause.
Everything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A user-facing, one-line error: field, bad value, what is allowed."""


class DataError(ConfigError):
  """The dataset's files are unusable (e.g. no image of a batch decodes); one line."""


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient stopped the run (config.on_nonfinite='stop')."""


class CheckpointError(RuntimeError):
  """A checkpoint cannot be read or written; one line: step, path, cause."""
