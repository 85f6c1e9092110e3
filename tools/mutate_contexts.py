"""pytest plugin of tools/mutate.py: labels coverage.py's data with the test that ran each line.

Each test (its setup, call and teardown) runs under a coverage context named by its node id,
so the mutation tool can run only the tests that execute a mutated line. Lines run while
collecting (module level, default arguments) keep the empty context.
"""

import coverage
import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  cov = coverage.Coverage.current()
  if cov is not None:
    cov.switch_context(item.nodeid)
  yield
