"""Nesting sizes M: the prefixes z[:m] that MRL trains to be representations on their own.

Paper Sec. 3: M has O(log d) sizes, by default halving from the feature dim down to a minimum
(ResNet-50: 8, 16, ..., 2048). Explicit lists are allowed because the paper's ViT-B/16 sizes
(12, 24, ..., 768) and interpolated evaluation sizes are not all powers of two.
"""

from collections.abc import Sequence

from mrl_jax.errors import ConfigError

Spec = str | int | Sequence[int]


def halving(feature_dim: int, min_size: int,
            field: str = "config.mrl.nesting") -> tuple[int, ...]:
  """Sizes feature_dim, feature_dim // 2, ... down to min_size, ascending.

  Example: halving(2048, 8) == (8, 16, ..., 2048); halving(768, 12) == (12, 24, ..., 768).
  """
  if not 1 <= min_size <= feature_dim:
    raise ConfigError(f"nesting minimum size {min_size} is outside [1, {feature_dim}] "
                      f"({field}); allowed: 1 <= min <= feature_dim {feature_dim}")
  sizes = []
  m = feature_dim
  while m >= min_size:
    sizes.append(m)
    m //= 2
  return tuple(reversed(sizes))


def parse(spec: Spec, feature_dim: int, field: str = "config.mrl.nesting") -> tuple[int, ...]:
  """Nesting sizes from a config value, validated against feature_dim.

  Accepted forms: "halving:8" (halve from feature_dim to 8), "8,16,32" or a sequence of ints
  (explicit), "full" (just feature_dim, i.e. a standard model).
  """
  if isinstance(spec, str):
    text = spec.strip()
    if text.startswith("halving:"):
      try:
        min_size = int(text.split(":", 1)[1])
      except ValueError:
        raise ConfigError(f"{field}={spec!r}: 'halving:' must be followed by an integer "
                          "minimum size, e.g. 'halving:8'") from None
      return halving(feature_dim, min_size, field)
    if text == "full":
      return (feature_dim,)
    try:
      sizes = [int(s) for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
    except ValueError:
      raise ConfigError(f"{field}={spec!r} is not 'halving:<min>', 'full' or a comma-separated "
                        "list of integers") from None
  elif isinstance(spec, int):
    sizes = [spec]
  else:
    sizes = list(spec)
  return validate(sizes, feature_dim, field)


def validate(sizes: Sequence[int], feature_dim: int,
             field: str = "config.mrl.nesting") -> tuple[int, ...]:
  """Returns sizes as a tuple or raises a one-line ConfigError for the first bad one."""
  if not sizes:
    raise ConfigError(f"{field} is empty; give at least one size in [1, {feature_dim}]")
  for i, m in enumerate(sizes):
    if isinstance(m, bool) or not isinstance(m, int) and not float(m).is_integer():
      raise ConfigError(f"nesting size {m!r} is not an integer ({field}); "
                        f"allowed: integers in [1, {feature_dim}]")
    m = int(m)
    if m < 1:
      raise ConfigError(f"nesting size {m} is below 1 ({field}); allowed: 1 <= m <= {feature_dim}")
    if m > feature_dim:
      raise ConfigError(f"nesting size {m} exceeds feature_dim {feature_dim} ({field}); "
                        f"allowed: 1 <= m <= {feature_dim}")
    if i and m == sizes[i - 1]:
      raise ConfigError(f"nesting size {m} appears twice ({field}); sizes must be unique")
    if i and m < sizes[i - 1]:
      raise ConfigError(f"nesting size {m} follows {sizes[i - 1]} ({field}); "
                        "sizes must be sorted ascending")
  return tuple(int(m) for m in sizes)


def split_at(values, feature_dim: int, field: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(sizes <= feature_dim, sizes above it) of a config list of eval sizes; anything but an
  integer >= 1 is a one-line error."""
  for m in tuple(values):
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
      raise ConfigError(f"{field} has {m!r}; allowed: integers in [1, {feature_dim}]")
  return (tuple(m for m in values if m <= feature_dim),
          tuple(m for m in values if m > feature_dim))
