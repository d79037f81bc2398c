"""Orbax checkpoints in a workdir: the last N in checkpoints/, the best by dev metric in best/."""

from __future__ import annotations

import json
import os
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


def managers(workdir: str, keep: int) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """The last `keep` checkpoints, and the best one by dev score.

  Each manager has its own barrier names: both save at an evaluation step, and with several
  processes orbax's barriers for the same step would otherwise collide.
  """
  root = storage.abspath(workdir)

  def sync(prefix):
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)

  latest = ocp.CheckpointManager(os.path.join(root, 'checkpoints'),
                                 options=ocp.CheckpointManagerOptions(
                                     max_to_keep=keep, create=True,
                                     multiprocessing_options=sync('latest')))
  best = ocp.CheckpointManager(os.path.join(root, 'best'), options=ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, best_fn=lambda m: m['score'], best_mode='max',
      multiprocessing_options=sync('best')))
  return latest, best


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
    steps = sorted(int(d) for d in storage.listdir(folder) if d.isdigit())
    if steps:
      return os.path.join(folder, str(steps[-1])), steps[-1]
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


# What may change when a run resumes: logging, evaluation, data prefetch and placement. Anything
# else changes the model, the data or the optimisation, and mixing two of those is refused.
RESUMABLE_CHANGES = ('train.log_every', 'train.eval_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.eval_batch_size', 'train.max_eval_batches',
                     'train.profile_steps',
                     'eval.', 'data.prefetch', 'data.rebuild_records', 'encoder.batch_size',
                     'encoder.dtype',  # only the records depend on it, and they check it
                     'mesh_shape', 'logical_axis_rules', 'demo_compare', 'demo_optimized',
                     'ropg.', 'rspg.')  # the optimised baselines check their own inputs


# Keys older versions wrote that no code reads any more: their presence changes nothing.
REMOVED_KEYS = ('plug.empty_history',)


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
  a, b = _flatten(old), _flatten(new)
  missing = '<absent>'
  changes = []
  for key in sorted(set(a) | set(b)):
    before, after = a.get(key, missing), b.get(key, missing)
    if before == after or key.startswith(RESUMABLE_CHANGES) or key in REMOVED_KEYS:
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
