"""Saved features for embeddings-only mode: this project's layout and the official dumps.

Two ways to name the files of the database and the queries:
- a folder with `database_X.npy`, `database_y.npy`, `queries_X.npy`, `queries_y.npy` (what
  `eval.py --export_embeddings` writes);
- a prefix per part, `--database=P --queries=Q` reading `P-X.npy`/`P-y.npy`, as the official
  PyTorch code saves them (`inference/pytorch_inference.py --retrieval` writes e.g.
  `1K_train_mrl1_e0_ffNone-X.npy`, features float16/float32, and `...-y.npy`, labels float
  `[n, 1]`).

Features are memory-mapped (local files), so nothing reads more than the columns and rows a
search asks for: a database larger than RAM streams through `knn.ExactSearch(chunk_rows=...)`
and the rerank gathers only candidate rows. Labels are read whole and become int64: float
labels of shape [n] or [n, 1] are accepted when every value is an integer.
"""

import dataclasses

import numpy as np

from mrl_jax import paths
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import extract

PARTS = ("database", "queries")
FOLDER_FILES = tuple(f"{part}_{kind}.npy" for part in PARTS for kind in "Xy")

# Rows checked for NaN/inf at once (a bounded slice of a memory-mapped file).
_CHECK_ROWS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Location:
  """Where the features and labels of each part are: {part: (X path, y path)}."""
  files: dict[str, tuple[str, str]]
  name: str  # for results.json's "dataset"


def locate(directory: str | None = None, *, database: str | None = None,
           queries: str | None = None) -> Location:
  """A folder (this project's layout), or a prefix for each part (the official `-X`/`-y`)."""
  if directory and (database or queries):
    raise ConfigError("give --embeddings=DIR or --database=PREFIX --queries=PREFIX, not both")
  if directory:
    return Location({part: (paths.join(directory, f"{part}_X.npy"),
                            paths.join(directory, f"{part}_y.npy")) for part in PARTS},
                    name=str(paths.path(directory)))
  if not (database and queries):
    raise ConfigError("embeddings-only mode needs --embeddings=DIR, or both --database=PREFIX "
                      "and --queries=PREFIX (reading PREFIX-X.npy and PREFIX-y.npy)")
  prefixes = {"database": database, "queries": queries}
  return Location({part: (f"{p}-X.npy", f"{p}-y.npy") for part, p in prefixes.items()},
                  name=str(database))


def _labels(y: np.ndarray, where: str) -> np.ndarray:
  """int64 [n] from integer labels [n] or float labels [n] / [n, 1] with integral values."""
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise ConfigError(f"{where} has shape {y.shape}; allowed: [N] or [N, 1] class labels")
  if np.issubdtype(y.dtype, np.floating):
    bad = ~np.isfinite(y) | (y != np.round(y))
    if bad.any():
      i = int(np.argmax(bad))
      raise ConfigError(f"{where} has a non-integral label {float(y[i])} (row {i}); float labels "
                        "must hold class ids")
  elif not np.issubdtype(y.dtype, np.integer):
    raise ConfigError(f"{where} has dtype {y.dtype}; labels must be integer class ids")
  if len(y) and y.min() < 0:
    raise ConfigError(f"{where} has a negative label {int(y.min())}; allowed: >= 0")
  return y.astype(np.int64)


def _check_finite(x: np.ndarray, columns: int, where: str) -> None:
  """NaN/inf anywhere in the first `columns` columns, read in bounded slices."""
  for r0 in range(0, len(x), _CHECK_ROWS):
    finite = np.isfinite(x[r0:r0 + _CHECK_ROWS, :columns])
    if not finite.all():
      row = r0 + int(np.argwhere(~finite)[0][0])
      raise ConfigError(f"{where} has a NaN/inf value (first in row {row}); features must be "
                        "finite")


def load(location: Location, max_size: int | None = None) -> dict[str, extract.Features]:
  """{part: Features(z memory-mapped as stored, labels int64)}, validated with one-line errors;
  NaN/inf are looked for in the first `max_size` columns (the ones any size reads)."""
  out = {}
  for part, (x_path, y_path) in location.files.items():
    arrays = []
    for p in (x_path, y_path):
      if not paths.path(p).exists():
        raise ConfigError(f"missing {p}; embeddings-only mode reads {part} features and labels "
                          f"from {x_path} and {y_path}")
      try:
        arrays.append(paths.load_npy(p, mmap=p == x_path))
      except ValueError as e:
        raise ConfigError(f"{p} is not a plain numeric .npy array ({e})") from None
    x, y = arrays
    x_name, y_name = paths.path(x_path).name, paths.path(y_path).name
    if x.ndim != 2:
      raise ConfigError(f"{x_name} has shape {x.shape}; allowed: [N, d]")
    if not np.issubdtype(x.dtype, np.floating):
      raise ConfigError(f"{x_name} has dtype {x.dtype}; features must be floating point")
    y = _labels(y, y_name)
    if len(x) != len(y):
      raise ConfigError(f"{x_name} has {len(x)} rows but {y_name} has {len(y)} labels; they "
                        "must match")
    _check_finite(x, max_size or x.shape[1], x_name)
    out[part] = extract.Features(x, y)
  d_db, d_q = (out[part].z.shape[1] for part in PARTS)
  if d_db != d_q:
    names = [paths.path(location.files[part][0]).name for part in PARTS]
    raise ConfigError(f"{names[0]} has d={d_db} but {names[1]} has d={d_q}; they must match")
  return out
