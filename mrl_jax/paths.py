"""The one path abstraction: every file this project reads or writes goes through here.

Workdirs, checkpoints, reports, saved features and embeddings-only inputs may be local paths or
remote URLs (`gs://bucket/run`, `s3://...`): `etils.epath`, the path layer that orbax and TFDS
already use, gives both one API. Remote URLs pass through unchanged (`os.path.abspath` would
turn `gs://b/run` into `<cwd>/gs:/b/run` on each host's local disk); local paths are made
absolute, as orbax requires.

Object stores differ from a POSIX disk in two ways that matter here, so the helpers below do
what is safe on both:
- `write_text`/`write_bytes`: locally a temporary file renamed into place (a crash never leaves
  half a JSON file); remotely one object upload, which is already all-or-nothing.
- `append_text`: locally an append; remotely the object is read and rewritten, because GCS
  objects cannot be appended to (fsspec's gcsfs turns mode 'a' into a silent overwrite).
"""

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for URLs with a scheme (gs://, s3://, ...), False for local paths."""
  return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """An epath.Path: remote URLs unchanged, local paths absolute (~ expanded)."""
  text = os.fspath(p)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def expand(p: str | None) -> str | None:
  """A local path with a leading ~ expanded; remote URLs, None and "" unchanged. For paths
  handed to libraries that do not expand ~ (TFDS's data_dir)."""
  if not p or is_remote(p):
    return p
  return os.path.expanduser(p)


# Config fields that hold a path: bash leaves ~ unexpanded after '=' (--config.input.data_dir=
# ~/tfds), so expand_config expands it once, before anything reads them.
CONFIG_PATHS = ("input.data_dir", "init_from", "text.vocab", "eval.zeroshot_prompts")


def expand_config(config) -> None:
  """Expands a leading ~ in every path field of a config (CONFIG_PATHS), in place."""
  for field in CONFIG_PATHS:
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node.get(parent) if node is not None else None
    if node is not None and isinstance(node.get(name), str):
      node[name] = expand(node[name])


def join(base: PathLike, *parts: str) -> epath.Path:
  return path(base).joinpath(*parts)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def makedirs(p: PathLike) -> epath.Path:
  target = path(p)
  target.mkdir(parents=True, exist_ok=True)
  return target


def write_bytes(p: PathLike, data: bytes) -> None:
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def append_text(p: PathLike, text: str) -> None:
  """Appends text (see the module docstring for remote paths)."""
  target = path(p)
  if is_remote(target):
    old = target.read_text() if target.exists() else ""
    write_text(target, old + text)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target, "a", encoding="utf-8") as f:
    f.write(text)


def write_json(p: PathLike, data: Any) -> None:
  write_text(p, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def save_npy(p: PathLike, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  write_bytes(p, buffer.getvalue())


def load_npy(p: PathLike, *, mmap: bool = False) -> np.ndarray:
  """A .npy array; memory-mapped (read-only) when asked and the file is local."""
  target = path(p)
  if mmap and not is_remote(target):
    return np.load(target, mmap_mode="r", allow_pickle=False)
  with target.open("rb") as f:
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


def remove(p: PathLike) -> None:
  """Deletes a file or a directory tree (nothing if absent)."""
  target = path(p)
  if target.is_dir():
    target.rmtree()
  elif target.exists():
    target.unlink()
