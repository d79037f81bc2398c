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
