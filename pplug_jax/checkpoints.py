"""Orbax checkpoints in a workdir: the last N in checkpoints/, the best by dev metric in best/."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pplug_jax import storage
from pplug_jax import fileio
from pplug_jax.errors import UserError, WorkdirError

CONFIG_FILE = 'config.json'


class CheckpointNotFound(UserError, FileNotFoundError):
  """No usable checkpoint; the message says where it looked and what to do."""


def manager(directory: str, keep: int, barrier_prefix: str,
            best_metric: str | None = None) -> ocp.CheckpointManager:
  """The one way a run keeps checkpoints: the last `keep` in `directory` (local or gs://), or
  with `best_metric` the `keep` best by that metric (larger is better). `barrier_prefix` names
  this manager's barriers, so that two managers saving at one step over several processes do
  not collide."""
  best = {} if best_metric is None else dict(best_fn=lambda m: m[best_metric], best_mode='max')
  return ocp.CheckpointManager(
      storage.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, **best,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=barrier_prefix)))


def managers(workdir: str, keep: int) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """The training job's: the last `keep` checkpoints, and the best one by dev score."""
  return (manager(os.path.join(workdir, 'checkpoints'), keep, 'latest'),
          manager(os.path.join(workdir, 'best'), 1, 'best', best_metric='score'))


class CheckpointSaveError(UserError):
  """An asynchronous checkpoint save failed: the run stops rather than train on unsaved."""


class SaveWatch:
  """Orbax saves in a background thread, and a failed save surfaces only at a later save or
  at the end: a run would train on, for another interval or to its end, with nothing saved.
  `check` (cheap: it looks at the finished saves) turns the first failure into one error that
  names the step folder and the cause. (orbax's own `check_for_errors` does not see a failed
  save until it is waited for; a finished save is waited for at no cost.)"""

  def __init__(self, *managers: ocp.CheckpointManager):
    self._saving = {id(m): (m, None) for m in managers}

  def save(self, manager: ocp.CheckpointManager, step: int, **kwargs) -> None:
    # orbax first waits for the save before, so its failure may surface here too
    with self._failure_as_error(manager, step, self._saving[id(manager)][1], step):
      manager.save(step, **kwargs)
    self._saving[id(manager)] = (manager, step)

  def check(self, step: int) -> None:
    """Raises CheckpointSaveError, at training step `step`, if a save has failed."""
    for manager, saved in self._saving.values():
      if saved is not None and not manager.is_saving_in_progress():
        with self._failure_as_error(manager, step, saved):
          manager.wait_until_finished()  # finished: returns at once, or raises its error

  def wait(self, step: int) -> None:
    for manager, saved in self._saving.values():
      with self._failure_as_error(manager, step, saved):
        manager.wait_until_finished()

  @staticmethod
  @contextlib.contextmanager
  def _failure_as_error(manager, step: int, *saved: int | None):
    """`saved`: the steps whose saves may have failed (the one before, the one begun)."""
    try:
      yield
    except Exception as e:  # orbax re-raises the save thread's error as it was
      steps = ' or '.join(str(s) for s in saved if s is not None) or str(step)
      where = os.path.join(str(manager.directory), steps)
      # all its lines: gcsfs puts the URL on the first and the reason on the next
      cause = ' '.join(line.strip() for line in str(e).splitlines() if line.strip())
      if len(cause) > 300:  # tensorstore's are long: keep the start and the OS error at its end
        cause = f'{cause[:120]} ... {cause[-170:]}'
      code = re.search(r"os_error_code='(\d+)'", cause)
      if code:  # the OS error in words, whatever the cut kept (the spec before it varies)
        cause += f': {os.strerror(int(code.group(1)))}'
      with contextlib.suppress(Exception):  # the save's other threads end (and log) first:
        manager.close()  # the error below is the last line a user sees
      newest = manager.latest_step()
      resume = ('it resumes from the newest finished checkpoint, step '
                f'{newest}' if newest is not None else 'no checkpoint is finished yet, so it '
                'starts again')
      raise CheckpointSaveError(
          f'saving the checkpoint {where} failed ({type(e).__name__}: {cause}). Training '
          f'stopped at step {step}. Fix the cause (space, permissions) and run the same '
          f'command again: {resume}.') from e


def save_args(state: Any, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def restore_args(abstract_state: Any) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                            meta=ocp.args.JsonRestore())


def find(workdir: str, which: str = 'best') -> tuple[str, int]:
  """(step directory, step) of the best (falling back to latest) or latest checkpoint."""
  order = ['best', 'checkpoints'] if which == 'best' else ['checkpoints']
  if which not in ('best', 'latest'):
    raise ValueError(f"checkpoint={which!r}: use 'best' or 'latest'.")
  for sub in order:
    folder = os.path.join(storage.abspath(workdir), sub)
    if not storage.isdir(folder):
      continue
    # newest first, finished ones only: on gs:// a save killed midway leaves a step folder
    # without orbax's commit_success.txt (locally it stays under a temporary name)
    for step in sorted((int(d) for d in storage.listdir(folder) if d.isdigit()), reverse=True):
      path = os.path.join(folder, str(step))
      if ocp.path.step.is_path_finalized(path):
        return path, step
  raise CheckpointNotFound(f'{workdir}: no finished checkpoint in {" or ".join(order)}/. Train '
                           'first: python -m pplug_jax.train --config ... --workdir ' + workdir)


def restore_on_this_host(state_dir: str) -> Any:
  """A saved state onto this process's first device, whatever mesh or hosts saved it."""
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(state_dir).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return checkpointer.restore(state_dir, target)


def load_params(workdir: str, which: str = 'best', attempts: int = 5) -> tuple[dict, int]:
  """The trainable params (plug, and the input encoder when fine-tuned) of a checkpoint, numpy.

  A checkpoint a training run rotates away while it is read is not an error: the newest
  finished one is read instead. Only one that stays in place and still cannot be read is.
  """
  for _ in range(attempts):
    path, step = find(workdir, which)
    try:
      state = restore_on_this_host(os.path.join(path, 'state'))
      break
    except Exception as e:  # rotated away mid-read, or a truncated or foreign directory
      error = e
      if find(workdir, which)[0] != path or not storage.isdir(path):
        time.sleep(0.2)  # replaced by a newer one (or deleted) meanwhile: read that one
        continue
      raise CheckpointNotFound(
          f'{path}: not a readable pplug_jax checkpoint ({e}). If a training run is writing '
          'this workdir, wait for it to finish; otherwise the files were damaged: move this '
          'step folder aside to use the one before it.') from e
  else:
    raise CheckpointNotFound(f'{workdir}: its checkpoints kept changing while being read '
                             f'({error}); a training run is rotating them. Wait for it to '
                             'finish, then try again.') from error
  if not isinstance(state, dict) or 'plug' not in state.get('params', {}):
    raise CheckpointNotFound(f'{path}: no plug params in this checkpoint.')
  return jax.tree.map(np.asarray, state['params']), step


# The config's list of keys that may change when a run resumes (logging, evaluation, data
# prefetch and placement, what runs after training): configs/lamp.py marks each where it is
# declared. Anything else changes the model, the data or the optimisation, and mixing two of
# those is refused. A config without the list resumes only when every key is the same.
RESUMABLE_KEYS = 'resumable_keys'


# Keys older versions wrote that no code reads any more: their presence changes nothing.
REMOVED_KEYS = ('plug.empty_history',)
# Keys newer versions added, with the value that trains what the older versions did: a
# config.json written before a key existed resumes under that value.
ADDED_KEYS = {'plug.pooling': 'attention', 'plug.instruction': True, 'plug.num_persona_tokens': 1,
              'plug.time_decay': 'none', 'plug.time_decay_init': 1e-3, 'data.history_cap': 0,
              'demo_data.scenario': 'stable'}


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every change between two configs (as JSON dicts) a resume forbids."""
  resumable = tuple(new.get(RESUMABLE_KEYS, ()))
  a, b = _flatten(old), _flatten(new)
  missing = '<absent>'
  changes = []
  for key in sorted(set(a) | set(b)):
    before, after = a.get(key, ADDED_KEYS.get(key, missing)), b.get(key, missing)
    if (before == after or key == RESUMABLE_KEYS or key in REMOVED_KEYS or
        any(key == r or key.startswith(r + '.') for r in resumable)):
      continue
    if key == 'optim.max_steps' and after != -1 and (before == -1 or after > before):
      continue  # training longer is fine; the schedule is laid over the new total
    changes.append(f'config.{key}: {before!r} -> {after!r}')
  return changes


def has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(storage.abspath(workdir), 'checkpoints')
  return storage.isdir(folder) and any(d.isdigit() for d in storage.listdir(folder))


def check_resume_config(workdir: str, config) -> None:
  """Refuses to resume a workdir's checkpoints with a config that trains something else."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not has_checkpoint(workdir) or not storage.exists(path):
    return
  with storage.open(path) as f:
    old = json.load(f)
  changes = config_changes(old, json.loads(config.to_json()))
  if changes:
    raise WorkdirError(f'{workdir} holds checkpoints of a run with another config; resuming '
                       'would mix two runs:\n  ' + '\n  '.join(changes) +
                       '\nSet these back to resume, or train in a new --workdir.')


def save_config(workdir: str, config) -> None:
  """Writes config.json atomically: a reader never sees it half-written."""
  fileio.write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()))


def load_config(workdir: str):
  """The config a workdir was trained with (written by train)."""
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    raise CheckpointNotFound(f'{workdir}: no {CONFIG_FILE}; is this a pplug_jax workdir?')
  with storage.open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
