"""One run per workdir: an advisory lock file holding the owner's pid, host and start time.

The lock is an `flock` on `<workdir>/.lock`: the kernel releases it when its process dies, so a
file left by a killed run is stale by construction and the next run simply takes it over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from pplug_jax.errors import WorkdirError

LOCK_FILE = '.lock'


class WorkdirLock:
  """Held for the life of a run; a second run in the same workdir gets a WorkdirError."""

  def __init__(self, workdir: str, command: str = 'train'):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.command = command
    self._fd: int | None = None

  def acquire(self) -> 'WorkdirLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.read(fd, 4096).decode(errors='replace')
      os.close(fd)
      try:
        o = json.loads(owner)
        who = f'{o["command"]} (pid {o["pid"]} on {o["host"]}, since {o["started"]})'
      except (ValueError, KeyError):
        who = 'another run'
      raise WorkdirError(f'{os.path.dirname(self.path)} is in use by {who}. Wait for it to '
                         'finish or stop it, or use another --workdir.') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'command': self.command, 'pid': os.getpid(),
                             'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
