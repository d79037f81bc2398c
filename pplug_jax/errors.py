"""User-facing errors: bad input or settings, each message naming the file, id or config key.

A `UserError` is the user's to fix: the command-line entry points print its message alone and
exit with status 2 (`--verbose` adds the traceback). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input, files or settings; the message says what is wrong and what to do."""


class ConfigError(UserError):
  """Invalid config values; the message lists every problem with its config key."""


class RecordsError(UserError):
  """Precomputed records that are missing, corrupt or made from other inputs or settings."""


class WorkdirError(UserError):
  """A workdir that is in use by another run, or that holds a run with other settings."""
