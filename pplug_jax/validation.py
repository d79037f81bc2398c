"""Checks a config and its data in seconds, before any long work, listing every problem at once.

`check_config` covers values and their combinations with the devices (batch divisibility, mesh);
`check_splits` covers the LaMP files (or finished records) that training needs: train and dev
present and non-empty.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from etils import epy

with epy.lazy_imports():  # TensorFlow (and the Keras it loads) takes ~4 s: only when used
  import tensorflow as tf

from pplug_jax import storage
from pplug_jax import axis_rules, partitioning
from pplug_jax.baselines.retrieval import METHODS as RETRIEVAL_METHODS
from pplug_jax.data import buckets, lamp, pipeline, records, tasks
from pplug_jax.errors import ConfigError
from pplug_jax.models import bert, numerics, plug as plug_lib, t5

ENCODER_MODES = ('frozen', 'finetune')
EMBEDDING_DTYPES = ('float32', 'float16')
PLUG_RETRIEVAL = ('', 'bm25', 'recency')  # rankers that need no second encoder
# The optimised baselines' choices (baselines/utility.py, ropg.py, rspg.py read them from here).
INITIAL_RANKERS = ('bm25', 'contriever', 'recency', 'file')
KD_FORMS = ('kl', 'reference')
LOSS_FORMS = ('kl', 'reference')


def _problems_of_values(c) -> list[str]:
  p: list[str] = []

  def need(ok: bool, key: str, rule: str) -> None:
    if not ok:
      value = c
      for part in key.split('.'):
        value = value[part]
      p.append(f'config.{key}={value!r}: {rule}.')

  def positive(*keys: str) -> None:
    for key in keys:
      section, name = key.split('.')
      need(isinstance(c[section][name], (int, float)) and c[section][name] > 0, key,
           'must be > 0')

  def one_of(key: str, allowed) -> None:
    section, name = key.split('.')
    need(c[section][name] in allowed, key, f'use one of {sorted(allowed)}')

  try:
    lamp.task_spec(c.task)
  except lamp.LampError:
    p.append(f'config.task={c.task!r}: use one of {sorted(tasks.TASKS)}.')
  need(c.split_type in lamp.SPLIT_TYPES, 'split_type', f'use one of {list(lamp.SPLIT_TYPES)}')
  positive('data.num_shards', 'data.max_input_length', 'data.max_target_length',
           'data.max_history', 'data.item_max_length', 'data.query_max_length',
           'data.shuffle_buffer', 'encoder.batch_size', 'optim.lr', 'optim.grad_clip',
           'optim.batch_size', 'optim.grad_accum', 'train.log_every', 'train.eval_every',
           'train.checkpoint_every', 'train.keep_checkpoints', 'train.eval_batch_size',
           'eval.num_beams', 'eval.max_new_tokens', 'plug.instruction_scale_divisor')
  need(c.data.augment_copies >= 0, 'data.augment_copies', 'must be >= 0 (0 = off)')
  need(0 <= c.data.augment_max_drop < 1, 'data.augment_max_drop', 'must be in [0, 1)')
  need(c.data.prefetch >= 0, 'data.prefetch', 'must be >= 0')
  need(c.data.get('history_cap', 0) >= 0, 'data.history_cap', 'must be >= 0 (0 = no cap)')
  need(c.data.num_streams >= 0, 'data.num_streams', 'must be >= 0 (0 = one per process)')
  one_of('data.embedding_dtype', EMBEDDING_DTYPES)
  one_of('data.bucketing', buckets.MODES)
  for key, maximum in (('input_buckets', c.data.max_input_length),
                       ('target_buckets', c.data.max_target_length)):
    need(all(isinstance(b, int) and 0 < b <= maximum for b in c.data[key]), f'data.{key}',
         f'must be lengths in 1..{maximum} (the maximum is always added), or () for automatic')
  one_of('encoder.mode', ENCODER_MODES)
  one_of('encoder.pooling', bert.POOLINGS)
  one_of('encoder.dtype', (numerics.AUTO, *numerics.DTYPES))
  for key in ('llm.dtype', 'llm.param_dtype', 'plug.dtype'):
    one_of(key, numerics.DTYPES)
  one_of('llm.remat_policy', ('none', *t5.REMAT_POLICIES))
  need(c.plug.persona_scale == -1 or c.plug.persona_scale > 0, 'plug.persona_scale',
       'must be > 0, or -1 to derive it from the backbone')
  need(c.plug.retrieval in PLUG_RETRIEVAL, 'plug.retrieval',
       f'use one of {list(PLUG_RETRIEVAL)} (\'\' = the plain input)')
  need(c.plug.retrieval_k >= 1, 'plug.retrieval_k', 'must be >= 1')
  p.extend(_problems_of_plug_variant(c))
  need(not c.get('demo_ablations', False) or c.demo, 'demo_ablations',
       'is the demo\'s study (configs/lamp.py:demo); on your own data run python -m '
       'pplug_jax.ablate --study variants')
  if c.demo and 'demo_model' in c:  # the tiny base's fitting, before any of the demo's work
    positive('demo_model.pretrain_lr', 'demo_model.pretrain_batch_size')
    need(isinstance(c.demo_model.pretrain_steps, int) and c.demo_model.pretrain_steps >= 0,
         'demo_model.pretrain_steps', 'must be >= 0 (0 keeps the random initialisation)')
  for key in c.get('resumable_keys', ()):
    need(_has_key(c, key), 'resumable_keys',
         f'marks {key!r}, which this config does not have (configs/lamp.py sets this list)')
  one_of('optim.decay_mask', ('all', 'hf'))
  one_of('data.history_order', ('date', 'file'))
  one_of('data.query_source', ('input', 'truncated_input'))
  for key in ('llm.dropout_rate', 'encoder.dropout_rate'):
    section, name = key.split('.')
    need(0 <= c[section][name] < 1, key, 'must be in [0, 1)')
  need(c.llm.vocab_limit >= -1, 'llm.vocab_limit',
       'use 0 (every row), -1 (len(tokenizer) + 2, as the official code) or a row count')
  need(c.optim.weight_decay >= 0, 'optim.weight_decay', 'must be >= 0')
  need(0 <= c.optim.warmup_frac < 1, 'optim.warmup_frac', 'must be in [0, 1)')
  need(c.optim.max_steps == -1 or c.optim.max_steps > 0, 'optim.max_steps',
       'must be > 0, or -1 to train for config.optim.epochs')
  if c.optim.max_steps == -1:
    need(c.optim.epochs > 0, 'optim.epochs', 'must be > 0 (or set config.optim.max_steps)')
  profile = tuple(c.train.get('profile_steps', ()))
  need(profile == () or (len(profile) == 2 and all(isinstance(s, int) for s in profile) and
                         0 <= profile[0] < profile[1]), 'train.profile_steps',
       'use () (off) or (start, stop) with 0 <= start < stop: the steps to trace')
  need(c.train.max_eval_batches == -1 or c.train.max_eval_batches > 0, 'train.max_eval_batches',
       'must be > 0, or -1 for the whole split')
  need(c.eval.explain_top_k >= 0, 'eval.explain_top_k', 'must be >= 0')
  # The retrieval and optimised baselines' keys, with the rest: the demo runs them after
  # training, so a typo in one must be refused before PPlug trains, not after.
  positive('rag.k', 'rag.max_length', 'ropg.candidates', 'ropg.temperature',
           'ropg.query_max_length', 'ropg.doc_max_length', 'rspg.max_length',
           'rspg.temperature')
  one_of('rag.retriever_pooling', bert.POOLINGS)
  one_of('ropg.initial_ranker', INITIAL_RANKERS)
  one_of('ropg.kd_form', KD_FORMS)
  one_of('rspg.loss_form', LOSS_FORMS)
  allowed = ('none',) + RETRIEVAL_METHODS
  need(len(c.rspg.retrievers) >= 2 and all(m in allowed for m in c.rspg.retrievers),
       'rspg.retrievers', f'give at least two of {list(allowed)}')
  for section in ('ropg', 'rspg'):
    positive(f'{section}.lr', f'{section}.batch_size', f'{section}.epochs',
             f'{section}.grad_clip', f'{section}.checkpoint_every')
    need(0 <= c[section].warmup_frac < 1, f'{section}.warmup_frac', 'must be in [0, 1)')
    need(0 <= c[section].dropout < 1, f'{section}.dropout', 'must be in [0, 1)')
  return p


def _has_key(c, dotted: str) -> bool:
  for part in dotted.split('.'):
    if not hasattr(c, 'keys') or part not in c:
      return False
    c = c[part]
  return True


def _problems_of_plug_variant(c) -> list[str]:
  """The plug-variant keys (models/plug.py): pooling, K, time decay."""
  v, p = c.plug, []
  if v.get('pooling', 'attention') not in plug_lib.POOLINGS:
    p.append(f'config.plug.pooling={v.pooling!r}: use one of {list(plug_lib.POOLINGS)}.')
  k = v.get('num_persona_tokens', 1)
  if not isinstance(k, int) or k < 1:
    p.append(f'config.plug.num_persona_tokens={k!r}: must be an integer >= 1.')
  elif k > 1 and v.get('pooling', 'attention') == 'mean':
    p.append(f'config.plug.num_persona_tokens={k}: several persona tokens need '
             "config.plug.pooling='attention' (mean pooling would make them all the same).")
  if v.get('time_decay', 'none') not in plug_lib.TIME_DECAYS:
    p.append(f'config.plug.time_decay={v.time_decay!r}: use one of {list(plug_lib.TIME_DECAYS)}.')
  if not v.get('time_decay_init', 0.0) >= 0:
    p.append(f'config.plug.time_decay_init={v.time_decay_init!r}: must be >= 0.')
  return p


def _problems_with_devices(c, num_devices: int, process_count: int,
                           training: bool = True) -> list[str]:
  try:
    shape = partitioning.resolve_mesh_shape(c.mesh_shape, num_devices)
  except ConfigError as e:
    return [str(e)]
  data = shape[axis_rules.MESH_AXES.index('data')]
  p = []
  if process_count > 1 and data % process_count:
    p.append(f'config.mesh_shape={tuple(c.mesh_shape)}: its data axis ({data} on {num_devices} '
             f'devices) must be a multiple of the {process_count} processes, since each process '
             f'feeds its own examples; put the processes on the data axis, e.g. '
             f'config.mesh_shape=({process_count}, -1).')
  if training and c.optim.batch_size > 0 and (c.optim.batch_size % data or
                                              c.optim.batch_size % process_count):
    p.append(f'config.optim.batch_size={c.optim.batch_size}: must be a multiple of the data-'
             f'parallel size {data} (config.mesh_shape={tuple(c.mesh_shape)} on {num_devices} '
             f'devices) and of the {process_count} processes.')
  if c.train.eval_batch_size > 0 and (c.train.eval_batch_size * process_count) % data:
    p.append(f'config.train.eval_batch_size={c.train.eval_batch_size} (per process): '
             f'{process_count} processes x it must be a multiple of the data-parallel size '
             f'{data}.')
  if not training:  # evaluation: only its own batch meets the mesh
    return p
  streams = c.data.num_streams or process_count
  if c.data.num_streams > 0 and (streams % process_count or c.optim.batch_size % streams):
    p.append(f'config.data.num_streams={streams}: must be a multiple of the {process_count} '
             f'processes and divide config.optim.batch_size={c.optim.batch_size}.')
  if 0 < c.data.num_shards < streams:
    p.append(f'config.data.num_shards={c.data.num_shards}: needs at least one shard per data '
             f'stream ({streams}: one per process unless config.data.num_streams is set).')
  return p


def config_problems(config, num_devices: int | None = None, process_count: int | None = None,
                    training: bool = True) -> list[str]:
  """Every invalid value in `config`, each as one line naming its key (empty: all fine).

  training=False (evaluate, on a workdir's config): the training batch may not fit these
  devices, since only the evaluation batch meets them.
  """
  problems = _problems_of_values(config)
  problems += _problems_with_devices(
      config, jax.device_count() if num_devices is None else num_devices,
      jax.process_count() if process_count is None else process_count, training)
  return problems


def refuse(problems: list[str]) -> None:
  """One ConfigError that lists every problem at once (nothing if there are none); a single
  problem is the message alone, so that it stays one line."""
  if len(problems) == 1:
    raise ConfigError(problems[0])
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems))


def check_config(config, num_devices: int | None = None,
                 process_count: int | None = None) -> None:
  """Raises one ConfigError that lists every invalid value in `config`."""
  refuse(config_problems(config, num_devices, process_count))


def precompute_problems(config, workdir: str) -> list[str]:
  """What precompute reads is named and there (the demo makes its own, in --workdir)."""
  storage.check_config_buckets(config)
  if config.demo:
    return [] if workdir else ['--workdir is empty: the demo makes its data and models there, '
                               'as train does; give --workdir DIR.']
  problems = []
  if not workdir and not config.data.records_dir:
    problems.append('--workdir is empty: the records go to <workdir>/records unless '
                    'config.data.records_dir is set.')
  files = 'config.json, model.safetensors and the tokenizer files'
  if not config.encoder.path or not storage.isdir(config.encoder.path):
    problems.append(f'config.encoder.path={config.encoder.path!r}: download '
                    f'{config.encoder.name} ({files}) and set it.')
  if not config.data.lamp_dir or not storage.isdir(config.data.lamp_dir):
    problems.append(f'config.data.lamp_dir={config.data.lamp_dir!r}: download LaMP '
                    f'({config.task}) and set it.')
  tokenizer = config.llm.tokenizer or config.llm.path
  if tokenizer != 'byte' and not storage.isdir(tokenizer):
    problems.append(f'config.llm.path={config.llm.path!r}: precompute needs the LLM\'s '
                    f'tokenizer; download {config.llm.name} and set it.')
  if problems:
    problems[-1] += ('\nWith nothing downloaded, run the demo: --config configs/lamp.py:demo '
                     '--workdir DIR')
  return problems


def _count_questions(path: str) -> int:
  data = lamp._load_json(path)  # the one JSON reader: its error names the file
  if not isinstance(data, list):
    raise lamp.LampError(f'{path}: expected a JSON list of questions.')
  return len(data)


def check_splits(config, records_dir: str, need: tuple[str, ...] = ('train', 'dev')) -> None:
  """The splits training needs are present and non-empty, in the LaMP files or the records."""
  problems = []
  have_records = storage.exists(os.path.join(records_dir, records.METADATA))
  if config.data.lamp_dir:
    root = lamp.task_dir(config.data.lamp_dir, config.task, config.split_type)
    for split in need:
      try:
        qfile, ofile = lamp.split_files(root, split)
      except lamp.LampError as e:
        problems.append(str(e))
        continue
      if ofile is None:
        problems.append(f'{qfile}: no {split}_outputs.json beside it; {split} needs outputs.')
      elif _count_questions(qfile) == 0:
        problems.append(f'{qfile}: the {split} split is empty; training needs examples in '
                        f'{" and ".join(need)}.')
  elif have_records:
    splits: dict[str, Any] = records.read_metadata(records_dir).get('splits', {})
    for split in need:
      if not splits.get(split, {}).get('examples'):
        problems.append(f'{records_dir}: no {split} examples in these records; precompute them '
                        'from LaMP files that have a non-empty ' + split + ' split.')
  if not problems and config.plug.get('time_decay', 'none') == 'learned':
    problems += _problems_with_dates(config, records_dir, have_records)
  if problems:
    raise lamp.LampError('\n  '.join(problems))


def _problems_with_dates(config, records_dir: str, have_records: bool) -> list[str]:
  """Time-aware pooling needs dated profile items: none at all in train is refused."""
  parsed = lambda dates: bool(dates) and bool(pipeline.date_days(
      tf.constant(dates, tf.string))[1].numpy().any())
  if config.data.lamp_dir:
    root = lamp.task_dir(config.data.lamp_dir, config.task, config.split_type)
    source, _ = lamp.split_files(root, 'train')
    dates = [str(item.get('date') or '') for q in lamp._load_json(source)
             for item in (q.get('profile') or [])]
    count, dated = len(dates), parsed(dates)
  elif have_records:  # the dates alone, until the first that parses
    source, count, dated = records_dir, 0, False
    spec = {'history_dates': tf.io.VarLenFeature(tf.string)}
    ds = records.dataset(records.split_shards(records_dir, 'train')).map(
        lambda s: tf.sparse.to_dense(tf.io.parse_single_example(s, spec)['history_dates']))
    for dates in ds.as_numpy_iterator():
      count += len(dates)
      if parsed([d.decode() for d in dates]):
        dated = True
        break
  else:
    return []
  if dated:
    return []
  return [f"{source}: none of the {count} train profile items has a date that parses "
          "(YYYY[-MM[-DD]]); config.plug.time_decay='learned' needs dated items: use "
          "config.plug.time_decay='none' for this task."]
