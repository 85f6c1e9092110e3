"""Metric writers that write through the path layer: TensorBoard event files and metrics.jsonl.

clu's `SummaryWriter` writes event files with TensorFlow's own file system, which bypasses the
project's one path abstraction (`paths.py`). These two clu `MetricWriter`s write the same
records through it instead, so a `gs://` workdir is written exactly like a local one:

- `EventFileWriter`: TensorBoard's event-file format (TFRecord framing of `Event` protos, built
  with the `tensorboard` package, no TensorFlow), scalars as the scalar plugin writes them and
  hyperparameters as the hparams plugin does.
- `JsonlWriter`: big_vision's metrics file, one JSON record per `write_scalars` call
  (`{"step": s, "train/loss": ...}`), for tests and plotting. On a resume it first drops the
  records of steps after the resumed checkpoint, so a run resumed from an older checkpoint
  never holds a step twice.

Locally every write is appended and flushed; on a remote path (no appends on object stores) the
whole file is uploaded at most every `remote_flush_seconds` and on flush/close.
"""

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from mrl_jax import paths


class _FileSink:
  """Bytes or text appended to one file: appended locally, rewritten whole remotely."""

  def __init__(self, path, *, initial: bytes = b"", remote_flush_seconds: float = 30.0):
    self.path = paths.path(path)
    self.remote = paths.is_remote(self.path)
    self._content = bytearray(initial)  # remote: the whole file; local: not yet written
    self._remote_flush_seconds = remote_flush_seconds
    self._last_upload = 0.0
    self._dirty = bool(initial)
    if not self.remote:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "wb")  # pylint: disable=consider-using-with
      self._file.write(bytes(initial))
      self._file.flush()
      self._content = bytearray()

  def write(self, data: bytes) -> None:
    if not self.remote:
      self._file.write(data)
      self._file.flush()
      return
    self._content += data
    self._dirty = True
    if time.monotonic() - self._last_upload >= self._remote_flush_seconds:
      self.flush()

  def flush(self) -> None:
    if not self.remote:
      self._file.flush()
    elif self._dirty:
      paths.write_bytes(self.path, bytes(self._content))
      self._last_upload, self._dirty = time.monotonic(), False

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self._file.close()

  @property
  def closed(self) -> bool:
    return not self.remote and self._file.closed


def _scalar(value) -> float:
  return float(np.asarray(value))


class _Writer(metric_writers.MetricWriter):
  """The MetricWriter methods this project does not use: accepted and ignored."""

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_texts(self, step, texts):
    del step, texts

  def write_hparams(self, hparams):
    del hparams


class EventFileWriter(_Writer):
  """TensorBoard event file `events.out.tfevents.<time>.<host>.<pid>` in `logdir`."""

  def __init__(self, logdir, *, remote_flush_seconds: float = 30.0):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._sink = _FileSink(paths.join(logdir, name), remote_flush_seconds=remote_flush_seconds)
    self._records = RecordWriter(self._sink)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def _summary(self, step: int, summary) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._summary(step, scalar_summary.scalar_pb(key, _scalar(value)))

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._summary(step, text_summary.text_pb(key, value))

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._summary(0, hparams_summary.hparams_pb(dict(hparams)))

  def flush(self):
    self._sink.flush()

  def close(self):
    self._sink.close()


class JsonlWriter(_Writer):
  """One JSON line per write_scalars: {"step": step, **scalars}.

  `resume_step`: drop the records of later steps already in the file (a resume from an older
  checkpoint re-runs those steps); None starts a new file.
  """

  def __init__(self, path, *, resume_step: int | None = None,
               remote_flush_seconds: float = 30.0):
    kept = b""
    if resume_step is not None and paths.exists(path):
      lines = paths.read_text(path).splitlines(keepends=True)
      kept = "".join(l for l in lines if l.strip() and json.loads(l)["step"] <= resume_step
                     ).encode()
    self._sink = _FileSink(path, initial=kept, remote_flush_seconds=remote_flush_seconds)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
    self._sink.write((json.dumps(record, sort_keys=True) + "\n").encode())

  def flush(self):
    self._sink.flush()

  def close(self):
    self._sink.close()


def create(workdir, *, main_process: bool, resume_step: int | None = None,
           asynchronous: bool = True) -> metric_writers.MetricWriter:
  """Logging + TensorBoard + metrics.jsonl on the main process; logging elsewhere."""
  writers = [metric_writers.LoggingWriter()]
  if main_process:
    writers += [EventFileWriter(workdir),
                JsonlWriter(paths.join(workdir, "metrics.jsonl"), resume_step=resume_step)]
  return (metric_writers.AsyncMultiWriter(writers) if asynchronous
          else metric_writers.MultiWriter(writers))
