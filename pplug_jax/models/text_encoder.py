"""Batched, length-sorted sentence embedding with the Flax BERT (precompute and inference)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pplug_jax import tokenizers
from pplug_jax.data import buckets
from pplug_jax.models import bert, hf_weights
from pplug_jax.models.numerics import as_dtype


class TextEncoder:
  """Embeds texts with a Hugging Face BERT directory; one compile per padded length bucket."""

  def __init__(self, path: str, pooling: str | None = None, normalize: bool | None = None,
               dtype: str = 'float32', batch_size: int = 64, max_length: int = 512):
    overrides = {k: v for k, v in (('pooling', pooling), ('normalize', normalize)) if v is not None}
    self.config, self.params = hf_weights.load_bert(path, dtype=as_dtype(dtype), **overrides)
    self.tokenizer = tokenizers.load_tokenizer(path)
    self.batch_size = batch_size
    self.max_length = min(max_length, self.config.max_position_embeddings)
    self.dim = self.config.hidden_size
    model = bert.Bert(self.config)
    self._embed = jax.jit(lambda p, ids, mask: model.apply({'params': p}, ids, mask,
                                                           method=bert.Bert.embed_text))

  def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    return self.tokenizer(list(texts), truncation=True,
                          max_length=max_length or self.max_length)['input_ids']

  def encode(self, texts: Sequence[str], progress: str | None = None,
             max_length: int | None = None) -> np.ndarray:
    """[len(texts), dim] float32 embeddings, computed in length-sorted batches."""
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    max_length = min(max_length or self.max_length, self.config.max_position_embeddings)
    ids = self.tokenize(texts, max_length)
    order = np.argsort([len(x) for x in ids], kind='stable')
    bar = tqdm(total=len(texts), desc=progress, unit='items', disable=progress is None,
               mininterval=2.0)
    pad = self.tokenizer.pad_token_id or 0
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      # Tokens and rows padded to powers of two: a short call (one profile) stays cheap and
      # the compiles stay few.
      length = buckets.pad_size(max(len(ids[r]) for r in rows), max_length, minimum=16)
      num_rows = buckets.pad_size(len(rows), self.batch_size)
      batch = np.full((num_rows, length), pad, np.int32)
      mask = np.zeros((num_rows, length), np.int32)
      for j, r in enumerate(rows):
        batch[j, :len(ids[r])] = ids[r]
        mask[j, :len(ids[r])] = 1
      mask[len(rows):, 0] = 1  # padding rows: one token so the pooling stays finite
      emb = np.asarray(self._embed(self.params, jnp.asarray(batch), jnp.asarray(mask)))
      out[rows] = emb[:len(rows)]
      bar.update(len(rows))
    bar.close()
    return out
