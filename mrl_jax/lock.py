"""One training job per workdir: a lock file that names its holder and survives crashes.

`<workdir>/LOCK` is a small JSON record (host, pid, the process's start time, the job's start
time, a heartbeat) written by process 0 of the job; the other processes of a multi-host job
learn the outcome from it, so all of them proceed or all stop. A second job finds the record
and stops with one line (ConfigError, exit 2) naming the holder, unless the holder is gone:
- same host: its pid no longer runs, or runs a different process (pid reuse: the recorded
  process start time differs) - e.g. after kill -9;
- another host: its heartbeat (rewritten every HEARTBEAT_SECONDS while the job runs) is older
  than STALE_SECONDS - e.g. a preempted VM;
then the lock is taken over with a one-line notice. The lock is removed when the job ends.

Creation is atomic on local and network file systems (O_CREAT | O_EXCL). On object stores
(gs://) there is no exclusive create through the path layer: the lock is written, then read
back, and the job proceeds only if the record read is its own; two jobs started within the
store's write latency of each other could both pass (docs/reliability.md).
"""

import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from mrl_jax import paths
from mrl_jax import utils
from mrl_jax.errors import ConfigError

LOCK_NAME = "LOCK"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0


def _process_start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot), None if it does not run."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except OSError:
    return None


def _alive_here(record: dict) -> bool:
  """Whether the holder recorded on this host still runs (and is the same process)."""
  pid = record.get("pid")
  if not isinstance(pid, int):
    return False
  started = _process_start_time(pid)
  if started is None:
    if not os.path.exists("/proc"):  # no procfs: fall back to a signal-0 probe
      try:
        os.kill(pid, 0)
        return True
      except OSError:
        return False
    return False
  return record.get("process_start") in (None, started)


def stale_reason(record: dict, now: float | None = None) -> str | None:
  """Why the recorded holder is gone, or None if it may still run."""
  now = time.time() if now is None else now
  if record.get("host") == socket.gethostname():
    return None if _alive_here(record) else f"process {record.get('pid')} no longer runs"
  age = now - float(record.get("heartbeat", 0))
  if age > STALE_SECONDS:
    return f"no heartbeat for {age:.0f} s (> {STALE_SECONDS:.0f} s)"
  return None


def describe(record: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("job_start", 0)))
  return f"pid {record.get('pid')} on {record.get('host')}, started {started}"


class WorkdirLock:
  """Context manager: holds `<workdir>/LOCK` for this job (process 0 writes it)."""

  def __init__(self, workdir: paths.PathLike):
    self.path = paths.join(workdir, LOCK_NAME)
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None
    self.record = None

  def _new_record(self) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": _process_start_time(os.getpid()), "job_start": now,
            "heartbeat": now, "processes": jax.process_count(), "token": self.token}

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # half-written or unreadable: treated as stale below (no host, no heartbeat)

  def _create(self, record: dict) -> bool:
    """Writes the record if no lock exists; True if this job now holds it."""
    text = json.dumps(record)
    if paths.is_remote(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return (self._read() or {}).get("token") == self.token
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def _acquire_here(self) -> str | None:
    """Process 0: takes the lock; returns the one-line refusal, or None when held."""
    paths.makedirs(self.path.parent)
    for _ in range(3):  # a takeover can race another takeover: retry a little
      record = self._new_record()
      if self._create(record):
        self.record = record
        return None
      held = self._read()
      if held is None:
        continue  # released in between
      reason = stale_reason(held)
      if reason is None:
        return (f"workdir {self.path.parent} is in use by another training job ({describe(held)};"
                f" lock {self.path}); wait for it to finish, or use another --workdir")
      utils.console(f"Taking over the stale lock {self.path} of {describe(held)}: {reason}")
      paths.remove(self.path)
    return f"could not take the lock {self.path} (other jobs keep taking it over)"

  def __enter__(self):
    refusal = self._acquire_here() if utils.is_main_process() else None
    if jax.process_count() > 1:  # every process of the job stops, or none
      held = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
      if not int(held) and refusal is None:
        refusal = f"workdir {self.path.parent} is in use by another training job"
    if refusal is not None:
      raise ConfigError(refusal)
    if self.record is not None:
      self._thread = threading.Thread(target=self._heartbeat, daemon=True)
      self._thread.start()
    return self

  def _heartbeat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self.path.write_text(json.dumps(dict(self.record, heartbeat=time.time())))
      except OSError:
        pass  # a full disk must not kill the job; the lock just ages

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.record is not None and (self._read() or {}).get("token") == self.token:
      paths.remove(self.path)
    return False
