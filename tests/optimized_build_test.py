"""One test of each equality family on a normally optimised XLA build, as users run.

The suite compiles with `jax_disable_most_optimizations` and XLA:CPU's legacy emitters
(conftest: ~2.5x and ~1.8x faster compiles); what users run has XLA's optimisations on and its
fusion emitters, which may fuse and reorder float arithmetic otherwise. This reruns, in a fresh
pytest process with MRL_JAX_TEST_OPTIMIZED=1 (neither flag), one test of
each family: a step on 8 devices (data with gradient accumulation; data x fsdp) vs an independent
one-device SGD step, remat vs none, and bitwise resume (a ViT with dropout and sampled sizes).
Their tolerances hold on both builds: the device-count and accumulation steps compare with rtol
1e-5 - 1e-4 (reductions in another order), remat within its test's tolerance, resume bitwise.
The initial states still compile unoptimised there (conftest.unoptimised_init): both sides of
each equality start from one.
Not rerun, to keep the suite's time: the 6-step loss curves on 8 devices (~40 s; the step
tests cover the same reductions against a reference that is not the code itself) and two
processes vs one (~60 s): both sides compile the same 2-device SPMD program (each process its
copy), so the optimisation level changes both alike; what differs between them, the
collectives between processes (gloo), is not something XLA's passes touch.
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import OPTIMIZED
from tests.conftest import REPO
from tests.conftest import process_env

FAMILIES = [
    "tests/train_step_test.py::test_one_step_equals_an_independent_sgd_step[8-2-False]",
    "tests/train_step_test.py::test_one_step_equals_an_independent_sgd_step[8-1-True]",
    "tests/models_test.py::test_remat_gives_the_same_outputs_and_gradients",
    "tests/train_step_test.py::test_resume_is_bitwise_with_sampled_sizes_and_dropout",
    # The build each run asks for reaches jax, here and in the processes tests start.
    "tests/optimized_build_test.py::test_processes_compile_with_the_build_the_run_asks_for",
]


def test_processes_compile_with_the_build_the_run_asks_for():
  """conftest sets the XLA build through the environment: the suite's processes compile with
  most optimisations off and the legacy emitters, the optimised rerun's (which inherits the
  suite's environment) as users do, and so do the processes tests start (conftest.process_env,
  here on 2 devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.config.read("jax_disable_most_optimizations") is not OPTIMIZED
  child = subprocess.run(
      [sys.executable, "-c", "import os, jax; print("
       "jax.config.read('jax_disable_most_optimizations'), jax.config.jax_compilation_cache_dir,"
       " jax.device_count(), os.environ['XLA_FLAGS'])"],
      env=process_env(2, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, check=True)
  disabled, cache, devices, *flags = child.stdout.split()
  assert [disabled, cache, devices] == [str(not OPTIMIZED),
                                        os.environ["MRL_JAX_TEST_COMPILE_CACHE"], "2"]
  assert ("--xla_cpu_use_fusion_emitters=false" in flags) is not OPTIMIZED


@pytest.mark.slow
@pytest.mark.skipif(OPTIMIZED, reason="already the optimised run")
def test_equality_families_hold_on_an_optimised_build(data_dir):
  env = dict(os.environ, MRL_JAX_TEST_OPTIMIZED="1", MRL_JAX_TEST_DATA_DIR=data_dir)
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0",
                         *FAMILIES], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=1500, check=False)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert f"{len(FAMILIES) + 1} passed" in done.stdout  # remat: resnet and vit
