"""`pip install .` gives a package that imports; requirements.txt is a pinned set inside the
declared ranges; README's GPU/TPU install lines resolve to the pinned JAX."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO


def _project() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _declared() -> dict[str, Requirement]:
  return {canonicalize_name(r.name): r for r in map(Requirement, _project()["dependencies"])}


def _extras() -> dict[str, Requirement]:
  return {canonicalize_name(r.name): r
          for reqs in _project()["optional-dependencies"].values() for r in map(Requirement, reqs)}


def _pinned() -> dict[str, str]:
  pins = {}
  for line in open(os.path.join(REPO, "requirements.txt")):
    match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
    if match:
      pins[canonicalize_name(match.group(1))] = match.group(2)
  return pins


def _imported_modules(*, top_level: bool) -> set[str]:
  """Third-party top-level modules imported in mrl_jax/: at module level, or anywhere."""
  names = set()
  for root, _, files in os.walk(os.path.join(REPO, "mrl_jax")):
    for f in files:
      if f.endswith(".py"):
        tree = ast.parse(open(os.path.join(root, f)).read())
        for node in (tree.body if top_level else ast.walk(tree)):
          if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
          elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - {"mrl_jax"}


def _undeclared(modules, declared) -> dict[str, list[str]]:
  distributions = importlib.metadata.packages_distributions()
  missing = {}
  for module in sorted(modules):
    dists = {canonicalize_name(d) for d in distributions.get(module, [module])}
    if not dists & set(declared):
      missing[module] = sorted(dists)
  return missing


def test_every_third_party_import_is_a_declared_dependency():
  """Module-level imports are runtime dependencies; a function-level import (torch, only in the
  converter) may be an extra instead."""
  declared = _declared()
  assert not _undeclared(_imported_modules(top_level=True), declared)
  assert not _undeclared(_imported_modules(top_level=False), {**declared, **_extras()})
  assert {"jax", "flax", "orbax-checkpoint", "tensorflow-datasets", "etils"} <= set(declared)
  assert "torch" in _extras() and "torch" not in declared


def test_requirements_pins_are_inside_the_declared_ranges():
  pins, declared = _pinned(), _declared()
  outside = {name: (pins[name], str(req.specifier)) for name, req in declared.items()
             if name in pins and not req.specifier.contains(pins[name], prereleases=True)}
  assert not outside
  unpinned = sorted(set(declared) - set(pins) - {"ml-dtypes", "numpy", "absl-py"})  # transitive
  assert not unpinned, f"declared but not pinned in requirements.txt: {unpinned}"


def _readme_install_lines() -> list[str]:
  lines = [l.strip() for l in open(os.path.join(REPO, "README.md"))]
  return [l for l in lines if l.startswith('pip install -r requirements.txt "jax[')]


@pytest.mark.slow
@pytest.mark.parametrize("extra, plugin", [("cuda12", "jax-cuda12-plugin"), ("tpu", "libtpu")])
def test_readme_accelerator_install_lines_resolve_to_the_pinned_jax(tmp_path, extra, plugin):
  """pip resolves README's line against the package index (metadata only, nothing installed),
  in this environment, which requirements.txt installed: pip keeps an installed package that
  satisfies the line and reports only what the line adds or changes, so the version each
  package ends at is the report's, else the installed one. A fresh resolution
  (--ignore-installed) pins the same versions in 2-4x the time: every package's metadata
  is fetched again."""
  (line,) = [l for l in _readme_install_lines() if f'"jax[{extra}]==' in l]
  report = tmp_path / "report.json"
  args = line.split()[2:]  # after "pip install"
  done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                         "--report", str(report), *[a.strip('"') for a in args]],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  added = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
  pins = _pinned()

  def ends_at(name):
    try:
      return added.get(name) or importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None

  assert ends_at("jax") == ends_at("jaxlib") == pins["jax"] == pins["jaxlib"]
  assert ends_at(plugin)  # added, or already installed here
  if extra == "cuda12":
    assert ends_at("jax-cuda12-plugin") == pins["jax"]
  for name in ("flax", "orbax-checkpoint", "tensorflow-cpu"):
    assert ends_at(name) == pins[name]


def test_the_package_has_one_version_and_imports_nothing_heavy():
  """mrl_jax is a regular package: its __version__ is the installed distribution's (pyproject
  reads it from there), and importing it loads neither jax nor TensorFlow."""
  out = subprocess.run(
      [sys.executable, "-c", "import importlib.metadata, sys, mrl_jax; print(mrl_jax.__version__,"
       " importlib.metadata.version('mrl_jax'), mrl_jax.__file__.endswith('__init__.py'), "
       "sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))"],
      cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
  assert "version" not in _project() and "version" in _project()["dynamic"]
  ours, installed, regular, heavy = out.stdout.split()
  assert ours == installed and re.fullmatch(r"\d+\.\d+\.\d+", ours)
  assert (regular, heavy) == ("True", "[]")
