r"""Mutation testing of the core modules: does some test fail when one line is wrong?

  python tools/mutate.py                          # every core module (hours on 2 cores)
  python tools/mutate.py --modules=losses,lock    # some of them
  python tools/mutate.py --modules=lock --list    # the mutants, without running anything
  python tools/mutate.py --modules=knn --functions=dot_rows   # a change confined to dot_rows
  python tools/mutate.py --show=<mutant id>       # one mutant's diff
  python tools/mutate.py --report                 # rewrite docs/mutation/README.md only

A mutant is the module with one small change a programmer could make by mistake (an operator
or comparison swapped, a constant off by one, `and`/`or` swapped, `not` dropped, `min`/`max`
swapped, a keyword argument left out, a statement deleted, a return value lost). Each mutant
is written into a private copy of the repository and the module's tests (MODULES, fast ones
first) run against it with `pytest -x`; the mutant is *killed* when a test fails (or the run
times out), *survives* otherwise. coverage.py records once per module which test runs which
line (tools/mutate_contexts.py): a mutant first runs only the tests that execute its line, and
only if none fails, every test of its tiers (a jitted or cached function is traced by the first
test that calls it, so a later test can see a line without running it). Lines that no test of
the module executes survive without a run. Log, progress and error-message code is not
mutated (output only).

Results go to docs/mutation/results.json (one entry per mutant, keyed by an id stable under
unrelated edits) and docs/mutation/README.md (kill rate per module). Every survivor is triaged
by hand in tools/mutation_triage.json: "equivalent" (no test can tell: the reason is written
there) or fixed by adding a test, after which a rerun kills it. The kill rate is
killed / (mutants - equivalent). Runs resume: mutants with a result for the same module source
are skipped when they were killed: tests get added, not weakened (--rerun redoes them all);
survivors run again, unless --new-only (only mutants without a result: a module's new lines).
"""

import argparse
import ast
import concurrent.futures
import copy
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "docs", "mutation", "results.json")
REPORT = os.path.join(REPO, "docs", "mutation", "README.md")
TRIAGE = os.path.join(REPO, "tools", "mutation_triage.json")

# module -> (file, test tiers). A tier is a list of pytest arguments; tiers run in order and the
# first failure kills the mutant, so the fast, targeted tests come first.
MODULES = {
    "losses": ("mrl_jax/losses.py", [
        ["tests/losses_test.py"],
        ["tests/train_step_test.py", "tests/models_test.py"]]),
    "heads": ("mrl_jax/models/heads.py", [
        ["tests/losses_test.py", "tests/models_test.py"],
        ["tests/linear_test.py", "tests/train_step_test.py"]]),
    "optim": ("mrl_jax/optim.py", [
        ["tests/optim_test.py"],
        ["tests/train_step_test.py", "tests/configs_test.py"]]),
    "train_lib": ("mrl_jax/train_lib.py", [
        ["tests/train_step_test.py", "-m", "not slow"],
        ["tests/configs_test.py", "-k", "dry_run"],
        ["tests/train_test.py", "tests/train_step_test.py", "tests/lock_test.py",
         "-m", "slow or not slow"],
        ["tests/reliability_test.py", "tests/multihost_test.py"]]),
    "preprocess": ("mrl_jax/data/preprocess.py", [
        ["tests/preprocess_test.py"],
        ["tests/data_test.py"]]),
    "knn": ("mrl_jax/evaluation/knn.py", [
        ["tests/knn_test.py"],
        ["tests/adaptive_retrieval_test.py", "tests/embeddings_test.py"]]),
    "metrics": ("mrl_jax/evaluation/metrics.py", [
        ["tests/metrics_test.py", "tests/knn_test.py"],
        ["tests/adaptive_retrieval_test.py", "tests/evaluate_test.py", "-m", "not slow"]]),
    "adaptive_retrieval": ("mrl_jax/evaluation/adaptive_retrieval.py", [
        ["tests/adaptive_retrieval_test.py"],
        ["tests/embeddings_test.py"]]),
    "adaptive_classification": ("mrl_jax/evaluation/adaptive_classification.py", [
        ["tests/adaptive_classification_test.py"]]),
    "checkpoint": ("mrl_jax/checkpoint.py", [
        ["tests/checkpoint_test.py"],
        ["tests/reliability_test.py", "tests/multihost_test.py"]]),
    "contrastive_tiled": ("mrl_jax/contrastive_tiled.py", [
        ["tests/contrastive_tiled_test.py"],
        ["tests/contrastive_test.py"]]),
    "lock": ("mrl_jax/lock.py", [
        ["tests/lock_test.py", "-m", "not slow"],
        ["tests/lock_test.py", "tests/multihost_test.py"]]),
    "quantize": ("mrl_jax/evaluation/quantize.py", [
        ["tests/quantize_test.py"],
        ["tests/inference_test.py"]]),
    "builtin": ("mrl_jax/data/builtin.py", [
        ["tests/scenes_test.py"],
        ["tests/data_test.py", "-m", "not slow"]]),
    "prepare": ("mrl_jax/data/prepare.py", [
        ["tests/prepare_test.py"],
        ["tests/imagenet_prepare_test.py", "-m", "not slow"]]),
    "convert_hf": ("mrl_jax/convert_hf.py", [
        ["tests/convert_hf_test.py"]]),
    "state": ("mrl_jax/state.py", [
        ["tests/state_test.py"],
        ["tests/two_towers_test.py", "-k", "init_from or lit or locked"]]),
}

