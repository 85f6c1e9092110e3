"""The workdir lock: one training job per workdir, stale locks taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mrl_jax import lock as lock_lib
from mrl_jax.errors import ConfigError
from tests.conftest import REPO
from tests.conftest import process_env


def _dead_pid() -> int:
  """A pid that ran and is gone (a finished child)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _lock_written(workdir) -> bool:
  """Whether the LOCK file exists with its whole record (it is created, then written)."""
  try:
    with open(os.path.join(workdir, "LOCK")) as f:
      return "pid" in json.load(f)
  except (OSError, ValueError):
    return False


def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  base = {"host": socket.gethostname(), "pid": os.getpid(), "job_start": time.time(),
          "heartbeat": time.time(), "token": "other"}
  with open(os.path.join(workdir, "LOCK"), "w") as f:
    json.dump({**base, **record}, f)


def test_a_held_lock_refuses_a_second_job_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with lock_lib.WorkdirLock(workdir) as held:
    record = json.load(open(os.path.join(workdir, "LOCK")))
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["process_start"] == lock_lib._process_start_time(os.getpid())
    umask = os.umask(0)
    os.umask(umask)  # readable by the other jobs and users of a shared file system
    assert os.stat(os.path.join(workdir, "LOCK")).st_mode & 0o777 == 0o644 & ~umask
    with pytest.raises(ConfigError) as e:
      lock_lib.WorkdirLock(workdir).__enter__()
    message = str(e.value)
    assert message.startswith(f"workdir {workdir} is in use by another training job (pid "
                              f"{os.getpid()} on {socket.gethostname()}, started ")
    assert "\n" not in message
    assert held.record["token"] == record["token"]
  assert not os.path.exists(os.path.join(workdir, "LOCK"))  # released at exit


def _half_written(workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "LOCK"), "w") as f:
    f.write('{"host": "no')


@pytest.mark.parametrize("make_stale, reason", [
    (lambda w: _write_lock(w, pid=_dead_pid()), "no longer runs"),  # kill -9 on this host
    (lambda w: _write_lock(w, process_start="1"), "no longer runs"),  # pid now another process
    (lambda w: _write_lock(w, host="preempted-vm", heartbeat=time.time() - 3600),
     "no heartbeat for 3600 s"),
    (_half_written, "no heartbeat for"),  # the holder died while writing it
])
def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, capsys, make_stale, reason):
  workdir = str(tmp_path / "run")
  make_stale(workdir)
  with lock_lib.WorkdirLock(workdir) as held:
    assert json.load(open(os.path.join(workdir, "LOCK")))["token"] == held.token
  out = capsys.readouterr().out
  assert out.startswith(f"Taking over the stale lock {workdir}/LOCK of pid ") and reason in out
  assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("age", [30, 61, 300, 599])
def test_a_live_holder_on_another_host_is_respected(tmp_path, age):
  """A heartbeat is rewritten every 60 s and a lock is stale after 600 s without one: a holder
  that missed several beats (a slow file system, a long pause) is still alive until then."""
  assert (lock_lib.HEARTBEAT_SECONDS, lock_lib.STALE_SECONDS) == (60.0, 600.0)
  workdir = str(tmp_path / "run")
  _write_lock(workdir, host="node-7", pid=1234, heartbeat=time.time() - age)
  with pytest.raises(ConfigError, match="in use by another training job .pid 1234 on node-7"):
    lock_lib.WorkdirLock(workdir).__enter__()
  assert json.load(open(os.path.join(workdir, "LOCK")))["host"] == "node-7"  # untouched


def test_staleness_starts_just_after_the_limit():
  now = 1_000_000.0
  record = {"host": "node-7", "pid": 1234}
  assert lock_lib.stale_reason(dict(record, heartbeat=now - 600.0), now) is None
  assert lock_lib.stale_reason(dict(record, heartbeat=now - 601.0), now) == (
      "no heartbeat for 601 s (> 600 s)")


