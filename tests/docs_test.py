"""Every command in README.md and docs/ parses as documented: the program exists, each flag is
one it defines, each config file and arg loads, each --config.<field> override names a field and
its value has the field's type; every Python example compiles and calls inference with keyword
arguments its functions take.

The flags are what each program itself lists (`--helpfull` for absl programs, `--help` for
argparse ones), so a renamed flag fails here as it would for a reader."""

import ast
import concurrent.futures
import functools
import glob
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO
from tests.conftest import load_config

DOCUMENTS = ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md",
             *sorted(os.path.relpath(p, REPO) for p in glob.glob(
                 os.path.join(REPO, "docs", "**", "*.md"), recursive=True))]
PLACEHOLDER = re.compile(r"\.\.\.|<|\$|^DIR$|^OUTDIR$")


def _blocks(document: str, language: str) -> list[str]:
  text = open(os.path.join(REPO, document)).read()
  return [textwrap.dedent(b) for b in
          re.findall(rf"^[ \t]*```{language}\n(.*?)^[ \t]*```", text, re.S | re.M)]


def _commands(block: str) -> list[list[str]]:
  """The shell commands of a bash block: continuation lines joined, comments dropped, split at
  && and ;, each as tokens; a quoted command inside another (gcloud --command=...) included."""
  out = []
  for line in block.replace("\\\n", " ").splitlines():
    tokens = shlex.split(line, comments=True)
    command = []
    for token in tokens + [";"]:
      if token in ("&&", ";", "||"):
        if command:
          out.append(command)
        command = []
        continue
      command.append(token)
      if "python " in token and token is not tokens[0]:  # a command passed as a string
        out.extend(_commands(token.split("=", 1)[-1]))
  return out


def _python_call(command: list[str]) -> tuple[str, list[str]] | None:
  """(program, its arguments) of a `python <script>` / `python -m <module>` command, wherever it
  sits (after srun, mpirun, env assignments)."""
  for i, token in enumerate(command):
    if token in ("python", "python3") and i + 1 < len(command):
      if command[i + 1] == "-m":
        return f"-m {command[i + 2]}", command[i + 3:]
      if command[i + 1].endswith(".py"):
        return command[i + 1], command[i + 2:]
  return None


def _documented_calls():
  calls = []
  for document in DOCUMENTS:
    for block in _blocks(document, "bash"):
      for command in _commands(block):
        call = _python_call(command)
        if call and call[0] != "-m venv":
          calls.append((document, *call))
  return calls


@functools.cache
def _flags(program: str) -> frozenset[str]:
  """The flags a program defines, from the definition lines of its own help (absl's
  `--helpfull`, else argparse's `--help`); the examples in a docstring do not count."""
  argv = program.split() if program.startswith("-m ") else [program]
  definition = re.compile(r"^\s+(?:-.,\s?)?--(\[no\])?([A-Za-z][\w-]*)", re.M)
  for help_flag in ("--helpfull", "--help"):
    out = subprocess.run([sys.executable, *argv, help_flag], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
    found = definition.findall(out.stdout + out.stderr)
    if found:
      return frozenset([name for _, name in found] + [f"no{name}" for no, name in found if no])
  raise AssertionError(f"python {program} lists no flags: {(out.stdout + out.stderr)[-2000:]}")


CALLS = _documented_calls()


def test_the_documents_hold_commands_of_every_kind():
  """The collection itself: the README's two training entry points and the module commands."""
  programs = {program for _, program, _ in CALLS}
  assert {"train.py", "eval.py", "-m mrl_jax.data.prepare", "-m mrl_jax.convert_hf",
          "-m mrl_jax.convert_torch", "tools/mutate.py", "experiments/paper_claims.py"} <= programs
  assert len(CALLS) > 40


def test_every_documented_flag_is_one_its_program_defines():
  programs = sorted({program for _, program, _ in CALLS})
  for program in programs:
    assert os.path.exists(os.path.join(REPO, program)) or program.startswith("-m "), program
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    known = dict(zip(programs, pool.map(_flags, programs)))
  unknown = []
  for document, program, args in CALLS:
    for arg in args:
      if not arg.startswith("--") or arg.startswith("--config."):
        continue
      name = arg[2:].split("=", 1)[0]
      if name not in known[program]:
        unknown.append(f"{document}: python {program} {arg}")
  assert not unknown, "\n".join(unknown)


def _override_value(default, text: str):
  """The value ml_collections' flag parser would give an override of a field with `default`."""
  if isinstance(default, bool):
    assert text.lower() in ("true", "false", "1", "0"), text
    return text.lower() in ("true", "1")
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    return type(default)(text)
  if isinstance(default, tuple):
    value = ast.literal_eval(text)
    assert isinstance(value, tuple), text
    return value
  return text


def test_every_documented_config_loads_with_its_overrides():
  """--config=<file>[:arg] loads; each --config.a.b=value names a field of it, with a value of
  the field's type (values that are placeholders, such as `...` or `$BUCKET`, are not read)."""
  checked = 0
  for document, program, args in CALLS:
    config_args = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    if not config_args or PLACEHOLDER.search(config_args[0]):
      continue
    config = load_config(config_args[0])
    for arg in args:
      if not arg.startswith("--config."):
        continue
      field, _, value = arg[len("--config."):].partition("=")
      node = config
      *parents, name = field.split(".")
      for parent in parents:
        node = node[parent]
      assert name in node, f"{document}: python {program} {arg}: no field config.{field}"
      if not PLACEHOLDER.search(value) and node[name] is not None:
        node[name] = _override_value(node[name], value)
    checked += 1
  assert checked > 20


def test_every_python_example_compiles_and_calls_inference_as_it_is_defined():
  from mrl_jax import inference  # pylint: disable=g-import-not-at-top
  signatures = {"load": inspect.signature(inference.load),
                "embed": inspect.signature(inference.Embedder.embed)}
  examples = [(d, b) for d in DOCUMENTS for b in _blocks(d, "python")]
  assert examples
  for document, block in examples:
    tree = ast.parse(block)
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr in signatures):
        params = signatures[node.func.attr].parameters
        for keyword in node.keywords:
          assert keyword.arg in params, f"{document}: {node.func.attr}({keyword.arg}=...)"


@pytest.mark.parametrize("block, commands", [
    ("python train.py --config=a.py \\\n  --workdir=w  # note\nrm -r x && python eval.py --x=1",
     [["python", "train.py", "--config=a.py", "--workdir=w"], ["rm", "-r", "x"],
      ["python", "eval.py", "--x=1"]]),
])
def test_commands_are_split_as_a_shell_would(block, commands):
  assert _commands(block) == commands


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_reaches_a_file_and_heading():
  broken = []
  for document in DOCUMENTS:
    text = open(os.path.join(REPO, document)).read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+://", target):
        continue
      path, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(document), path)) if path \
          else os.path.join(REPO, document)
      if not os.path.exists(resolved):
        broken.append(f"{document}: {target}")
      elif anchor and resolved.endswith(".md"):
        headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", open(resolved).read(),
                                                    flags=re.S), re.M)
        if anchor not in {_slug(h) for h in headings}:
          broken.append(f"{document}: {target} (no such heading)")
  assert not broken, "\n".join(broken)