# Calls whose only effect is output: not mutated.
OUTPUT_CALLS = {"print", "console", "warn", "info", "warning", "error", "debug", "update"}
BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
          ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
          ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
          ast.IsNot: ast.Is}
SWAP_NAMES = {"min": "max", "max": "min", "argmin": "argmax", "argmax": "argmin",
              "minimum": "maximum", "maximum": "minimum"}


# ---- generating mutants ------------------------------------------------------------------------

def _output_only(node) -> bool:
  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
    func = node.value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in OUTPUT_CALLS
  return False


def _skipped(tree) -> set[int]:
  """ids of nodes not to mutate: docstrings, raise/assert/output statements, f-strings,
  annotations, and everything inside them."""
  skip = set()

  def mark(node):
    skip.update(id(n) for n in ast.walk(node))

  for node in ast.walk(tree):
    if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)) or _output_only(node):
      mark(node)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        mark(body[0])  # docstring
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for arg in node.args.args + node.args.kwonlyargs:
        if arg.annotation is not None:
          mark(arg.annotation)
      if node.returns is not None:
        mark(node.returns)
      for decorator in node.decorator_list:
        mark(decorator)
    if isinstance(node, ast.AnnAssign):
      mark(node.annotation)
  return skip


def _variants(node):
  """(operator name, mutated copy of node) pairs for one node."""
  if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
    new = copy.deepcopy(node)
    new.op = BINOPS[type(node.op)]()
    yield f"binop {type(node.op).__name__}->{type(new.op).__name__}", new
  elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMPOPS:
    new = copy.deepcopy(node)
    new.ops = [CMPOPS[type(node.ops[0])]()]
    yield f"compare {type(node.ops[0]).__name__}->{type(new.ops[0]).__name__}", new
  elif isinstance(node, ast.BoolOp):
    new = copy.deepcopy(node)
    new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    yield f"boolop {type(node.op).__name__}->{type(new.op).__name__}", new
  elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
    yield f"drop {type(node.op).__name__}", copy.deepcopy(node.operand)
  elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
    if isinstance(node.value, bool):
      yield "constant flip", ast.Constant(not node.value)
    else:
      yield "constant +1", ast.Constant(node.value + 1)
  elif isinstance(node, ast.Name) and node.id in SWAP_NAMES:
    yield f"name {node.id}->{SWAP_NAMES[node.id]}", ast.Name(SWAP_NAMES[node.id], node.ctx)
  elif isinstance(node, ast.Attribute) and node.attr in SWAP_NAMES:
    new = copy.deepcopy(node)
    new.attr = SWAP_NAMES[node.attr]
    yield f"attribute {node.attr}->{new.attr}", new
  elif isinstance(node, ast.Call):
    for i, kw in enumerate(node.keywords):
      if kw.arg is not None:
        new = copy.deepcopy(node)
        del new.keywords[i]
        yield f"drop keyword {kw.arg}", new


