"""Small file helpers every writer shares: an atomic JSON write and a content hash."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
  """Writes JSON through a temporary file and a rename, so a reader never sees half a file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=indent, ensure_ascii=False)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def record_or_check(path: str, identity: dict[str, Any], what: str, remedy: str,
                    write: bool = True) -> None:
  """Writes what a file set is made from (`identity`) the first time; later, refuses to reuse
  it if any entry changed, naming them, `what` was made and how to proceed (`remedy`).

  Every process checks (so all refuse alike); only the one with `write` records."""
  from pplug_jax.errors import WorkdirError
  if os.path.exists(path):
    old = read_json(path)
    changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if changed:
      raise WorkdirError(f'{path}: {what} were made with other settings or inputs (changed: '
                         f'{", ".join(changed)}). {remedy}')
  elif write:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    write_json(path, identity)


def read_json(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def sha256_of(paths: Iterable[str | None]) -> str:
  """One SHA-256 over the bytes of the given files, in order (None entries skipped)."""
  h = hashlib.sha256()
  for p in paths:
    if p:
      with open(p, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
  return h.hexdigest()
