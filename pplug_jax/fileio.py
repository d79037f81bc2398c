"""Small file helpers every writer shares: an atomic JSON write and a content hash.

All paths go through `storage`, so each helper works on local disk and on gs:// alike."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from pplug_jax import storage
from pplug_jax.errors import WorkdirError


def _dumps(obj: Any, indent: int | None) -> bytes:
  return json.dumps(obj, indent=indent, ensure_ascii=False).encode('utf-8')


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
  """Writes JSON whole, so a reader never sees half a file (locally a temporary file and a
  rename; on an object store one upload, which replaces the object atomically)."""
  storage.write_bytes(path, _dumps(obj, indent))


def record_or_check(path: str, identity: dict[str, Any], what: str, remedy: str,
                    write: bool = True) -> None:
  """Writes what a file set is made from (`identity`) the first time; later, refuses to reuse
  it if any entry changed, naming them, `what` was made and how to proceed (`remedy`).

  Every process checks (so all refuse alike); only the one with `write` records."""
  if write and storage.is_remote(path) and not storage.exists(path):
    storage.makedirs(storage.dirname(path))
    if storage.create_once(path, _dumps(identity, 1)) is not None:
      return  # written once (a generation precondition: no other writer can have raced us)
  if storage.exists(path):
    old = read_json(path)
    changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if changed:
      raise WorkdirError(f'{path}: {what} were made with other settings or inputs (changed: '
                         f'{", ".join(changed)}). {remedy}')
  elif write:
    storage.makedirs(storage.dirname(path) or '.')
    write_json(path, identity)


def read_json(path: str) -> Any:
  with storage.open(path, encoding='utf-8') as f:
    return json.load(f)


def sha256_of(paths: Iterable[str | None]) -> str:
  """One SHA-256 over the bytes of the given files, in order (None entries skipped)."""
  h = hashlib.sha256()
  for p in paths:
    if p:
      with storage.open(p, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
  return h.hexdigest()
