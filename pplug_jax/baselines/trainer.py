"""The training loop ROPG's retrievers and RSPG's selectors share: a BERT trained with optax.

As the paper trains them (Salemi et al., SIGIR 2024): Adam, gradients clipped at global norm
1.0, linear warm-up over the first 5 % of the steps then linear decay to 0 (LaMP's
`WarmupLinearScheduler`), whole batches only (`drop_last`). The step is jitted once for one
static batch shape. The example order of epoch e is a permutation seeded by (seed, e), so a run
that stops resumes at the exact batch from its orbax checkpoint (`<run_dir>/checkpoints/`). A run
directory records the settings and input files it was made from and refuses to resume from
others.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from pplug_jax import checkpoints, fileio, partitioning, steploop, system as system_lib
from pplug_jax.errors import ConfigError

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FitSettings:
  """How long and how fast to train; `section` names the config section for messages."""
  section: str
  lr: float
  batch_size: int
  epochs: int
  warmup_frac: float
  grad_clip: float
  checkpoint_every: int
  seed: int

  @classmethod
  def from_config(cls, config, section: str) -> 'FitSettings':
    s = config[section]
    return cls(section, float(s.lr), int(s.batch_size), int(s.epochs), float(s.warmup_frac),
               float(s.grad_clip), int(s.checkpoint_every), int(config.seed))


def optimizer(settings: FitSettings, total_steps: int) -> optax.GradientTransformation:
  """Adam with global-norm clipping, linear warm-up then linear decay to zero (the schedule
  and rounding of the plug's optimiser)."""
  schedule = system_lib.warmup_linear_schedule(settings.lr, settings.warmup_frac, total_steps)
  return optax.chain(optax.clip_by_global_norm(settings.grad_clip), optax.adam(schedule))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def fit(loss_fn: LossFn, params: Any, data: dict[str, np.ndarray], settings: FitSettings,
        run_dir: str, identity: dict[str, Any], mesh: jax.sharding.Mesh,
        rules, desc: str) -> tuple[Any, list[float]]:
  """Trains `params` on `data` (arrays with one row per example); returns them and the losses.

  `loss_fn(params, batch, rng)` gets one global batch; `rng` differs per step (dropout,
  sampling) and is derived from the seed and the step alone.
  """
  n = len(next(iter(data.values())))
  steps_per_epoch = n // settings.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'config.{settings.section}.batch_size={settings.batch_size} is larger '
                      f'than the {n} training examples; lower it.')
  if settings.batch_size % mesh.shape['data']:
    raise ConfigError(f'config.{settings.section}.batch_size={settings.batch_size} must be a '
                      f'multiple of the {mesh.shape["data"]} data-parallel devices.')
  total = steps_per_epoch * settings.epochs
  identity = dict(identity, settings=dataclasses.asdict(settings), examples=n)
  fileio.record_or_check(os.path.join(run_dir, 'run.json'), identity, 'its checkpoints',
                         f'Delete {run_dir} to train again, or use another --workdir.',
                         write=partitioning.is_main_process())
  partitioning.sync(f'{desc} run dir')
  tx = optimizer(settings, total)
  replicated = partitioning.replicated(mesh)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  state = jax.device_put(state, replicated)
  manager = checkpoints.manager(os.path.join(run_dir, 'checkpoints'), keep=1,
                                barrier_prefix=desc)
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info('%s: resumed at step %d of %d', desc, int(state['step']), total)
  saves = checkpoints.SaveWatch(manager)
  base_key = jax.random.PRNGKey(settings.seed)

  @jax.jit
  def train_step(state, batch):
    rng = jax.random.fold_in(base_key, state['step'])
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], batch, rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
            'step': state['step'] + 1}, loss

  def batches(step: int):
    while True:
      epoch, offset = divmod(step, steps_per_epoch)
      rows = epoch_order(settings.seed, epoch, n)[offset * settings.batch_size:
                                                  (offset + 1) * settings.batch_size]
      yield {k: partitioning.global_from_host(mesh, rules, v[rows]) for k, v in data.items()}
      step += 1

  losses: list[jax.Array] = []  # read back once at the end: no host sync per step
  start = time.time()
  state, step = steploop.run_steps(
      train_step, state, batches(int(state['step'])), start=int(state['step']), total=total,
      desc=desc, saves=saves, loss_of=lambda loss: loss, show_loss_every=10,
      hooks=(steploop.Every(1, lambda step, state, loss: losses.append(loss)),
             steploop.Every(settings.checkpoint_every, lambda step, state, _: saves.save(
                 manager, step, args=ocp.args.StandardSave(state)))))
  saves.wait(step)
  logging.info('%s: %d steps (%d epochs of %d examples) in %.1fs', desc, total, settings.epochs,
               n, time.time() - start)
  return jax.device_get(state['params']), [float(x) for x in jax.device_get(losses)]
