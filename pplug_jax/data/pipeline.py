"""tf.data over precomputed records -> static-shape batches -> global jax.Arrays.

Training: per-process files, seeded shuffles, endless repetition, the reference's history
augmentation done on the fly, drop-remainder batches, and `skip_batches` to resume. Batches come
in a few static (input, target) length shapes (`buckets.py`): one tf.data stream per shape, and
one seeded schedule of shapes that every stream and process follows.
Evaluation: every example exactly once, grouped by shape; the last batch of a shape (and any
batch a process needs to keep step with the others) is padded with `valid == 0` rows.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import jax
import numpy as np
from etils import epy

with epy.lazy_imports():  # TensorFlow (and the Keras it loads) takes ~4 s: only when used
  import tensorflow as tf

from pplug_jax.data import buckets as buckets_lib
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


FLOAT_FEATURES = ('history', 'query_embedding', 'history_age')


def history_length(config) -> int:
  """History rows of a batch: config.data.max_history, or the most recent history_cap of them
  (an ablation over the same records; 0 = no cap)."""
  cap = int(config.data.get('history_cap', 0))
  return min(cap, config.data.max_history) if cap > 0 else config.data.max_history


def uses_dates(config) -> bool:
  """Whether batches carry `history_age` (a time-aware plug); the default batch does not."""
  return config.plug.get('time_decay', 'none') == 'learned'


# YYYY, YYYY-MM or YYYY-MM-DD ('/' also), then optionally a time: LaMP's date fields.
_DATE_RE = r'\s*\d{4}([-/]\d{1,2}([-/]\d{1,2})?)?([ T].*)?'


def date_days(dates: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Item date strings [n] -> (days since 1970-01-01 as float32 [n], parsed [n] bool).

  A missing month or day is the first; a date in no known form does not parse.
  """
  ok = tf.strings.regex_full_match(dates, _DATE_RE)
  safe = tf.where(ok, dates, '1970-01-01')
  part = lambda pattern: tf.strings.to_number(
      tf.strings.regex_replace(safe, pattern, r'0\1'), tf.int64)
  y = part(r'^\s*(\d{4}).*$')
  m = tf.maximum(part(r'^\s*\d{4}(?:[-/](\d{1,2}))?.*$'), 1)
  d = tf.maximum(part(r'^\s*\d{4}(?:[-/]\d{1,2}(?:[-/](\d{1,2}))?)?.*$'), 1)
  y = y - tf.cast(m <= 2, tf.int64)  # days from the civil date (H. Hinnant's algorithm)
  era = tf.math.floordiv(y, 400)
  yoe = y - era * 400
  doy = tf.math.floordiv(153 * (m + tf.where(m > 2, tf.constant(-3, tf.int64), tf.constant(9, tf.int64))) + 2, 5) + d - 1
  doe = yoe * 365 + tf.math.floordiv(yoe, 4) - tf.math.floordiv(yoe, 100) + doy
  return tf.cast(era * 146097 + doe - 719468, tf.float32), ok


def history_ages(dates: tf.Tensor) -> tf.Tensor:
  """Item date strings [n] -> each item's age in days before the newest dated item [n];
  an undated item takes the newest date (age 0), and so does every item when none is dated."""
  days, ok = date_days(dates)
  newest = tf.reduce_max(tf.where(ok, days, tf.float32.min))
  return tf.where(ok, tf.maximum(newest - days, 0.0), 0.0)


def is_float(feature: str) -> bool:
  """Float32 features of a batch; the rest are int32."""
  return feature in FLOAT_FEATURES


def step_layout(config) -> tuple[int, int]:
  """(accum, micro): a train step's batch is [accum, micro, ...], `accum` micro-batches of
  `micro` examples (config.optim.grad_accum, config.optim.batch_size); the step sums their
  gradients. Sharding keeps axis 0 whole and splits axis 1 (partitioning.to_global(leading=1))."""
  return int(config.optim.grad_accum), int(config.optim.batch_size)


