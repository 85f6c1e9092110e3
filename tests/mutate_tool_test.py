"""tools/mutate.py's own pieces that a mutation pass depends on."""

import warnings

import pytest

from tools import mutate


def test_cache_entries_without_an_access_time_are_removed_so_writes_work(tmp_path):
  """jax's LRU cache with a size limit (conftest sets one) cannot write anything while the
  directory holds an entry written without the limit (no `-atime` file): every put fails and
  jax warns on stderr. The repair removes exactly those entries."""
  from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  (tmp_path / "old-cache").write_bytes(b"written without a size limit")
  (tmp_path / "kept-cache").write_bytes(b"x")
  (tmp_path / "kept-atime").write_bytes((1).to_bytes(8, "little"))
  cache = lru_cache.LRUCache(str(tmp_path), max_size=1 << 20)
  with pytest.raises(FileNotFoundError, match="old-atime"):
    cache.put("new", b"value")
  assert mutate.repair_compile_cache(str(tmp_path)) == 1
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
      "kept-atime", "kept-cache"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cache.put("new", b"value")
  assert cache.get("new") == b"value" and cache.get("kept") == b"x"
  assert mutate.repair_compile_cache(str(tmp_path / "missing")) == 0


def test_pending_reruns_survivors_and_other_sources_unless_new_only():
  """Which mutants a run picks, by their recorded result (a hand-written table)."""
  mutants = [{"id": f"m:{f}:{i}:1"} for f, i in (("f", "killed"), ("f", "survived"),
                                                  ("g", "stale"), ("h", "new"))]
  results = {"m:f:killed:1": {"fingerprint": "f1", "status": "killed"},
             "m:f:survived:1": {"fingerprint": "f1", "status": "survived"},
             "m:g:stale:1": {"fingerprint": "f0", "status": "killed"}}
  ids = lambda **kw: [m["id"].split(":")[2] for m in mutate.pending(mutants, results, "f1",
                                                                     **kw)]
  assert ids() == ["survived", "stale", "new"]
  assert ids(new_only=True) == ["stale", "new"]
  assert ids(rerun=True) == ["killed", "survived", "stale", "new"]
  assert ids(functions={"g", "h"}) == ["stale", "new"]  # --functions=g,h
  assert ids(rerun=True, functions={"f"}) == ["killed", "survived"]
