"""The training job: the persona plug trained on a frozen, sharded backbone, evaluated on dev.

Run by `python -m pplug_jax.train` (the entry) and by `pplug_jax.ablate` per variant. Resumes
from the latest checkpoint in DIR/checkpoints; the best one by the task's main dev metric is
kept in DIR/best.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
from etils import epy

with epy.lazy_imports():  # TensorFlow (and the Keras it loads) takes ~4 s: only when used
  import tensorflow as tf
from absl import logging

from pplug_jax import (checkpoints, demo, fileio, flops as flops_lib, generation, partitioning,
                       precompute, steploop, storage, system as system_lib, validation)
from pplug_jax.scalars import ScalarWriter
from pplug_jax.data import lamp, pipeline, records
from pplug_jax.errors import ConfigError, RecordsError, WorkdirError
from pplug_jax.models import plug as plug_lib
from pplug_jax.workdir_lock import held, records_lock


def input_problems(config, workdir: str) -> list[str]:
  """What training reads is named and there: each missing one names the config key to set."""
  storage.check_config_buckets(config)
  records_path = records.records_dir(config, workdir)
  have_records = storage.exists(os.path.join(records_path, records.METADATA))
  problems = []
  files = 'config.json, model.safetensors and the tokenizer files'
  if not config.llm.path or not storage.isdir(config.llm.path):
    problems.append(f'config.llm.path={config.llm.path!r}: download {config.llm.name} as a '
                    f'Hugging Face directory ({files}) and set it.')
  if not have_records or config.encoder.mode == 'finetune':
    if not config.encoder.path or not storage.isdir(config.encoder.path):
      problems.append(f'config.encoder.path={config.encoder.path!r}: download '
                      f'{config.encoder.name} ({files}) and set it.')
  if not have_records and not (config.data.lamp_dir and storage.isdir(config.data.lamp_dir)):
    problems.append(f'config.data.lamp_dir={config.data.lamp_dir!r}: download LaMP '
                    f'({config.task}) and set it, or set config.data.records_dir to records '
                    'made by pplug_jax.precompute.')
  if problems:
    problems[-1] += '\nWith nothing downloaded, run the demo: --config configs/lamp.py:demo'
  return problems


def _records_complete(records_path: str) -> bool:
  if not storage.exists(os.path.join(records_path, records.METADATA)):
    return False
  meta = records.read_metadata(records_path)
  return bool(meta.get('splits')) and all(
      len(records.split_shards(records_path, s)) == len(info['shard_counts'])
      for s, info in meta['splits'].items())


USERS_FILE = 'used_by.json'  # in a records folder: the workdirs that train on these records


def _users(records_path: str) -> list[str]:
  path = os.path.join(records_path, USERS_FILE)
  return list(fileio.read_json(path)) if storage.exists(path) else []


def _register_user(records_path: str, workdir: str) -> None:
  """Notes that `workdir` trains on these records, so no other run's rebuild deletes them."""
  users = _users(records_path)
  if storage.abspath(workdir) not in users:
    fileio.write_json(os.path.join(records_path, USERS_FILE),
                      users + [storage.abspath(workdir)])


def _rebuild(config, workdir: str, records_path: str, why: RecordsError) -> None:
  """Deletes records made from other inputs (config.data.rebuild_records), unless this
  workdir's checkpoints were trained on them or another run's workdir uses them."""
  if checkpoints.has_checkpoint(workdir):
    raise WorkdirError(f'config.data.rebuild_records=True: {workdir} holds checkpoints trained '
                       f'on the records being replaced ({why}). Resuming them on new records '
                       'would mix two runs: train in a new --workdir.') from None
  with records_lock(records_path, workdir):
    others = [w for w in _users(records_path)
              if w != storage.abspath(workdir) and storage.isdir(w)]
    if others:
      raise WorkdirError(f'config.data.rebuild_records=True: {records_path} holds the records '
                         f'the run in {others[0]} trains and evaluates on; rebuilding them would '
                         'change its data. Set a new config.data.records_dir for this run.')
    logging.warning('%s: records made from other inputs; deleting %d files to rebuild them '
                    '(config.data.rebuild_records).', records_path,
                    precompute.delete_records(records_path))
    fileio.write_json(os.path.join(records_path, USERS_FILE), [])


def prepare_records(config, workdir: str, records_path: str) -> dict[str, Any]:
  """Records made from exactly these inputs and settings: verified, rebuilt or made; metadata."""
  try:
    precompute.verify_records(config, records_path)
  except RecordsError as e:
    if not config.data.rebuild_records:
      raise
    if partitioning.is_main_process():
      _rebuild(config, workdir, records_path, e)
  partitioning.sync('records checked')  # every process decides on the same files
  if not _records_complete(records_path):
    precompute.check_llm_weights(config, required=True)  # before the long encoding
    logging.info('Precomputing encoder embeddings into %s', records_path)
    precompute.run(config, workdir)  # each process encodes its own shards
  if partitioning.is_main_process():
    _register_user(records_path, workdir)
  return records.read_metadata(records_path)