@pytest.mark.slow
def test_two_train_py_processes_on_one_workdir_one_trains(data_dir, tmp_path):
  """The same command twice into one new workdir: the second exits 2 with one line naming the
  first; the first's checkpoints and metrics.jsonl are those of one run. The first is paused
  (SIGSTOP) once its lock is written and resumed after the second has ended: with a warm
  compilation cache it would otherwise finish its 6 steps before the second has imported jax,
  and the second would find a free workdir."""
  workdir = str(tmp_path / "run")
  env = process_env()
  cmd = [sys.executable, "train.py", "--config=configs/digits_resnet_mrl.py:runlocal",
         f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
         "--config.total_steps=6", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=3"]
  first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not _lock_written(workdir):
    assert time.time() < deadline and first.poll() is None, first.communicate()[1][-2000:]
    time.sleep(0.05)
  os.kill(first.pid, signal.SIGSTOP)  # a live holder (its heartbeat is seconds old)
  try:
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
  finally:
    os.kill(first.pid, signal.SIGCONT)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  assert second.returncode == 2, second.stderr[-2000:]
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: workdir {workdir} is in use by another training job (pid {first.pid} on ")
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
           if "train/loss" in l]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert not os.path.exists(os.path.join(workdir, "LOCK"))


def test_a_held_workdir_is_refused_before_the_dataset_is_opened(tmp_path, monkeypatch):
  """The lock is the first thing a training job takes after checking its config: opening (or
  preparing) the dataset is never paid by a job that cannot run."""
  from mrl_jax import train_lib  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  opened = []
  monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: opened.append(a))
  workdir = str(tmp_path / "run")
  config = load_config("configs/digits_resnet_mrl.py:runlocal")
  with lock_lib.WorkdirLock(workdir):
    with pytest.raises(ConfigError, match="is in use by another training job"):
      train_lib.train_and_evaluate(config, workdir)
  assert not opened


def test_process_start_time_is_the_kernels_starttime_field():
  """proc(5): field 22 of /proc/<pid>/stat is the start time in clock ticks since boot (the
  command name, field 2, has no spaces for a python process); a finished pid has none."""
  with open("/proc/self/stat") as f:
    want = f.read().split()[21]
  assert lock_lib._process_start_time(os.getpid()) == want
  assert lock_lib._process_start_time(_dead_pid()) is None


def test_the_heartbeat_is_rewritten_while_the_job_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(lock_lib, "HEARTBEAT_SECONDS", 0.05)
  workdir = str(tmp_path / "run")
  with lock_lib.WorkdirLock(workdir) as held:
    time.sleep(0.5)
    record = json.load(open(os.path.join(workdir, "LOCK")))
    assert record["heartbeat"] > held.record["job_start"] + 0.2
    assert {k: v for k, v in record.items() if k != "heartbeat"} == {
        k: v for k, v in held.record.items() if k != "heartbeat"}
  assert not os.path.exists(os.path.join(workdir, "LOCK"))


def test_a_lock_another_job_took_over_is_not_removed_at_exit(tmp_path):
  workdir = str(tmp_path / "run")
  with lock_lib.WorkdirLock(workdir):
    _write_lock(workdir, token="the-new-holder")
  assert json.load(open(os.path.join(workdir, "LOCK")))["token"] == "the-new-holder"


def test_without_procfs_a_signal_probe_tells_whether_the_holder_runs(monkeypatch):
  monkeypatch.setattr(lock_lib, "_process_start_time", lambda pid: None)
  real_exists = os.path.exists
  monkeypatch.setattr(lock_lib.os.path, "exists", lambda p: p != "/proc" and real_exists(p))
  sent = []
  real_kill = os.kill

  def kill(pid, sig):  # records the probe; never delivers a real signal
    sent.append(sig)
    if sig != 0:
      raise AssertionError(f"signal {sig} sent to the lock holder {pid}")
    real_kill(pid, 0)

  monkeypatch.setattr(lock_lib.os, "kill", kill)
  assert lock_lib._alive_here({"pid": os.getpid()})
  assert not lock_lib._alive_here({"pid": _dead_pid()})
  assert not lock_lib._alive_here({"pid": "123"})  # not a pid
  assert sent == [0, 0]


def test_on_an_object_store_the_lock_is_written_then_read_back(tmp_path, monkeypatch):
  """No exclusive create on gs://: an existing lock refuses, a fresh one is written and held
  only if the record read back is this job's (another job's write in between wins)."""
  monkeypatch.setattr(lock_lib.paths, "is_remote", lambda p: True)
  workdir = str(tmp_path / "run")
  with lock_lib.WorkdirLock(workdir) as held:
    assert json.load(open(os.path.join(workdir, "LOCK")))["token"] == held.token
    with pytest.raises(ConfigError, match="in use by another training job"):
      lock_lib.WorkdirLock(workdir).__enter__()
  assert not os.path.exists(os.path.join(workdir, "LOCK"))
  racing = lock_lib.WorkdirLock(workdir)
  monkeypatch.setattr(racing, "_read", lambda: {"token": "a-faster-job"})
  assert not racing._create(racing._new_record())


