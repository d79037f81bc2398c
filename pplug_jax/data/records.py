"""TFRecord schema of precomputed examples: one tf.train.Example per LaMP example.

Embeddings are stored as raw little-endian bytes in `metadata['embedding_dtype']` (float32 or
float16), history as [n, d] with n <= max_history, most recent last.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from etils import epy

with epy.lazy_imports():  # TensorFlow (and the Keras it loads) takes ~4 s: only when used
  import tensorflow as tf

from pplug_jax import fileio, storage
from pplug_jax.errors import ConfigError

METADATA = 'metadata.json'


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def serialize_example(*, example_id: str, input_ids: Sequence[int], target_ids: Sequence[int],
                      target_text: str, query_embedding: np.ndarray,
                      query_encoder_ids: Sequence[int], history_embeddings: np.ndarray,
                      history_dates: Sequence[str], history_item_ids: Sequence[str],
                      embedding_dtype: str) -> bytes:
  """One precomputed example as a serialized tf.train.Example."""
  emb = lambda a: np.ascontiguousarray(a, dtype=np.dtype(embedding_dtype).newbyteorder('<'))
  hist = emb(history_embeddings)
  feats = {
      'id': _bytes([example_id.encode()]),
      'input_ids': _ints(input_ids),
      'target_ids': _ints(target_ids),
      'target_text': _bytes([target_text.encode()]),
      'query_embedding': _bytes([emb(query_embedding).tobytes()]),
      'query_encoder_ids': _ints(query_encoder_ids),
      'history_embeddings': _bytes([hist.tobytes()]),
      'history_length': _ints([hist.shape[0]]),
      'history_dates': _bytes([d.encode() for d in history_dates]),
      'history_item_ids': _bytes([i.encode() for i in history_item_ids]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _spec() -> dict:
  """The feature spec of a record (built on first use: TensorFlow loads lazily)."""
  return {
      'id': tf.io.FixedLenFeature([], tf.string),
      'input_ids': tf.io.VarLenFeature(tf.int64),
      'target_ids': tf.io.VarLenFeature(tf.int64),
      'target_text': tf.io.FixedLenFeature([], tf.string),
      'query_embedding': tf.io.FixedLenFeature([], tf.string),
      'query_encoder_ids': tf.io.VarLenFeature(tf.int64),
      'history_embeddings': tf.io.FixedLenFeature([], tf.string),
      'history_length': tf.io.FixedLenFeature([], tf.int64),
      'history_dates': tf.io.VarLenFeature(tf.string),
      'history_item_ids': tf.io.VarLenFeature(tf.string),
  }


def parse_fn(dim: int, embedding_dtype: str):
  """Returns a tf function: serialized example -> dict of variable-length tensors."""
  tf_dtype = tf.as_dtype(embedding_dtype)
  spec = _spec()

  def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    ex = tf.io.parse_single_example(serialized, spec)
    out = {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v
           for k, v in ex.items()}
    out['query_embedding'] = tf.cast(tf.io.decode_raw(out['query_embedding'], tf_dtype,
                                                      little_endian=True), tf.float32)
    hist = tf.io.decode_raw(out['history_embeddings'], tf_dtype, little_endian=True)
    out['history_embeddings'] = tf.cast(tf.reshape(hist, [-1, dim]), tf.float32)
    for k in ('input_ids', 'target_ids', 'query_encoder_ids', 'history_length'):
      out[k] = tf.cast(out[k], tf.int32)
    return out

  return parse


def records_dir(config, workdir: str = '') -> str:
  """Where a run's records are: config.data.records_dir, else <workdir>/records."""
  if config.data.records_dir:
    return config.data.records_dir
  if not workdir:
    raise ConfigError('config.data.records_dir is empty and no --workdir was given.')
  return os.path.join(workdir, 'records')


def shard_path(out_dir: str, split: str, shard: int, num_shards: int) -> str:
  return os.path.join(out_dir, f'{split}.tfrecord-{shard:05d}-of-{num_shards:05d}')


def split_shards(records_dir: str, split: str) -> list[str]:
  """The finished shard files of a split, in order."""
  files = sorted(storage.glob(os.path.join(records_dir, f'{split}.tfrecord-*-of-*')))
  return [f for f in files if not f.endswith('.tmp')]


def read_metadata(records_dir: str) -> dict[str, Any]:
  path = os.path.join(records_dir, METADATA)
  if not storage.exists(path):
    raise FileNotFoundError(f'{records_dir}: no {METADATA}. Run `python -m pplug_jax.precompute '
                            '--config ...` first (or set config.data.records_dir).')
  with storage.open(path) as f:
    return json.load(f)


def _masked_crc(data: bytes) -> int:
  import google_crc32c
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff


def write_shard(path: str, serialized: Iterable[bytes]) -> None:
  """Writes a TFRecord shard so that it appears only whole.

  Locally: tf.io.TFRecordWriter into `path.tmp`, then a rename. On an object store, where TF's
  own client cannot be pointed at anything but Google's endpoint, the same TFRecord framing is
  streamed through `storage` (an object exists only once its upload completes)."""
  if not storage.is_remote(path):
    with tf.io.TFRecordWriter(path + '.tmp') as w:
      for s in serialized:
        w.write(s)
    os.replace(path + '.tmp', path)
    return
  with storage.open(path, 'wb') as f:
    for s in serialized:
      head = struct.pack('<Q', len(s))
      f.write(head + struct.pack('<I', _masked_crc(head)) + s + struct.pack('<I', _masked_crc(s)))


def _read_framed(files: Sequence[str]) -> Iterator[bytes]:
  """The records of TFRecord files read through `storage`, every CRC checked."""
  for file in files:
    with storage.open(file, 'rb') as f:
      while head := f.read(12):
        if len(head) < 12:
          raise ValueError(f'{file}: truncated record header')
        (n,) = struct.unpack('<Q', head[:8])
        if struct.unpack('<I', head[8:])[0] != _masked_crc(head[:8]):
          raise ValueError(f'{file}: corrupted record length')
        body = f.read(n + 4)
        if len(body) < n + 4 or struct.unpack('<I', body[n:])[0] != _masked_crc(body[:n]):
          raise ValueError(f'{file}: truncated or corrupted record')
        yield body[:n]


def dataset(files: Sequence[str]) -> tf.data.Dataset:
  """The serialized records of `files` in order: tf.data's reader for local files, the
  `storage` reader (same records, CRCs checked) for an object store."""
  files = list(files)
  if not any(storage.is_remote(f) for f in files):
    return tf.data.TFRecordDataset(files)
  return tf.data.Dataset.from_generator(lambda: _read_framed(files),
                                        output_signature=tf.TensorSpec([], tf.string))


def write_metadata(records_dir: str, meta: dict[str, Any]) -> None:
  fileio.write_json(os.path.join(records_dir, METADATA), meta)