# (config, workdir, mesh, evaluate(params, persona=..., desc=...), trained params, dev metrics)
# -> entries added to the result: an experiment on the trained plug, such as the demo's Table 1
AfterTraining = Callable[[Any, str, Any, Callable, dict, dict], dict]


def train_and_evaluate(config, workdir: str,
                       after_training: AfterTraining | None = None) -> dict[str, Any]:
  """Trains, evaluates on dev and returns the final metrics, with what `after_training` adds."""
  partitioning.maybe_initialize_distributed()
  tf.config.set_visible_devices([], 'GPU')
  # Every value and (but for the demo, which makes its own) every input, in one pass.
  validation.refuse(validation.config_problems(config) +
                    ([] if config.demo else input_problems(config, workdir)))
  storage.makedirs(workdir, exist_ok=True)
  with held(workdir, 'train'):  # process 0 takes the lock
    return _train_and_evaluate(config, workdir, after_training)


@dataclasses.dataclass
class _Setup:
  """What set-up makes: checked inputs, records, mesh, the loaded system and the optimiser."""
  records_path: str
  task_spec: Any
  mesh: Any
  system: Any
  n_train: int
  total_steps: int
  tx: Any
  schedule: Callable[[int], Any]


@dataclasses.dataclass
class _Compiled:
  """What compile-or-restore makes: a compiled step per bucket shape, its FLOPs, the state
  (restored or new) and the checkpoint managers."""
  steps_by_shape: dict
  step_flops: dict
  plan: Any
  peak: float
  state: Any
  start_step: int
  manager: Any
  best: Any
  saves: checkpoints.SaveWatch


def _train_and_evaluate(config, workdir: str,
                        after_training: AfterTraining | None) -> dict[str, Any]:
  setup = _set_up(config, workdir)
  compiled = _compile_or_restore(config, workdir, setup)
  generator = generation.SplitGenerator(setup.system, config)  # compiled once, for every eval

  def evaluate(trainable, persona=True, desc='dev'):
    out = generator.generate_split(trainable, setup.records_path, 'dev',
                                   config.train.eval_batch_size, persona=persona,
                                   max_batches=config.train.max_eval_batches, desc=desc)
    return generation.score(setup.task_spec.name, out)

  state, step, last_eval, train_seconds = _loop(config, workdir, setup, compiled, evaluate)
  return _finish(config, workdir, setup, compiled, evaluate, after_training, state, step,
                 last_eval, train_seconds)


def _set_up(config, workdir: str) -> _Setup:
  """Checks the inputs, makes or checks the records, saves the config, loads the system and
  counts the steps."""
  if config.demo:
    demo.prepare(config, workdir)
  validation.refuse(input_problems(config, workdir))  # the demo's, now made
  records_path = records.records_dir(config, workdir)
  validation.check_splits(config, records_path)
  config.data.num_streams = pipeline.num_streams(config)  # recorded: it fixes the data order
  checkpoints.check_resume_config(workdir, config)
  partitioning.sync('config checked')  # every process has read the old config.json
  if partitioning.is_main_process():
    checkpoints.save_config(workdir, config)
  meta = prepare_records(config, workdir, records_path)
  mesh = partitioning.make_mesh(config.mesh_shape)
  logging.info('Mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(),
               jax.process_count())
  system = system_lib.load_system(config, meta['fingerprint']['dim'], mesh)
  logging.info('Backbone %s: %d frozen params; persona scale %.3f, instruction scale %.3f',
               config.llm.name, plug_lib.count_params(system.llm_params),
               system.plug.persona_scale, system.plug.instruction_scale)
  per_step = config.optim.batch_size * config.optim.grad_accum
  n_train = pipeline.num_train_examples(config, records_path)
  total_steps = config.optim.max_steps if config.optim.max_steps > 0 else \
      (n_train * config.optim.epochs) // per_step
  if total_steps <= 0:
    raise ConfigError(f'{n_train} training examples x {config.optim.epochs} epochs give no step '
                      f'of {per_step} examples; lower config.optim.batch_size or '
                      'config.optim.grad_accum.')
  tx, schedule = system_lib.build_optimizer(config, total_steps)
  return _Setup(records_path, lamp.task_spec(config.task), mesh, system, n_train, total_steps,
                tx, schedule)