def test_process_start_time_reads_past_a_parenthesis_in_the_command_name(tmp_path):
  """The command name (field 2) may contain ') ': the fields are counted after its last ')'."""
  link = tmp_path / "a) b"
  os.symlink(sys.executable, link)
  proc = subprocess.Popen([str(link), "-c", "import time; time.sleep(60)"])
  try:
    prefix, deadline = f"{proc.pid} (a) b) ", time.time() + 10
    while True:  # the name changes when exec completes
      with open(f"/proc/{proc.pid}/stat") as f:
        line = f.read()
      if line.startswith(prefix) or time.time() > deadline:
        break
      time.sleep(0.01)
    assert line.startswith(prefix), line[:40]
    assert lock_lib._process_start_time(proc.pid) == line[len(prefix):].split()[19]
  finally:
    proc.kill()
    proc.wait()


def test_every_process_of_a_job_stops_when_process_0_is_refused(tmp_path, monkeypatch):
  """Two processes: process 0 decides and broadcasts; the others raise too (simulated here:
  jax.process_count and the broadcast patched, each side run in turn)."""
  workdir = str(tmp_path / "run")
  _write_lock(workdir, host="node-7", pid=1234)  # a live holder on another host
  sent = []

  def broadcast(value):  # process 0's value reaches every process
    sent.append(int(value))
    return np.int32(0)

  monkeypatch.setattr(lock_lib.jax, "process_count", lambda: 2)
  monkeypatch.setattr(lock_lib.multihost_utils, "broadcast_one_to_all", broadcast)
  monkeypatch.setattr(lock_lib.utils, "is_main_process", lambda: False)
  with pytest.raises(ConfigError) as e:
    lock_lib.WorkdirLock(workdir).__enter__()
  assert str(e.value) == f"workdir {workdir} is in use by another training job"
  monkeypatch.setattr(lock_lib.utils, "is_main_process", lambda: True)
  with pytest.raises(ConfigError, match="pid 1234 on node-7"):
    lock_lib.WorkdirLock(workdir).__enter__()
  assert sent == [1, 0]  # process 1 had no refusal of its own; process 0 was refused
  monkeypatch.setattr(lock_lib.multihost_utils, "broadcast_one_to_all", lambda v: np.int32(1))
  monkeypatch.setattr(lock_lib.utils, "is_main_process", lambda: False)
  with lock_lib.WorkdirLock(workdir) as other:  # process 0 holds it: the others go on
    assert other.record is None and other._thread is None


def test_takeovers_that_keep_racing_give_up_after_three_tries(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  held = lock_lib.WorkdirLock(workdir)
  tries = []
  monkeypatch.setattr(held, "_create", lambda record: tries.append(1) and False)
  monkeypatch.setattr(held, "_read", lambda: {"host": "node-7", "heartbeat": 0})  # stale
  with pytest.raises(ConfigError, match="could not take the lock .*other jobs keep taking"):
    held.__enter__()
  assert len(tries) == 3


def test_a_job_that_exits_without_releasing_is_not_kept_alive_by_its_heartbeat(tmp_path):
  """The heartbeat thread is a daemon: an interpreter that exits while holding the lock (an
  error path that skips __exit__) ends instead of waiting for it forever."""
  script = ("import sys; from mrl_jax import lock; "
            f"lock.WorkdirLock({str(tmp_path / 'run')!r}).__enter__(); sys.exit(3)")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 3, proc.stderr[-2000:]


def test_an_error_inside_the_lock_propagates_and_releases_it(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="the job failed"):
    with lock_lib.WorkdirLock(workdir):
      raise RuntimeError("the job failed")
  assert not os.path.exists(os.path.join(workdir, "LOCK"))


def test_no_heartbeat_lands_after_the_lock_is_released(tmp_path, monkeypatch):
  """__exit__ waits for the heartbeat thread: a beat in flight must not rewrite the LOCK after
  its removal (a job that ended would then hold its workdir for 10 minutes)."""
  monkeypatch.setattr(lock_lib, "HEARTBEAT_SECONDS", 0.0002)
  workdir = str(tmp_path / "run")
  for _ in range(30):
    with lock_lib.WorkdirLock(workdir):
      time.sleep(0.005)
    time.sleep(0.005)
    assert not os.path.exists(os.path.join(workdir, "LOCK"))