def as_micro_batches(batch: Batch, accum: int) -> Batch:
  """[accum * micro, ...] rows -> [accum, micro, ...]: rows n * micro ... go to micro-batch n."""
  return {k: v.reshape((accum, -1) + v.shape[1:]) for k, v in batch.items()}


def shapes(config, dim: int, input_length: int | None = None,
           target_length: int | None = None) -> dict[str, tuple[int, ...]]:
  """Per-example feature shapes; input and target lengths default to the config maxima."""
  d = config.data
  li = input_length or d.max_input_length
  lt = target_length or d.max_target_length
  out = {
      'input_ids': (li,), 'input_mask': (li,), 'target_ids': (lt,), 'target_mask': (lt,),
      'query_embedding': (dim,),
      'query_encoder_ids': (d.query_max_length,), 'query_encoder_mask': (d.query_max_length,),
      'history': (history_length(config), dim), 'history_mask': (history_length(config),),
      'valid': (),
  }
  if uses_dates(config):
    out['history_age'] = (history_length(config),)
  return out


def _pad_1d(x: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor]:
  x = x[:length]
  n = tf.shape(x)[0]
  return tf.pad(x, [[0, length - n]]), tf.pad(tf.ones([n], tf.int32), [[0, length - n]])


def pad_example(ex: dict[str, tf.Tensor], config, with_item_ids: bool = False,
                shape: tuple[int, int] | None = None) -> dict[str, tf.Tensor]:
  """Variable-length parsed example -> the static shapes of `shapes()` plus its id and text.

  with_item_ids adds the history item ids (host-side strings, for explanations); `shape` is
  the (input, target) length bucket (default: the maxima).
  """
  d = config.data
  li, lt = shape or (d.max_input_length, d.max_target_length)
  h = history_length(config)
  recent = lambda x: x[-h:] if h > 0 else x[:0]
  out = {'id': ex['id'], 'target_text': ex['target_text']}
  if with_item_ids:
    ids = recent(ex['history_item_ids'])
    out['history_item_ids'] = tf.pad(ids, [[0, h - tf.shape(ids)[0]]])
  out['input_ids'], out['input_mask'] = _pad_1d(ex['input_ids'], li)
  out['target_ids'], out['target_mask'] = _pad_1d(ex['target_ids'], lt)
  out['query_encoder_ids'], out['query_encoder_mask'] = _pad_1d(ex['query_encoder_ids'],
                                                                d.query_max_length)
  out['query_embedding'] = ex['query_embedding']
  hist = recent(ex['history_embeddings'])
  n = tf.shape(hist)[0]
  out['history'] = tf.pad(hist, [[0, h - n], [0, 0]])
  out['history_mask'] = tf.pad(tf.ones([n], tf.int32), [[0, h - n]])
  if uses_dates(config):  # ages among the kept items, relative to the newest of them
    out['history_age'] = tf.pad(history_ages(recent(ex['history_dates'])), [[0, h - n]])
  out['valid'] = tf.constant(1, tf.int32)
  return out


def drop_history_items(hist: tf.Tensor, seed: tf.Tensor, max_drop: float,
                       at_least_one: bool = False) -> tf.Tensor:
  """Drops a uniform-random 0..max_drop share of the rows of hist [n, d], keeping >= 1, in order.

  at_least_one: the official code's `int(n * U(0, max_drop)) + 1` rows, so a copy always
  differs from its original.
  """
  return tf.gather(hist, kept_rows(tf.shape(hist)[0], seed, max_drop, at_least_one))