def _statement_variants(node):
  if isinstance(node, ast.AugAssign) or (
      isinstance(node, ast.Assign) and any(isinstance(t, (ast.Subscript, ast.Attribute))
                                           for t in node.targets)) or (
      isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
    yield "delete statement", "pass"
  if isinstance(node, ast.Return) and node.value is not None and not (
      isinstance(node.value, ast.Constant) and node.value.value is None):
    yield "return None", "return None"


def _offsets(source: str) -> list[int]:
  starts, total = [], 0
  for line in source.splitlines(keepends=True):
    starts.append(total)
    total += len(line)
  return starts


def mutants(module: str) -> list[dict]:
  """Every mutant of a module: id, line, operator, original and mutated text, new source."""
  path = os.path.join(REPO, MODULES[module][0])
  with open(path) as f:
    source = f.read()
  tree = ast.parse(source)
  skip = _skipped(tree)
  lines = source.splitlines()
  starts = _offsets(source)
  qualnames = {}

  def name_scopes(node, prefix):
    for child in ast.iter_child_nodes(node):
      name = prefix
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f"{prefix}.{child.name}" if prefix else child.name
      for n in ast.walk(child) if name == prefix else [child]:
        qualnames.setdefault(id(n), name)
      if name != prefix:
        name_scopes(child, name)

  name_scopes(tree, "")
  statement_line = {}  # node -> the first line of its statement (what coverage records)
  for stmt in ast.walk(tree):
    if isinstance(stmt, ast.stmt):
      for n in ast.walk(stmt):
        statement_line[id(n)] = stmt.lineno  # inner statements overwrite outer ones later
  out, seen = [], {}
  for node in ast.walk(tree):
    if id(node) in skip or not hasattr(node, "lineno") or node.end_lineno is None:
      continue
    if "no mutate" in lines[node.lineno - 1]:
      continue
    begin = starts[node.lineno - 1] + node.col_offset
    end = starts[node.end_lineno - 1] + node.end_col_offset
    original = source[begin:end]
    if isinstance(node, ast.stmt):
      replacements = list(_statement_variants(node))
    else:
      replacements = [(op, "(" + ast.unparse(new) + ")") for op, new in _variants(node)]
    for op, text in replacements:
      mutated = source[:begin] + text + source[end:]
      try:
        ast.parse(mutated)
      except SyntaxError:
        continue
      scope = qualnames.get(id(node), "")
      key = hashlib.sha1(f"{scope}\0{op}\0{original}\0{text}".encode()).hexdigest()[:10]
      seen[key] = seen.get(key, 0) + 1
      out.append({"id": f"{module}:{scope or '<module>'}:{key}:{seen[key]}", "module": module,
                  "line": node.lineno, "statement_line": statement_line.get(id(node)),
                  "operator": op, "original": original, "mutated": text, "source": mutated})
  return sorted(out, key=lambda m: (m["line"], m["id"]))


# ---- running them ------------------------------------------------------------------------------

def _pytest(workdir: str, args: list[str], env: dict, timeout: float):
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "--no-header", *args]
  try:
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return "timeout", ""
  return proc.returncode, proc.stdout[-2000:]


def _env(extra=None) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
  env.setdefault("MRL_JAX_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(),
                                                             "mrl_mutate_jax_cache"))
  env.setdefault("MRL_JAX_TEST_DATA_DIR", os.path.join(tempfile.gettempdir(),
                                                       "mrl_mutate_tfds"))
  env.update(extra or {})
  return env


def repair_compile_cache(path: str) -> int:
  """Removes the entries of a jax compilation cache that have no access-time file; returns how
  many. With a size limit (conftest sets one) jax's LRU cache reads every entry's `-atime` file
  before each write; an entry written without the limit (an older run) has none, and every
  later write then fails with FileNotFoundError, which jax prints to stderr: a test that checks
  a process's stderr would then fail, and count a mutant as killed, for that alone."""
  if not os.path.isdir(path):
    return 0
  names = set(os.listdir(path))
  stale = [n for n in names if n.endswith("-cache") and n[:-len("-cache")] + "-atime" not in names]
  for name in stale:
    os.remove(os.path.join(path, name))
  return len(stale)


def _copy_repo(target: str) -> str:
  if os.path.exists(target):
    shutil.rmtree(target)
  shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(
      ".git", ".venv", "venv", "runs", "__pycache__", "*.egg-info", "docs"))
  return target


