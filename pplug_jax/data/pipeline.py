"""tf.data over precomputed records -> fixed-shape batches -> global jax.Arrays.

Training: per-process files, seeded shuffles, endless repetition, the reference's history
augmentation done on the fly, drop-remainder batches, and `skip_batches` to resume.
Evaluation: every example exactly once; the last batch (and any batch a process needs to keep
step with the others) is padded with `valid == 0` rows.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf

from pplug_jax.data import records
from pplug_jax.errors import ConfigError, RecordsError

Batch = dict[str, np.ndarray]


def _process_files(files: list[str], process_index: int, process_count: int,
                   records_dir: str) -> list[str]:
  if len(files) < process_count:
    raise RecordsError(f'{records_dir}: {len(files)} shard files for {process_count} processes; '
                       'set config.data.num_shards to a multiple of the process count and rerun '
                       'precompute into a new records_dir.')
  return files[process_index::process_count]


FLOAT_FEATURES = ('history', 'query_embedding')


def is_float(feature: str) -> bool:
  """Float32 features of a batch; the rest are int32."""
  return feature in FLOAT_FEATURES


def shapes(config, dim: int) -> dict[str, tuple[int, ...]]:
  d = config.data
  return {
      'input_ids': (d.max_input_length,), 'input_mask': (d.max_input_length,),
      'target_ids': (d.max_target_length,), 'target_mask': (d.max_target_length,),
      'query_embedding': (dim,),
      'query_encoder_ids': (d.query_max_length,), 'query_encoder_mask': (d.query_max_length,),
      'history': (d.max_history, dim), 'history_mask': (d.max_history,), 'valid': (),
  }


def _pad_1d(x: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor]:
  x = x[:length]
  n = tf.shape(x)[0]
  return tf.pad(x, [[0, length - n]]), tf.pad(tf.ones([n], tf.int32), [[0, length - n]])


def pad_example(ex: dict[str, tf.Tensor], config,
                with_item_ids: bool = False) -> dict[str, tf.Tensor]:
  """Variable-length parsed example -> the static shapes of `shapes()` plus its id and text.

  with_item_ids adds the history item ids (host-side strings, for explanations).
  """
  d = config.data
  out = {'id': ex['id'], 'target_text': ex['target_text']}
  if with_item_ids:
    ids = ex['history_item_ids'][-d.max_history:] if d.max_history > 0 else \
        ex['history_item_ids'][:0]
    out['history_item_ids'] = tf.pad(ids, [[0, d.max_history - tf.shape(ids)[0]]])
  out['input_ids'], out['input_mask'] = _pad_1d(ex['input_ids'], d.max_input_length)
  out['target_ids'], out['target_mask'] = _pad_1d(ex['target_ids'], d.max_target_length)
  out['query_encoder_ids'], out['query_encoder_mask'] = _pad_1d(ex['query_encoder_ids'],
                                                                d.query_max_length)
  out['query_embedding'] = ex['query_embedding']
  hist = ex['history_embeddings'][-d.max_history:] if d.max_history > 0 else \
      ex['history_embeddings'][:0]
  n = tf.shape(hist)[0]
  out['history'] = tf.pad(hist, [[0, d.max_history - n], [0, 0]])
  out['history_mask'] = tf.pad(tf.ones([n], tf.int32), [[0, d.max_history - n]])
  out['valid'] = tf.constant(1, tf.int32)
  return out


def drop_history_items(hist: tf.Tensor, seed: tf.Tensor, max_drop: float,
                       at_least_one: bool = False) -> tf.Tensor:
  """Drops a uniform-random 0..max_drop share of the rows of hist [n, d], keeping >= 1, in order.

  at_least_one: the official code's `int(n * U(0, max_drop)) + 1` rows, so a copy always
  differs from its original.
  """
  n = tf.shape(hist)[0]
  frac = tf.random.stateless_uniform([], seed, 0.0, max_drop)
  drop = tf.cast(tf.floor(frac * tf.cast(n, tf.float32)), tf.int32) + int(at_least_one)
  keep = tf.maximum(n - drop, 1)
  scores = tf.random.stateless_uniform([n], seed + tf.constant([0, 1], tf.int64))
  idx = tf.sort(tf.math.top_k(scores, keep).indices)
  return tf.gather(hist, idx)


def _augment(copies: int, max_drop: float, seed: int, fixed: bool = False):
  """The reference's extra copies of histories with > 2 items, each dropping some items.

  fixed=False draws every copy anew on every pass; fixed=True (the official code) keys each
  copy by (example id, copy number), so the same copies come back every epoch, and each drops
  at least one item.
  """

  def expand(ex):
    k = tf.where(ex['history_length'] > 2, copies + 1, 1)
    return tf.data.Dataset.range(tf.cast(k, tf.int64)).map(lambda c: (ex, c))

  def apply(index, ex_copy):
    ex, copy = ex_copy
    if fixed:
      pair = tf.stack([tf.strings.to_hash_bucket_fast(ex['id'], 2**62),
                       tf.constant(seed * 4096, tf.int64) + copy])
    else:
      pair = tf.stack([tf.constant(seed, tf.int64), index])
    hist = ex['history_embeddings']
    ex = dict(ex)
    ex['history_embeddings'] = tf.cond(
        copy > 0, lambda: drop_history_items(hist, pair, max_drop, at_least_one=fixed),
        lambda: hist)
    return ex

  return expand, apply


def _corrupt_shard(files: list[str], error: tf.errors.OpError) -> RecordsError:
  """Names the first shard that fails to read (found by reading each one alone)."""
  for file in files:
    try:
      for _ in tf.data.TFRecordDataset(file):
        pass
    except tf.errors.OpError as e:
      reason = (e.message or type(e).__name__).splitlines()[0]
      return RecordsError(f'{file}: corrupt TFRecord shard ({reason}). Delete this file and run '
                          'again: train (or precompute) makes the missing shard anew.')
  reason = (error.message or type(error).__name__).splitlines()[0]
  return RecordsError(f'unreadable records in {os.path.dirname(files[0]) if files else "?"} '
                      f'({reason}). Delete the records directory and run again.')


def _numpy(ds: tf.data.Dataset, files: list[str]) -> Iterator[Any]:
  """ds.as_numpy_iterator(), with a read error turned into one that names the corrupt shard."""
  try:
    yield from ds.as_numpy_iterator()
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
    raise _corrupt_shard(files, e) from None


def _parsed(files: list[str], meta: dict[str, Any]) -> tf.data.Dataset:
  fp = meta['fingerprint']
  return tf.data.TFRecordDataset(files).map(records.parse_fn(fp['dim'], fp['embedding_dtype']),
                                            num_parallel_calls=tf.data.AUTOTUNE)


def num_streams(config, process_count: int | None = None) -> int:
  """How many data streams make a global batch: config.data.num_streams, 0 = one per process."""
  pc = jax.process_count() if process_count is None else process_count
  return int(config.data.num_streams) or pc


def train_batches(config, records_dir: str, local_batch_size: int, skip_batches: int = 0,
                  split: str = 'train', process_index: int | None = None,
                  process_count: int | None = None, accum: int = 1) -> Iterator[Batch]:
  """Endless iterator of this process's numpy training batches, reshuffled every pass.

  The global batch is made of `num_streams` streams, each over its own shard files
  (files[s::num_streams]) with its own seed; a process concatenates its share of them. The data
  order is therefore a function of num_streams alone: a run on fewer processes with the same
  num_streams sees exactly the batches of a run on more. With `accum` micro-batches per batch,
  each micro-batch takes its share of every stream, as it would across processes.
  """
  meta = records.read_metadata(records_dir)
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  streams = num_streams(config, pc)
  per_process = streams // pc
  if streams % pc or local_batch_size % per_process:
    raise ConfigError(f'config.data.num_streams={streams}: must be a multiple of the {pc} '
                      f'processes, and each process\'s batch ({local_batch_size}) a multiple of '
                      f'its {per_process} streams.')
  files = records.split_shards(records_dir, split)
  if len(files) < streams:
    raise RecordsError(f'{records_dir}: {len(files)} {split} shard files for {streams} data '
                       'streams (one per process unless config.data.num_streams is set); '
                       'precompute with config.data.num_shards >= that into a new records_dir.')
  mine = [_stream(config, meta, files[s::streams], config.seed + s,
                  local_batch_size // per_process, skip_batches)
          for s in range(pi * per_process, (pi + 1) * per_process)]
  if len(mine) == 1:
    yield from mine[0]
    return
  for parts in zip(*mine):
    yield {k: np.concatenate([p[k].reshape((accum, -1) + p[k].shape[1:]) for p in parts],
                             axis=1).reshape((-1,) + parts[0][k].shape[1:]) for k in parts[0]}


def _stream(config, meta: dict[str, Any], files: list[str], seed: int, batch_size: int,
            skip_batches: int) -> Iterator[Batch]:
  """One stream's endless, seeded, augmented, padded batches."""
  ds = _parsed(files, meta)
  ds = ds.shuffle(config.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()  # endless: every process stops on the same step count, none runs out first
  if config.data.augment_copies > 0:
    expand, apply = _augment(config.data.augment_copies, config.data.augment_max_drop, seed,
                             config.data.augment_fixed)
    ds = ds.flat_map(expand).enumerate().map(apply)
    ds = ds.shuffle(config.data.shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=False)
  ds = ds.map(lambda ex: pad_example(ex, config), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).skip(skip_batches)
  ds = ds.prefetch(config.data.prefetch)
  yield from _numpy(ds, files)


def num_train_examples(config, records_dir: str, split: str = 'train') -> int:
  """Examples per epoch after augmentation (originals + copies of histories with > 2 items)."""
  meta = records.read_metadata(records_dir)
  files = records.split_shards(records_dir, split)
  if config.data.augment_copies <= 0:
    return meta['splits'][split]['examples']
  lengths = _parsed(files, meta).map(lambda ex: ex['history_length'])
  n = 0
  for length in _numpy(lengths, files):
    n += 1 + (config.data.augment_copies if length > 2 else 0)
  return n


def eval_batches(config, records_dir: str, split: str, local_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, Iterator[Batch]]:
  """(number of batches, iterator): each example once, every process the same batch count."""
  meta = records.read_metadata(records_dir)
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  files = records.split_shards(records_dir, split)
  if len(files) != len(meta['splits'][split]['shard_counts']):
    raise RecordsError(f'{records_dir}: {split} has {len(files)} finished shards of '
                       f'{len(meta["splits"][split]["shard_counts"])}; rerun precompute.')
  counts = meta['splits'][split]['shard_counts']
  per_process = [sum(counts[p::pc]) for p in range(pc)]
  num_batches = max(1, math.ceil(max(per_process) / local_batch_size))
  mine = _process_files(files, pi, pc, records_dir)
  ds = _parsed(mine, meta).map(lambda ex: pad_example(ex, config, with_item_ids=True))
  filler = num_batches * local_batch_size - per_process[pi]
  dim = meta['fingerprint']['dim']
  blank = {k: tf.zeros(s, tf.float32 if is_float(k) else tf.int32)
           for k, s in shapes(config, dim).items()}
  blank['id'] = tf.constant(b'')
  blank['target_text'] = tf.constant(b'')
  blank['history_item_ids'] = tf.fill([config.data.max_history], b'')
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(filler))
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(config.data.prefetch)
  return num_batches, _numpy(ds, mine)


def to_global(batch: Batch, mesh: jax.sharding.Mesh, rules) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded on the batch axis (ids dropped)."""
  from pplug_jax import partitioning
  out = {}
  for k, v in batch.items():
    if v.dtype.kind in 'SUO':
      continue
    sharding = partitioning.batch_sharding(mesh, rules, v.ndim)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def to_local(x: jax.Array, mesh: jax.sharding.Mesh, rules) -> np.ndarray:
  """A batch-sharded global output -> this process's rows, in its local batch order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  from pplug_jax import partitioning
  spec = partitioning.batch_sharding(mesh, rules, x.ndim).spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))
