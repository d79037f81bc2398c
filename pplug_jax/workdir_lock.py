"""One run per folder: a lock holding the owner's command, pid, host and start.

Locally the lock is an `flock` on `<folder>/.lock`: the kernel releases it when its process
dies, so a file left by a killed run is stale by construction and the next run takes it over.
On Cloud Storage (no flock) it is the object `<folder>/.lock`, created only if absent (a
generation precondition) and rewritten every `HEARTBEAT_S` seconds with the time of its last
heartbeat. A lock is stale when its heartbeat is older than `STALE_S`, or when it names this
host and a pid that is no longer running; a stale lock is replaced (again under a precondition,
so two runs cannot both take it). Every command that writes into a workdir takes its lock
(`WorkdirLock`); precompute also takes the records folder's (`records_lock`), since two
workdirs may share one `data.records_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

from absl import logging

from pplug_jax import partitioning, storage
from pplug_jax.errors import WorkdirError

LOCK_FILE = '.lock'
# Object-store locks: heartbeat period and the age after which a lock is stale (seconds);
# the environment may shorten them (tests do).
HEARTBEAT_S = float(os.environ.get('PPLUG_JAX_LOCK_HEARTBEAT_S', 30))
STALE_S = float(os.environ.get('PPLUG_JAX_LOCK_STALE_S', 300))


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
    self.path = storage.join(workdir, LOCK_FILE)
    self.command = command
    self.remedy = remedy
    self._fd: int | None = None
    self._generation: int | None = None
    self._stop = threading.Event()
    self._beat: threading.Thread | None = None

  def _owner(self) -> dict:
    return {'command': self.command, 'pid': os.getpid(), 'host': socket.gethostname(),
            'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'heartbeat': time.time()}

  def _refuse(self, owner: dict | None, extra: str = '') -> WorkdirError:
    try:
      who = (f'{owner["command"]} (pid {owner["pid"]} on {owner["host"]}, since '
             f'{owner["started"]})')
    except (TypeError, KeyError):
      who = 'another run'
    return WorkdirError(f'{storage.dirname(self.path)} is in use by {who}{extra}. {self.remedy}')

  def acquire(self) -> 'WorkdirLock':
    if storage.is_remote(self.path):
      return self._acquire_object()
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      data = os.read(fd, 4096)
      os.close(fd)
      try:
        owner = json.loads(data)
      except ValueError:
        owner = None
      raise self._refuse(owner) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'command': self.command, 'pid': os.getpid(),
                             'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
    self._fd = fd
    return self

  def _acquire_object(self) -> 'WorkdirLock':
    for _ in range(3):
      mine = self._owner()
      gen = storage.create_once(self.path, json.dumps(mine).encode())
      if gen is not None:
        self._generation = gen
        self._owner_record = mine
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name='lock-heartbeat')
        self._beat.start()
        return self
      held = storage.read_generation(self.path)
      if held is None:
        continue  # released between our two calls: try again
      data, gen = held
      try:
        owner = json.loads(data)
      except ValueError:
        owner = None
      stale = _stale_reason(owner)
      if not stale:
        age = time.time() - float(owner.get('heartbeat', 0))
        raise self._refuse(owner, f', last heartbeat {age:.0f} s ago (stale after {STALE_S:.0f} s)')
      logging.warning('%s: taking over a stale lock (%s): %s', self.path, stale, data.decode(
          errors='replace'))
      storage.delete_if(self.path, gen)  # a precondition: a lock renewed meanwhile survives
    raise self._refuse(None, ' (the lock changed hands while this run tried to take it)')

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      self._owner_record['heartbeat'] = time.time()
      gen = storage.replace_if(self.path, json.dumps(self._owner_record).encode(),
                               self._generation)
      if gen is None:
        logging.error('%s: this run lost its lock (another run replaced it as stale). Stop one '
                      'of the two runs: both now write into the same folder.', self.path)
        return
      self._generation = gen

  def release(self) -> None:
    if self._beat is not None:
      self._stop.set()
      self._beat.join()
      self._beat = None
      storage.delete_if(self.path, self._generation)
      self._generation = None
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _stale_reason(owner: dict | None) -> str:
  """Why an object-store lock's owner is gone ('' while it is alive)."""
  if not isinstance(owner, dict):
    return 'unreadable'
  age = time.time() - float(owner.get('heartbeat', 0))
  if age > STALE_S:
    return f'no heartbeat for {age:.0f} s'
  if owner.get('host') == socket.gethostname():
    try:
      os.kill(int(owner['pid']), 0)
    except ProcessLookupError:
      return f'pid {owner["pid"]} on this host is not running'
    except (PermissionError, KeyError, ValueError):
      pass
  return ''


def records_lock(records_dir: str, workdir: str = '') -> WorkdirLock:
  """The lock of a records folder, held while records are written or deleted there."""
  command = f'{entry_point()} (records for --workdir {workdir})' if workdir else entry_point()
  return WorkdirLock(records_dir, command, 'Wait for it to finish or stop it, or set another '
                     'config.data.records_dir.')


@contextlib.contextmanager
def held(workdir: str, command: str) -> Iterator[None]:
  """The workdir's lock, taken by process 0 alone (it alone writes the shared files)."""
  if not workdir or not partitioning.is_main_process():
    yield
    return
  storage.makedirs(workdir)
  with WorkdirLock(workdir, command):
    yield