def _tiers(module: str, only: list[int] | None) -> list[list[str]]:
  """The module's test tiers, or only the chosen ones (1-based)."""
  tiers = MODULES[module][1]
  bad = [i for i in only or () if not 1 <= i <= len(tiers)]
  if bad:
    raise SystemExit(f"no tier {bad[0]} of {module} (--tiers); allowed: 1..{len(tiers)}")
  return [tiers[i - 1] for i in only] if only else tiers


def baseline(module: str, workdir: str, only: list[int] | None = None
             ) -> tuple[list[float], list[dict[int, list[str]]]]:
  """Seconds per tier on the unmutated code (which must pass) and, per tier, the module's lines
  with the tests that run them (node ids; "" for lines run while collecting), from coverage.py's
  C tracer restricted to the module."""
  path, tiers = MODULES[module][0], _tiers(module, only)
  seconds, contexts = [], []
  for i, tier in enumerate(tiers):
    data_file = os.path.join(workdir, f".mutate_coverage_{i}")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "coverage", "run", f"--data-file={data_file}",
           f"--include={os.path.join(workdir, path)}", "-m", "pytest", "-q", "-x", "-n", "0",
           "--no-header", "-p", "mutate_contexts", *tier]
    env = _env({"PYTHONPATH": os.path.join(workdir, "tools")})
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=3600, check=False)
    if proc.returncode != 0:
      raise SystemExit(f"{module}: the tests fail without any mutation ({tier}):\n"
                       f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    seconds.append(time.perf_counter() - t0)
    import coverage  # pylint: disable=g-import-not-at-top
    data = coverage.CoverageData(basename=data_file)
    data.read()
    by_line = {}
    for measured in data.measured_files():
      for line, names in data.contexts_by_lineno(measured).items():
        by_line.setdefault(line, set()).update(names)
    contexts.append({line: sorted(names) for line, names in by_line.items()})
  return seconds, contexts


def run_mutant(mutant: dict, workdir: str, seconds: list[float],
               contexts: list[dict[int, list[str]]], selected_only: bool = False,
               only: list[int] | None = None) -> tuple[str, str]:
  """('killed' | 'survived', by which tier / 'timeout'); restores the module afterwards. The
  tests that run the mutated line go first; every test of the tiers only if none of them
  fails (unless selected_only: a survivor is then marked as such, to be rerun in full)."""
  path, tiers = MODULES[mutant["module"]][0], _tiers(mutant["module"], only)
  target = os.path.join(workdir, path)
  with open(target) as f:
    original = f.read()
  runs = []  # (label, pytest arguments, timeout)
  for i, tier in enumerate(tiers):
    tests = contexts[i].get(mutant["statement_line"], [])
    if tests and "" not in tests:
      runs.append((f"tier {i + 1}, {len(tests)} test(s) running the line", tests, seconds[i]))
  full = not selected_only or not runs
  if full:
    runs += [(f"tier {i + 1}", tier, seconds[i]) for i, tier in enumerate(tiers)]
  try:
    with open(target, "w") as f:
      f.write(mutant["source"])
    for label, args, tier_seconds in runs:
      code, _ = _pytest(workdir, args, _env(), timeout=3 * tier_seconds + 60)
      if code == "timeout":
        return "killed", f"{label} (timeout)"
      if code != 0:
        return "killed", label
    partial = ([] if full else ["selected tests only"]) + (
        [f"tiers {','.join(map(str, only))} only"] if only else [])
    return "survived", ", ".join(partial)
  finally:
    with open(target, "w") as f:
      f.write(original)


def _fingerprint(module: str) -> str:
  """Hash of the module's source: results of another version of it are not reused."""
  with open(os.path.join(REPO, MODULES[module][0]), "rb") as f:
    return hashlib.sha1(f.read()).hexdigest()[:12]


def load(path, default):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return default


def pending(candidates: list[dict], results: dict, fingerprint: str, rerun: bool = False,
            new_only: bool = False, functions: set[str] | None = None) -> list[dict]:
  """The mutants to run. Killed mutants of this source stay killed (tests are added, not
  weakened); survivors and mutants of another source run again, survivors not with new_only
  (a survivor whose test was added and run by hand waits for a full rerun)."""
  def done(m):
    result = results.get(m["id"], {})
    if result.get("fingerprint") != fingerprint:
      return False
    return new_only or result["status"] == "killed"
  # (functions: a change confined to them runs their mutants only)
  return [m for m in candidates if (rerun or not done(m))
          and (not functions or m["id"].split(":")[1] in functions)]


def run(modules: list[str], workers: int, rerun: bool, selected_only: bool = False,
        only: list[int] | None = None, new_only: bool = False,
        functions: set[str] | None = None) -> None:
  results = load(RESULTS, {})
  stale = repair_compile_cache(_env()["MRL_JAX_TEST_COMPILE_CACHE"])
  if stale:
    print(f"removed {stale} compilation cache entries without an access time", flush=True)
  root = tempfile.mkdtemp(prefix="mrl_mutate_")
  copies = [_copy_repo(os.path.join(root, f"w{i}")) for i in range(workers)]
  for module in modules:
    fingerprint = _fingerprint(module)
    todo = pending(mutants(module), results, fingerprint, rerun, new_only, functions)
    if not todo:
      print(f"{module}: every mutant has a result for this version", flush=True)
      continue
    seconds, contexts = baseline(module, copies[0], only)
    covered = set().union(*contexts)
    print(f"{module}: {len(todo)} mutants; tiers {[round(s) for s in seconds]} s; "
          f"{len(covered)} lines run by its tests", flush=True)
    free = list(copies)

    if only:  # mutants whose line the chosen tiers do not run wait for a run with all tiers
      todo = [m for m in todo if m["statement_line"] in covered]
      print(f"{module}: {len(todo)} of them on lines tiers {only} run", flush=True)

    def one(mutant):
      if mutant["statement_line"] not in covered:
        return mutant, "survived", "no test runs this line"
      workdir = free.pop()
      try:
        return mutant, *run_mutant(mutant, workdir, seconds, contexts, selected_only, only)
      finally:
        free.append(workdir)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for i, (mutant, status, detail) in enumerate(pool.map(one, todo)):
        results[mutant["id"]] = {k: mutant[k] for k in ("module", "line", "operator",
                                                         "original", "mutated")}
        results[mutant["id"]].update(status=status, detail=detail, fingerprint=fingerprint)
        print(f"[{module} {i + 1}/{len(todo)} {time.perf_counter() - t0:.0f} s] {status:8s} "
              f"line {mutant['line']}: {mutant['operator']}: {mutant['original'][:60]!r}"
              + (f" ({detail})" if detail else ""), flush=True)
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
          json.dump(results, f, indent=1, sort_keys=True)
  shutil.rmtree(root, ignore_errors=True)
  report()


def report() -> None:
  """docs/mutation/README.md from results.json and the triage file."""
  results, triage = load(RESULTS, {}), load(TRIAGE, {})
  current = {m: {x["id"] for x in mutants(m)} for m in MODULES}
  rows, survivors = [], []
  totals = dict(mutants=0, killed=0, equivalent=0, survived=0)
  for module in MODULES:
    entries = [(i, results[i]) for i in sorted(current[module]) if i in results]
    if not entries:
      continue
    killed = sum(e["status"] == "killed" for _, e in entries)
    equivalent = [(i, e) for i, e in entries if e["status"] == "survived"
                  and triage.get(i, {}).get("verdict") == "equivalent"]
    open_ = [(i, e) for i, e in entries if e["status"] == "survived"
             and triage.get(i, {}).get("verdict") != "equivalent"]
    missing = len(current[module]) - len(entries)
    counted = len(entries) - len(equivalent)
    rate = killed / counted if counted else 1.0
    rows.append(f"| {module} | {len(entries)}{f' (+{missing} not run)' if missing else ''} | "
                f"{killed} | {len(equivalent)} | {len(open_)} | {100 * rate:.1f} % |")
    for key, value in (("mutants", len(entries)), ("killed", killed),
                       ("equivalent", len(equivalent)), ("survived", len(open_))):
      totals[key] += value
    survivors += [(module, i, e, triage.get(i, {})) for i, e in equivalent + open_]
  counted = totals["mutants"] - totals["equivalent"]
  rate = totals["killed"] / counted if counted else 1.0
  text = ["# Mutation testing", "",
          "Generated by `python tools/mutate.py` (see its docstring; docs/mutation_testing.md).",
          "Kill rate = killed / (mutants - equivalent).", "",
          "| module | mutants | killed | equivalent | survived | kill rate |",
          "|---|---|---|---|---|---|", *rows,
          f"| **all** | {totals['mutants']} | {totals['killed']} | {totals['equivalent']} | "
          f"{totals['survived']} | **{100 * rate:.1f} %** |", "",
          "## Survivors", "",
          "Equivalent mutants (no test can tell them apart; the reason is in "
          "tools/mutation_triage.json) and any survivor not triaged yet.", ""]
  for module, i, e, t in survivors:
    verdict = t.get("verdict", "NOT TRIAGED")
    text.append(f"- `{i}` line {e['line']}, {e['operator']}: `{e['original'][:70]}` -> "
                f"`{e['mutated'][:70]}`: **{verdict}**" + (f": {t['why']}" if t.get("why")
                                                          else "")
                + (f" ({e['detail']})" if e.get("detail") and not t else ""))
  added = sorted((i, t) for i, t in triage.items() if t.get("verdict") == "test added")
  if added:
    text += ["", "## Survivors killed by a test added for them", ""]
    text += [f"- `{i}` ({results.get(i, {}).get('status', 'not run')}): {t.get('test', '')}"
             for i, t in added]
  os.makedirs(os.path.dirname(REPORT), exist_ok=True)
  with open(REPORT, "w") as f:
    f.write("\n".join(text) + "\n")
  print("\n".join(text[:len(rows) + 8]))


def show(mutant_id: str) -> None:
  module = mutant_id.split(":", 1)[0]
  for m in mutants(module):
    if m["id"] == mutant_id:
      path = MODULES[module][0]
      with open(os.path.join(REPO, path)) as f:
        before = f.read()
      sys.stdout.writelines(difflib.unified_diff(before.splitlines(True),
                                                 m["source"].splitlines(True), path, path))
      return
  raise SystemExit(f"no mutant {mutant_id!r}; list them with --modules={module} --list")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modules", default=",".join(MODULES),
                      help=f"comma-separated, of: {', '.join(MODULES)}")
  parser.add_argument("--workers", type=int, default=2, help="mutants run at once")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("--show", help="print one mutant's diff and exit")
  parser.add_argument("--report", action="store_true", help="only rewrite the report")
  parser.add_argument("--rerun", action="store_true", help="rerun mutants with a result")
  parser.add_argument("--new-only", action="store_true",
                      help="run only mutants without a result for this source (survivors "
                      "are not rerun)")
  parser.add_argument("--selected-only", action="store_true",
                      help="run only the tests that execute the mutated line (a quick first "
                      "pass for modules with slow tests; survivors are marked and run again "
                      "in full by a later run)")
  parser.add_argument("--tiers", help="comma-separated 1-based tiers of the module's tests to "
                      "use (e.g. 1,2: its fast ones); mutants on lines only other tiers run "
                      "are left for a run with all tiers, survivors are marked")
  parser.add_argument("--functions", help="comma-separated function names (Class.method for "
                      "methods): only their mutants run, e.g. after a change confined to them "
                      "(the module's other results stay as recorded)")
  args = parser.parse_args()
  modules = [m for m in args.modules.split(",") if m]
  unknown = [m for m in modules if m not in MODULES]
  if unknown:
    raise SystemExit(f"unknown module {unknown[0]!r} (--modules); allowed: {', '.join(MODULES)}")
  if args.show:
    return show(args.show)
  if args.list:
    for m in modules:
      for x in mutants(m):
        print(f"{x['id']}  line {x['line']}: {x['operator']}: {x['original'][:70]!r}")
    return None
  if args.report:
    return report()
  only = [int(t) for t in args.tiers.split(",")] if args.tiers else None
  if args.rerun and args.new_only:
    raise SystemExit("--rerun and --new-only exclude each other; pass one of them")
  functions = set(args.functions.split(",")) if args.functions else None
  return run(modules, max(1, args.workers), args.rerun, args.selected_only, only, args.new_only,
             functions)


if __name__ == "__main__":
  main()
