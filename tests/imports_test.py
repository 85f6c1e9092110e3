"""The code's shape: imports of mrl_jax/ run downwards only (no cycle, none hidden in a function);
the linter passes."""

import ast
import os
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "mrl_jax")
# The one function-level import of our own code: cli.py stays free of JAX for fast --help.
ALLOWED_LAZY = {("mrl_jax.cli", "mrl_jax.distributed")}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
  """({module: modules of ours it imports at module level}, {(module, lazily imported)})."""
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        modules[_module_name(os.path.join(root, f))] = os.path.join(root, f)
  graph, lazy = {m: set() for m in modules}, set()
  for module, path in modules.items():
    tree = ast.parse(open(path).read())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mrl_jax"):
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                 else node.module for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.startswith("mrl_jax")]
      for name in names:
        (graph[module].add if id(node) in top else lambda n, m=module: lazy.add((m, n)))(name)
  return graph, lazy


def test_no_import_cycle():
  graph, _ = _imports()
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in graph.get(node, ()):
      assert state.get(nxt) != "open", " -> ".join(stack[stack.index(nxt):] + [nxt])
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node)
  assert "mrl_jax.train_lib" not in set().union(*(graph[m] for m in graph if m.startswith(
      "mrl_jax.evaluation")))  # evaluators never import the trainer


def test_no_function_level_import_of_our_own_modules():
  _, lazy = _imports()
  assert lazy <= ALLOWED_LAZY, sorted(lazy - ALLOWED_LAZY)


def test_ruff_finds_no_unused_or_undefined_name():
  """The linter (pyproject.toml [tool.ruff]) over the whole repository."""
  done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout[-3000:]