def _compile_or_restore(config, workdir: str, setup: _Setup) -> _Compiled:
  """Compiles every bucket's step up front (no compile after the start), then restores the
  latest checkpoint or initialises the state."""
  system = setup.system
  init_state = system_lib.init_state_fn(system, setup.tx, config.seed)
  abstract = jax.eval_shape(init_state)
  plan = pipeline.train_buckets(config, setup.records_path, config.data.num_streams)
  steps_by_shape = {}
  for shape, share in zip(plan[0].shapes, plan[1]):
    compiled, state_sharding, _ = system_lib.compile_train_step(
        system, setup.tx, abstract, config, shape)
    steps_by_shape[shape] = compiled
    mem = system_lib.memory_summary(compiled)
    logging.info('Train step for input x target length %d x %d (%.1f%% of the steps) compiled; '
                 'memory per device (AOT): arguments %.1f MiB, outputs %.1f MiB, temporaries '
                 '%.1f MiB, generated code %.1f MiB', *shape, 100 * share,
                 *(mem.get(k, 0.0) * 1024 for k in ('arguments', 'outputs', 'temporaries',
                                                     'code')))
  # model FLOPs of each bucket's step (analytic, as MFU counts them) and the devices' peak
  step_flops = {shape: flops_lib.train_step_flops(system, config, shape)
                for shape in steps_by_shape}
  peak, peak_source = flops_lib.peak_flops_per_device()
  logging.info('MFU is against %s per device (%s)',
               f'{peak / 1e12:.2f} TFLOP/s' if peak else 'no peak', peak_source)
  manager, best = checkpoints.managers(workdir, config.train.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
    restored = manager.restore(latest, args=checkpoints.restore_args(target))
    state = restored['state']
    logging.info('Resumed from %s at step %d', manager.directory, latest)
  else:
    state = jax.jit(init_state, out_shardings=state_sharding)()
  # One global batch per step, so the data position is the step: a resume skips that many.
  return _Compiled(steps_by_shape, step_flops, plan, peak, state, int(state['step']), manager,
                   best, checkpoints.SaveWatch(manager, best))


def _loop(config, workdir: str, setup: _Setup, compiled: _Compiled,
          evaluate: Callable) -> tuple[Any, int, dict, float]:
  """The steps, with the hooks: the loss checked, throughput and MFU logged, dev evaluated and
  the best kept, checkpoints saved. Returns the state, the step, the last dev metrics and the
  seconds of training alone (evaluations and saves left out)."""
  system, mesh, total_steps = setup.system, setup.mesh, setup.total_steps
  task_spec, start_step = setup.task_spec, compiled.start_step
  accum, micro = pipeline.step_layout(config)
  per_step = micro * accum
  main_process = partitioning.is_main_process()
  writer = ScalarWriter(os.path.join(workdir, 'tensorboard'), enabled=main_process)
  batches = pipeline.train_batches(config, setup.records_path, per_step // jax.process_count(),
                                   skip_batches=start_step, accum=accum, plan=compiled.plan)
  logging.info('Training %d steps (%d examples per epoch incl. augmentation, %d per step) from '
               'step %d', total_steps, setup.n_train, per_step, start_step)
  profiler = steploop.Profiler(config.train.profile_steps, os.path.join(workdir, 'profile'))
  profiler.check_reachable(start_step, total_steps)
  # seen examples, model FLOPs, real tokens, seconds paused, the step whose loss is unchecked
  tally = {'seen': 0, 'flops': 0.0, 'tokens': 0, 'paused': 0.0, 'pending': None, 'eval': {}}
  t0 = time.time()

  def step_fn(state, batch):
    micro_batches = pipeline.as_micro_batches(batch, accum)
    global_batch = partitioning.to_global(micro_batches, mesh, system.rules, leading=1)
    shape = (batch['input_ids'].shape[-1], batch['target_ids'].shape[-1])
    state, metrics = compiled.steps_by_shape[shape](state, system.llm_params, global_batch)
    # real (unpadded) input and target tokens of this process's batch; over several processes
    # an estimate (x processes: their batches are alike in size, not in padding)
    tokens = int(batch['input_mask'].sum() + batch['target_mask'].sum()) * jax.process_count()
    return state, (metrics, shape, tokens)

  def account(step, state, outputs):
    metrics, shape, tokens = outputs
    if tally['pending'] is not None:  # the previous step's loss, without stalling this one
      _check_finite(*tally['pending'])
    tally['pending'] = (metrics['loss'], step)
    tally['seen'] += per_step
    tally['flops'] += compiled.step_flops[shape]
    tally['tokens'] += tokens

  def log(step, state, outputs):
    loss = float(outputs[0]['loss'])
    _check_finite(loss, step)
    elapsed = time.time() - t0 - tally['paused']  # training alone
    rate = tally['seen'] / elapsed
    eta = (total_steps - step) * per_step / max(rate, 1e-9)
    lr = float(setup.schedule(step))
    tflops = tally['flops'] / elapsed / jax.device_count() / 1e12  # model TFLOP/s per device
    peak = compiled.peak
    mfu = f' MFU {100 * tflops * 1e12 / peak:.1f}%' if peak else ''
    logging.info('step %d/%d loss %.4f lr %.2e grad_norm %.3f %.1f examples/s %.0f tokens/s '
                 '%.3f TFLOP/s/device%s ETA %.0fs', step, total_steps, loss, lr,
                 float(outputs[0]['grad_norm']), rate, tally['tokens'] / elapsed, tflops, mfu,
                 eta)
    writer.add_scalar('train/loss', loss, step)
    writer.add_scalar('train/lr', lr, step)
    writer.add_scalar('train/examples_per_second', rate, step)
    writer.add_scalar('train/tokens_per_second', tally['tokens'] / elapsed, step)
    writer.add_scalar('train/model_tflops_per_device', tflops, step)
    if peak:
      writer.add_scalar('train/mfu', tflops * 1e12 / peak, step)

  def score_of(m):  # larger is better, for the best checkpoint
    return m[task_spec.main_metric] if task_spec.metric_mode == 'max' else -m[task_spec.main_metric]

  def evaluate_and_keep_best(step, state, outputs):
    began = time.time()
    tally['eval'] = evaluate(state['params'])
    logging.info('step %d dev: %s', step, _fmt(tally['eval']))
    for k, v in tally['eval'].items():
      writer.add_scalar(f'dev/{k}', v, step)
    writer.flush()
    compiled.saves.save(compiled.best, step,
                        args=checkpoints.save_args(state, {'step': step, 'dev': tally['eval']}),
                        metrics={'score': float(score_of(tally['eval']))})
    tally['paused'] += time.time() - began

  def checkpoint(step, state, outputs):
    began = time.time()
    writer.flush()  # the scalars up to a checkpoint outlive a kill
    compiled.saves.save(compiled.manager, step,
                        args=checkpoints.save_args(state, {'step': step, 'seed': config.seed}))
    tally['paused'] += time.time() - began

  def exhausted():  # the data repeats endlessly, so only empty shards can end it
    return RecordsError(f'{setup.records_path}: process {jax.process_index()} has no training '
                        'examples in its shard files; make the records with more examples '
                        'than config.data.num_shards.')

  hooks = (steploop.Every(1, account), steploop.Every(config.train.log_every, log),
           steploop.Every(config.train.eval_every, evaluate_and_keep_best),
           steploop.Every(config.train.checkpoint_every, checkpoint))
  try:
    state, step = steploop.run_steps(step_fn, compiled.state, batches, start=start_step,
                                     total=total_steps, desc='train', hooks=hooks,
                                     saves=compiled.saves, profiler=profiler,
                                     exhausted=exhausted)
  finally:
    writer.close()  # the scalars so far are kept, whatever ended the loop
  if tally['pending'] is not None:
    _check_finite(*tally['pending'])
  train_seconds = time.time() - t0 - tally['paused']  # this run's steps alone
  compiled.saves.wait(step)
  return state, step, tally['eval'], train_seconds


def _finish(config, workdir: str, setup: _Setup, compiled: _Compiled, evaluate: Callable,
            after_training: AfterTraining | None, state: Any, step: int, last_eval: dict,
            train_seconds: float) -> dict[str, Any]:
  """The final dev metrics (and the persona-zeroed ablation), the experiment after training,
  and train_result.json."""
  result = {'step': step, 'dev': last_eval or evaluate(state['params'])}
  if step > compiled.start_step:  # the step time of this run (a resumed one: of its own steps)
    result['train_ms_per_step'] = 1000 * train_seconds / (step - compiled.start_step)
  if config.train.get('eval_persona_zeroed', False):  # the ablation: what the history adds
    result['dev_persona_zeroed'] = evaluate(state['params'], persona=False,
                                            desc='dev, persona zeroed')
  if after_training is not None:
    result.update(after_training(config, workdir, setup.system.mesh, evaluate, state['params'],
                                 result['dev']))
  if partitioning.is_main_process():
    fileio.write_json(os.path.join(workdir, 'train_result.json'), result)
  return result


def _check_finite(loss, step: int) -> None:
  value = float(loss)
  if not math.isfinite(value):
    raise SystemExit(f'Training stopped: the loss is {value} at step {step}. Lower '
                     'config.optim.lr, check the data, or use float32 (config.llm.dtype). '
                     'The last good checkpoint is kept in the workdir.')


def _fmt(m: dict) -> str:
  return ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in m.items())
