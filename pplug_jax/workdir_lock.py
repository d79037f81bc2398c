"""One run per folder: an advisory lock file holding the owner's command, pid, host and start.

The lock is an `flock` on `<folder>/.lock`: the kernel releases it when its process dies, so a
file left by a killed run is stale by construction and the next run simply takes it over.
Every command that writes into a workdir takes its lock (`WorkdirLock`); precompute also takes
the records folder's (`records_lock`), since two workdirs may share one `data.records_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

from pplug_jax.errors import WorkdirError

LOCK_FILE = '.lock'


def entry_point() -> str:
  """The running command's name: 'train', 'baselines.utility', ... (else the program's name)."""
  path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else 'python'
  marker = f'{os.sep}pplug_jax{os.sep}'
  if path.endswith('.py') and marker in path:
    parts = path.rsplit(marker, 1)[1][:-3].split(os.sep)
    return '.'.join(parts[:-1] if parts[-1] == '__main__' else parts)
  return os.path.basename(path)


class WorkdirLock:
  """Held for the life of a run; a second run in the same folder gets a WorkdirError."""

  def __init__(self, workdir: str, command: str = 'train',
               remedy: str = 'Wait for it to finish or stop it, or use another --workdir.'):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.command = command
    self.remedy = remedy
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
      raise WorkdirError(f'{os.path.dirname(self.path)} is in use by {who}. '
                         f'{self.remedy}') from None
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


def records_lock(records_dir: str, workdir: str = '') -> WorkdirLock:
  """The lock of a records folder, held while records are written or deleted there."""
  command = f'{entry_point()} (records for --workdir {workdir})' if workdir else entry_point()
  return WorkdirLock(records_dir, command, 'Wait for it to finish or stop it, or set another '
                     'config.data.records_dir.')


@contextlib.contextmanager
def held(workdir: str, command: str) -> Iterator[None]:
  """The workdir's lock, taken by process 0 alone (it alone writes the shared files)."""
  import jax
  if not workdir or jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir, command):
    yield