def kept_rows(n: tf.Tensor, seed: tf.Tensor, max_drop: float,
              at_least_one: bool = False) -> tf.Tensor:
  """The sorted row indices `drop_history_items` keeps of n rows."""
  frac = tf.random.stateless_uniform([], seed, 0.0, max_drop)
  drop = tf.cast(tf.floor(frac * tf.cast(n, tf.float32)), tf.int32) + int(at_least_one)
  keep = tf.maximum(n - drop, 1)
  scores = tf.random.stateless_uniform([n], seed + tf.constant([0, 1], tf.int64))
  return tf.sort(tf.math.top_k(scores, keep).indices)


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
    n = tf.shape(hist)[0]
    rows = tf.cond(copy > 0, lambda: kept_rows(n, pair, max_drop, at_least_one=fixed),
                   lambda: tf.range(n))
    ex['history_embeddings'] = tf.gather(hist, rows)
    ex['history_dates'] = tf.gather(ex['history_dates'], rows)  # each kept item keeps its date
    return ex

  return expand, apply


def _corrupt_shard(files: list[str], error: tf.errors.OpError) -> RecordsError:
  """Names the first shard that fails to read (found by reading each one alone)."""
  for file in files:
    try:
      for _ in records.dataset([file]):
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
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise _corrupt_shard(files, e) from None


def _parsed(files: list[str], meta: dict[str, Any], bucket_of: Any = None,
            index: int = 0) -> tf.data.Dataset:
  """Parsed examples of `files`; with `bucket_of`, only those of bucket `index`."""
  fingerprint = meta['fingerprint']
  ds = records.dataset(files)
  if bucket_of is not None:
    ds = ds.filter(lambda s: bucket_of(s) == index)
  return ds.map(records.parse_fn(fingerprint['dim'], fingerprint['embedding_dtype']),
                num_parallel_calls=tf.data.AUTOTUNE)


def _lengths(serialized: tf.Tensor) -> tf.Tensor:
  spec = {'input_ids': tf.io.VarLenFeature(tf.int64),
          'target_ids': tf.io.VarLenFeature(tf.int64),
          'history_length': tf.io.FixedLenFeature([], tf.int64)}
  ex = tf.io.parse_single_example(serialized, spec)
  return tf.stack([tf.size(ex['input_ids'].values, tf.int32),
                   tf.size(ex['target_ids'].values, tf.int32),
                   tf.cast(ex['history_length'], tf.int32)])


def split_lengths(files: list[str]) -> np.ndarray:
  """[n, 3] (input, target, history) lengths of every example of `files`, in file order."""
  if not files:
    return np.zeros((0, 3), np.int32)
  ds = records.dataset(files).map(_lengths, num_parallel_calls=tf.data.AUTOTUNE)
  parts = list(_numpy(ds.batch(4096), files))
  return np.concatenate(parts) if parts else np.zeros((0, 3), np.int32)


def _bucket_fn(config, buckets: buckets_lib.Buckets):
  """serialized example -> its bucket index (lengths clipped to the maxima)."""
  d = config.data
  table = tf.constant(buckets.table(d.max_input_length, d.max_target_length))

  def bucket_of(serialized):
    li, lt, _ = tf.unstack(_lengths(serialized))
    return table[tf.minimum(li, d.max_input_length), tf.minimum(lt, d.max_target_length)]

  return bucket_of


def train_buckets(config, records_dir: str, streams: int,
                  split: str = 'train') -> tuple[buckets_lib.Buckets, np.ndarray]:
  """The training shapes and their sampling weights, the same for every process."""
  files = records.split_shards(records_dir, split)
  if config.data.bucketing == 'off':
    return buckets_lib.candidates(config, np.zeros((0, 3), int)), np.ones(1)
  lengths = [split_lengths(files[s::streams]) for s in range(streams)]
  return buckets_lib.for_training(config, lengths, config.data.augment_copies)


def num_streams(config, process_count: int | None = None) -> int:
  """How many data streams make a global batch: config.data.num_streams, 0 = one per process."""
  num_processes = jax.process_count() if process_count is None else process_count
  return int(config.data.num_streams) or num_processes


