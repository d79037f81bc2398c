"""Batched, length-sorted sentence embedding with the Flax BERT (precompute, rankers, inference).

Every batch is sharded over this process's devices (data parallel; the weights are
replicated), and the host tokenizes and pads the next batches in a background thread while the
devices run the current one, so the chips do not wait on the host. Across processes the work is
divided by the callers (precompute: each process its own record shards).
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from pplug_jax import tokenizers
from pplug_jax.data import buckets
from pplug_jax.models import bert, hf_weights
from pplug_jax.models.numerics import as_dtype, resolve_dtype

# texts tokenized (and length-sorted) together: enough that sorting packs batches as well as
# sorting everything would (a shard of a small dataset is one chunk), few enough that the
# devices start within a second
CHUNK_TEXTS = 1 << 16
# batches built ahead of the devices
_PREFETCH = 4


def _in_background(items: Iterator, depth: int) -> Iterator:
  """Yields what `items` yields, produced by a thread that runs up to `depth` items ahead (an
  exception in it is raised here). When the consumer stops early (an error, or it is closed)
  the thread stops too, and is joined before this returns."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  done = object()
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
      put(done)
    except BaseException as e:  # pylint: disable=broad-except
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while (item := q.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


class TextEncoder:
  """Embeds texts with a Hugging Face BERT directory; one compile per padded length bucket.

  `dtype` is the compute (and weight) dtype, or 'auto': bfloat16 on TPU and GPU, float32 on
  CPU (`self.dtype` holds the choice; the records fingerprint it). Pooling and the output are
  float32 either way. `batch_size` is the global batch over `devices` (default: this process's
  devices), rounded up to a multiple of their number.
  """

  def __init__(self, path: str, pooling: str | None = None, normalize: bool | None = None,
               dtype: str = 'auto', batch_size: int = 64, max_length: int = 512,
               devices: Sequence[jax.Device] | None = None):
    self.dtype = resolve_dtype(dtype)
    devices = list(devices if devices is not None else jax.local_devices())
    self.mesh = Mesh(np.asarray(devices), ('data',))
    self.num_devices = len(devices)
    overrides = {k: v for k, v in (('pooling', pooling), ('normalize', normalize)) if v is not None}
    self.config, params = hf_weights.load_bert(path, dtype=as_dtype(self.dtype),
                                               compute_dtype=as_dtype(self.dtype), **overrides)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._rows = NamedSharding(self.mesh, PartitionSpec('data'))
    self.params = jax.device_put(params, replicated)
    self.tokenizer = tokenizers.load_tokenizer(path)
    self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
    self.max_length = min(max_length, self.config.max_position_embeddings)
    self.dim = self.config.hidden_size
    model = bert.Bert(self.config)
    self._embed = jax.jit(lambda p, ids, mask: model.apply({'params': p}, ids, mask,
                                                           method=bert.Bert.embed_text),
                          in_shardings=(replicated, self._rows, self._rows),
                          out_shardings=self._rows)

  def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    return self.tokenizer(list(texts), truncation=True,
                          max_length=max_length or self.max_length)['input_ids']

  def _padded_rows(self, n: int) -> int:
    """Rows of a batch of n texts: a power of two (few compiles) that the devices divide."""
    rows = max(buckets.pad_size(n, self.batch_size), self.num_devices)
    return -(-rows // self.num_devices) * self.num_devices

  def _batches(self, texts: Sequence[str], max_length: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(row indices into texts, padded ids, mask): chunks tokenized together, length-sorted."""
    pad = self.tokenizer.pad_token_id or 0
    chunk = CHUNK_TEXTS
    for first in range(0, len(texts), chunk):
      ids = self.tokenize(texts[first:first + chunk], max_length)
      order = np.argsort([len(x) for x in ids], kind='stable')
      for start in range(0, len(order), self.batch_size):
        rows = order[start:start + self.batch_size]
        # Tokens padded to powers of two too: a short call (one profile) stays cheap and the
        # compiles stay few.
        length = buckets.pad_size(max(len(ids[r]) for r in rows), max_length, minimum=16)
        num_rows = self._padded_rows(len(rows))
        batch = np.full((num_rows, length), pad, np.int32)
        mask = np.zeros((num_rows, length), np.int32)
        for j, r in enumerate(rows):
          batch[j, :len(ids[r])] = ids[r]
          mask[j, :len(ids[r])] = 1
        mask[len(rows):, 0] = 1  # padding rows: one token so the pooling stays finite
        yield rows + first, batch, mask

  def encode(self, texts: Sequence[str], progress: str | None = None,
             max_length: int | None = None) -> np.ndarray:
    """[len(texts), dim] float32 embeddings, computed in length-sorted batches."""
    out = np.zeros((len(texts), self.dim), np.float32)
    if not len(texts):
      return out
    texts = list(texts)
    max_length = min(max_length or self.max_length, self.config.max_position_embeddings)
    bar = tqdm(total=len(texts), desc=progress, unit='items', disable=progress is None,
               mininterval=2.0)
    in_flight: collections.deque = collections.deque()

    def collect():
      rows, emb = in_flight.popleft()
      out[rows] = np.asarray(emb)[:len(rows)]
      bar.update(len(rows))

    for rows, batch, mask in _in_background(self._batches(texts, max_length), _PREFETCH):
      # dispatch is asynchronous: the devices run this batch while the host copies the last
      in_flight.append((rows, self._embed(self.params, jax.device_put(batch, self._rows),
                                          jax.device_put(mask, self._rows))))
      if len(in_flight) > 1:
        collect()
    while in_flight:
      collect()
    bar.close()
    return out
