"""TensorBoard scalars written in the caller's thread, so that a flush holds all of them.

tensorboardX's SummaryWriter hands each event to a writer thread and flushes every 120 s; its
flush() misses the events still queued, and a SIGKILL loses everything since the last timed
flush (on gs:// the whole event file, which exists only once uploaded). Here a scalar is written
when it is added, and the trainer flushes at each evaluation, each checkpoint and the end: after
a kill, the scalars up to the last checkpoint are in the file, on local disk and gs:// alike.
"""

from __future__ import annotations

import os
import time

from etils import epy

with epy.lazy_imports():  # tensorboardX loads torch where it is installed (~1.4 s)
  from tensorboardX import event_file_writer, summary
  from tensorboardX.proto import event_pb2

from pplug_jax import storage


class ScalarWriter:
  """One event file in `logdir` (named as TensorBoard expects); `enabled=False` writes nothing
  (the processes other than the first)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._events = None
    if enabled:
      storage.makedirs(logdir, exist_ok=True)
      self._events = event_file_writer.EventsWriter(os.path.join(logdir, 'events'))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    if self._events is not None:
      self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary.scalar(tag, float(value))))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes the file (on gs:// its upload ends here, not at interpreter exit)."""
    if self._events is not None:
      self._events.close()
      self._events = None
