"""Timing shared by the benchmarks: alternating rounds, so drifts hit every variant alike."""

def interleaved(runners: dict, rounds: int, steps: int) -> dict:
  """Median seconds per step of each runner, timed in rounds (one warm-up round) whose order
  alternates (ABBA...), so that drifts in load and whatever a run leaves behind for the next
  (caches, allocator state) hit every runner alike."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  times = {name: [] for name in runners}
  for r in range(rounds + 1):
    for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
      t = runners[name].run(steps)
      if r:
        times[name].append(t)
  return {name: float(np.median(t)) for name, t in times.items()}


def report(text: str, append: str = "") -> None:
  """Prints a benchmark's markdown and, with --append=FILE, appends it there."""
  print(text)
  if append:
    with open(append, "a") as f:
      f.write(text)
