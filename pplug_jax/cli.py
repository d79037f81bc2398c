"""Entry-point plumbing shared by every command; it knows no job (the jobs import it).

- Config flags whose errors are one line: an unknown key names the closest valid one.
- A `UserError` (bad input, files or settings) prints its message alone and exits with status 2;
  `--verbose` shows the traceback first (still status 2). Other exceptions are bugs and keep
  theirs.
- `job`: a command that writes into --workdir checks every config value first, then holds the
  workdir's lock for its whole life.
- Quiet, tidy logs: orbax's per-save INFO lines stay out of the console, and log lines go
  through `tqdm.write` so they never cut a progress bar in half.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import logging as logging_std
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from pplug_jax import demo, partitioning, storage, validation
from pplug_jax.errors import UserError
from pplug_jax.workdir_lock import held

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
  """Prints a user error and exits with status 2. Background threads that are still running
  (orbax's save threads, after a failed save) end first, as they would at exit anyway, so
  that their log lines come before the error and not below it."""
  deadline = time.monotonic() + 30
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
      thread.join(max(0.0, deadline - time.monotonic()))
  gc.collect()  # and asyncio's unretrieved futures of those saves are logged now, not at exit
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _flat_keys(config, prefix: str = 'config') -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(f'{prefix}.{k}')
    if hasattr(v, 'items') and not isinstance(v, dict):
      keys.extend(_flat_keys(v, f'{prefix}.{k}'))
  return keys


def unknown_key_message(config, key: str) -> str | None:
  """'unknown config key …; the closest valid key is …', or None when `key` exists."""
  node = config
  for part in key.split('.')[1:]:
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      valid = _flat_keys(config)
      close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
      hint = f'; the closest valid key is {close[0]}' if close else ''
      return f'unknown config key {key}{hint}. See the README\'s "Config keys".'
  return None


def _config_value(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def missing_config_message(value: str) -> str | None:
  """'--config …: no such file here …' with where the file is, or None when it exists."""
  path = value.partition(':')[0]
  if not path or storage.isfile(path):
    return None
  ours = os.path.join(os.path.dirname(os.path.dirname(storage.abspath(__file__))), path)
  hint = (f', e.g. --config {ours}{value[len(path):]}' if not os.path.isabs(path) and
          storage.isfile(ours) else '')
  return (f'--config {value}: no file {path} in {os.getcwd()}. Run from the repository root '
          f'(the folder holding configs/), or give the config file\'s path{hint}.')


def _config_named_in(argv: list[str]) -> Any:
  """The ConfigDict that `--config FILE[:ARG]` in argv names, or None if it cannot be built."""
  import importlib.util
  value = _config_value(argv)
  if value is None:
    return None
  path, _, config_arg = value.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_pplug_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()
  except Exception:  # the flag parser's own error says what is wrong with it
    return None


def _flag_error(error: Exception, argv: list[str]) -> str:
  value = _config_value(argv)
  if value is not None and missing_config_message(value):
    return missing_config_message(value)
  config = _config_named_in(argv)
  if config is not None:
    for arg in argv[1:]:
      if arg.startswith('--config.'):
        message = unknown_key_message(config, arg[2:].split('=', 1)[0])
        if message:
          return message
  text = str(error).strip().strip('"').replace('\\n', ' ')
  return text.splitlines()[-1] if text else type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  value = _config_value(argv)
  if value is not None and missing_config_message(value):  # config_flags defers this error
    fail(missing_config_message(value))
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # unknown config keys, values of the wrong type, bad config args
    fail(_flag_error(e, argv))
    raise  # unreachable: fail exits


class _QuietOrbax(logging_std.Filter):
  """Keeps orbax's INFO lines out of the console; its warnings still show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or 'orbax' not in record.pathname


class _TqdmStream:
  """A stream that writes through tqdm, so log lines and progress bars don't interleave."""

  def write(self, text: str) -> None:
    tqdm.write(text, file=sys.stderr, end='')

  def flush(self) -> None:
    sys.stderr.flush()

  def close(self) -> None:  # stderr stays open; logging.shutdown calls this at exit
    pass


def tidy_logging() -> None:
  """Quiet orbax; route absl log lines around the progress bars."""
  handler = logging.get_absl_handler()
  handler.addFilter(_QuietOrbax())
  handler.python_handler.stream = _TqdmStream()
  # "Unable to initialize backend 'tpu'" on every machine without libtpu: INFO, not news.
  logging_std.getLogger('jax._src.xla_bridge').setLevel(logging_std.WARNING)


def _leave_distributed() -> None:
  """Every process finishes together; otherwise the first to exit takes the coordination
  service down under the others, which then abort."""
  if jax.distributed.is_initialized():
    partitioning.sync('exit')
    jax.distributed.shutdown()


def define_config(help_text: str = 'configs/lamp.py[:args], e.g. configs/lamp.py:demo',
                  required: bool = True) -> None:
  """The --config flag, the one definition every command uses: a config file and its argument,
  the ConfigDict locked (an unknown --config.KEY is an error naming the closest key)."""
  config_flags.DEFINE_config_file('config', None, help_text, lock_config=True)
  if required:
    flags.mark_flag_as_required('config')


def define_config_and_workdir(workdir_help: str, workdir_required: bool = True) -> None:
  """The --config and --workdir flags every job takes."""
  define_config()
  flags.DEFINE_string('workdir', None if workdir_required else '', workdir_help)
  if workdir_required:
    flags.mark_flag_as_required('workdir')


def check_workdir(path: str | None, flag: str = '--workdir') -> None:
  """A workdir (or output folder) flag names a folder, or nothing yet (on gs://, in a bucket
  that exists)."""
  if path:
    storage.check_bucket(path, flag)
  if path and storage.exists(path) and not storage.isdir(path):
    raise UserError(f'{flag}={path}: a file, not a folder. Give a folder (it is made if '
                    'missing).')


@contextlib.contextmanager
def job(command: str,
        check: Callable[[Any], list[str] | None] | None = None) -> Iterator[Any]:
  """--config for a job that writes into --workdir: every value checked in one pass, with
  `check` for the command's own flags and inputs (it returns its problems, or raises a
  UserError), before anything is written and listed together; then the workdir locked for
  the job's life; for the demo, its files made first, under the lock."""
  partitioning.maybe_initialize_distributed()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  problems = validation.config_problems(config)
  if check is not None:
    try:
      found = check(config)
    except UserError as e:
      found = [str(e)]
    if found is not None and not isinstance(found, list):  # a str would list its characters
      raise TypeError(f'{command}: its check returned {type(found).__name__}, not a list of '
                      'problems or None.')
    problems += found or []
  validation.refuse(problems)
  with held(workdir, command):
    if config.demo:  # the demo's own files, never a user's
      demo.prepare(config, workdir)
    yield config


def run(main: Callable[[list[str]], Any]) -> None:
  """app.run with friendly flag errors, tidy logs and user errors as one line + exit 2."""
  flags.DEFINE_bool('verbose', False, 'Show the traceback of user errors too.')

  def wrapped(argv: list[str]) -> Any:
    tidy_logging()
    # Random streams that do not depend on how arrays are sharded (as big_vision and MaxText
    # set it; this JAX's default too, pinned so a future default cannot change results).
    jax.config.update('jax_threefry_partitionable', True)
    try:
      if 'workdir' in flags.FLAGS:
        check_workdir(flags.FLAGS.workdir)
      result = main(argv)
    except UserError as e:
      if flags.FLAGS.verbose:
        traceback.print_exc()
      message = str(e)
    else:
      _leave_distributed()
      return result
    fail(message)  # outside the handler: the error's traceback (the failed work) is released

  app.run(wrapped, flags_parser=_parse_flags)