def train_batches(config, records_dir: str, local_batch_size: int, skip_batches: int = 0,
                  split: str = 'train', process_index: int | None = None,
                  process_count: int | None = None, accum: int = 1,
                  plan: tuple[buckets_lib.Buckets, np.ndarray] | None = None) -> Iterator[Batch]:
  """Endless iterator of this process's numpy training batches, reshuffled every pass.

  `plan` is `train_buckets(...)` when the caller has it already (it reads every length).

  The global batch is made of `num_streams` streams, each over its own shard files
  (files[s::num_streams]) with its own seed; a process concatenates its share of them. The data
  order is therefore a function of num_streams alone: a run on fewer processes with the same
  num_streams sees exactly the batches of a run on more. With `accum` micro-batches per batch,
  each micro-batch takes its share of every stream, as it would across processes.
  """
  meta = records.read_metadata(records_dir)
  this_process = jax.process_index() if process_index is None else process_index
  num_processes = jax.process_count() if process_count is None else process_count
  streams = num_streams(config, num_processes)
  per_process = streams // num_processes
  if streams % num_processes or local_batch_size % per_process:
    raise ConfigError(f'config.data.num_streams={streams}: must be a multiple of the '
                      f'{num_processes} processes, and each process\'s batch '
                      f'({local_batch_size}) a multiple of its {per_process} streams.')
  files = records.split_shards(records_dir, split)
  if len(files) < streams:
    raise RecordsError(f'{records_dir}: {len(files)} {split} shard files for {streams} data '
                       'streams (one per process unless config.data.num_streams is set); '
                       'precompute with config.data.num_shards >= that into a new records_dir.')
  plan = plan or train_buckets(config, records_dir, streams, split)
  mine = [_stream(config, meta, files[s::streams], config.seed + s,
                  local_batch_size // per_process, skip_batches, plan)
          for s in range(this_process * per_process, (this_process + 1) * per_process)]
  if len(mine) == 1:
    yield from mine[0]
    return
  for parts in zip(*mine):  # each micro-batch takes its share of every stream
    split = [as_micro_batches(p, accum) for p in parts]
    yield {k: np.concatenate([s[k] for s in split], axis=1).reshape((-1,) + parts[0][k].shape[1:])
           for k in parts[0]}


def _stream(config, meta: dict[str, Any], files: list[str], seed: int, batch_size: int,
            skip_batches: int, plan: tuple[buckets_lib.Buckets, np.ndarray]) -> Iterator[Batch]:
  """One stream's endless batches: per step, the next batch of the scheduled shape."""
  buckets, weights = plan
  if len(buckets.shapes) == 1:
    yield from _shape_stream(config, meta, files, seed, batch_size, skip_batches,
                             buckets.shapes[0])
    return
  bucket_of = _bucket_fn(config, buckets)
  done = np.bincount(buckets_lib.schedule(config.seed, weights, 0, skip_batches),
                     minlength=len(weights)) if skip_batches else np.zeros(len(weights), int)
  streams: dict[int, Iterator[Batch]] = {}
  step = skip_batches
  while True:
    for j in buckets_lib.schedule(config.seed, weights, step, 1024):
      if j not in streams:  # seeded by (stream seed, bucket); resumed past its used batches
        shape_seed = int(np.random.SeedSequence([seed, int(j)]).generate_state(1)[0] >> 1)
        buffer = max(batch_size, int(config.data.shuffle_buffer * weights[j]))
        streams[j] = _shape_stream(config, meta, files, shape_seed, batch_size, int(done[j]),
                                   buckets.shapes[j], bucket_of, int(j), buffer)
      yield next(streams[j])
    step += 1024


def _shape_stream(config, meta: dict[str, Any], files: list[str], seed: int, batch_size: int,
                  skip_batches: int, shape: tuple[int, int], bucket_of: Any = None,
                  index: int = 0, shuffle_buffer: int | None = None) -> Iterator[Batch]:
  """One stream's endless, seeded, augmented batches of one shape (of one bucket's examples)."""
  buffer = shuffle_buffer or config.data.shuffle_buffer
  ds = _parsed(files, meta, bucket_of, index)
  ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()  # endless: every process stops on the same step count, none runs out first
  if config.data.augment_copies > 0:
    expand, apply = _augment(config.data.augment_copies, config.data.augment_max_drop, seed,
                             config.data.augment_fixed)
    ds = ds.flat_map(expand).enumerate().map(apply)
    ds = ds.shuffle(buffer, seed=seed + 1, reshuffle_each_iteration=False)
  ds = ds.map(lambda ex: pad_example(ex, config, shape=shape),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).skip(skip_batches)
  ds = ds.prefetch(config.data.prefetch)
  yield from _numpy(ds, files)


def num_train_examples(config, records_dir: str, split: str = 'train') -> int:
  """Examples per epoch after augmentation (originals + copies of histories with > 2 items)."""
  meta = records.read_metadata(records_dir)
  files = records.split_shards(records_dir, split)
  if config.data.augment_copies <= 0:
    return meta['splits'][split]['examples']
  history = split_lengths(files)[:, 2]  # lengths alone: no embedding is decoded
  return int(len(history) + config.data.augment_copies * (history > 2).sum())


def eval_batches(config, records_dir: str, split: str, local_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, Iterator[Batch]]:
  """(number of batches, iterator): each example once, every process the same batch count."""
  meta = records.read_metadata(records_dir)
  this_process = jax.process_index() if process_index is None else process_index
  num_processes = jax.process_count() if process_count is None else process_count
  files = records.split_shards(records_dir, split)
  if len(files) != len(meta['splits'][split]['shard_counts']):
    raise RecordsError(f'{records_dir}: {split} has {len(files)} finished shards of '
                       f'{len(meta["splits"][split]["shard_counts"])}; rerun precompute.')
  mine = _process_files(files, this_process, num_processes, records_dir)
  if config.data.bucketing == 'off':
    buckets = buckets_lib.candidates(config, np.zeros((0, 3), int))
    counts = meta['splits'][split]['shard_counts']
    per_bucket = np.array([[sum(counts[p::num_processes])] for p in range(num_processes)])
  else:
    lengths = [split_lengths(files[p::num_processes]) for p in range(num_processes)]
    buckets = buckets_lib.candidates(config, np.concatenate(lengths))
    per_bucket = np.stack([np.bincount(buckets.assign(*buckets_lib.clip(config, x)),
                                       minlength=len(buckets.shapes)) for x in lengths])
  batches = [math.ceil(n / local_batch_size) for n in per_bucket.max(0)]
  if sum(batches) == 0:  # an empty split still gives one (blank) batch
    batches[-1] = 1
  bucket_of = _bucket_fn(config, buckets) if len(buckets.shapes) > 1 else None
  dim = meta['fingerprint']['dim']
  ds = None
  for j, shape in enumerate(buckets.shapes):
    if not batches[j]:
      continue
    part = _parsed(mine, meta, bucket_of, j).map(
        lambda ex, shape=shape: pad_example(ex, config, with_item_ids=True, shape=shape))
    blank = {k: tf.zeros(s, tf.float32 if is_float(k) else tf.int32)
             for k, s in shapes(config, dim, *shape).items()}
    blank['id'] = tf.constant(b'')
    blank['target_text'] = tf.constant(b'')
    blank['history_item_ids'] = tf.fill([history_length(config)], b'')
    filler = batches[j] * local_batch_size - int(per_bucket[this_process, j])
    part = part.concatenate(tf.data.Dataset.from_tensors(blank).repeat(filler))
    part = part.batch(local_batch_size, drop_remainder=True)
    ds = part if ds is None else ds.concatenate(part)
  return sum(batches), _numpy(ds.prefetch(config.data.prefetch), mine)


def batch_of_records(config, serialized: list[bytes], dim: int,
                     shape: tuple[int, int]) -> Batch:
  """One numpy batch of in-memory serialized records (the inference API's), parsed and padded
  exactly as evaluation pads records read from disk."""
  parse = records.parse_fn(dim, config.data.embedding_dtype)
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(serialized, tf.string)).map(parse).map(
      lambda ex: pad_example(ex, config, with_item_ids=True, shape=shape))
  return next(ds.batch(len(serialized)).as_numpy_iterator())
