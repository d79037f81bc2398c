"""The text encoder: data parallel over devices, bf16 by default on accelerators, prefetched."""

import threading
import time

import jax
import numpy as np
import pytest

from pplug_jax import precompute
from pplug_jax.errors import RecordsError
from pplug_jax.models import numerics, text_encoder
from pplug_jax.models.text_encoder import TextEncoder
from multidevice_util import run_on_8_devices
from test_precompute_pipeline import prepared  # noqa: F401  (the shared records fixture)


def test_eight_devices_shard_the_batch_and_equal_one(minilm_path):
  out = run_on_8_devices('sharded_encoder.py', str(minilm_path))
  assert out['row_params'] == ['4,64', '4,64']  # 32 rows over 8 devices, from the HLO
  assert out['max_abs_8_vs_1'] <= 1e-6
  # bfloat16 compute against float32 (unit-norm MiniLM embeddings): a dtype's difference
  assert out['max_abs_bf16_vs_f32'] <= 1e-2 and out['min_cos_bf16_vs_f32'] >= 0.999


def test_chunked_prefetched_batches_keep_every_text_in_its_place(minilm_path, monkeypatch):
  rng = np.random.RandomState(1)
  words = 'one two three four five six seven eight nine ten'.split()
  texts = [' '.join(rng.choice(words, rng.randint(1, 30))) for _ in range(150)]
  # 64 texts per tokenized chunk: three chunks, each sorted by length on its own
  monkeypatch.setattr(text_encoder, 'CHUNK_TEXTS', 64)
  enc = TextEncoder(str(minilm_path), batch_size=2, dtype='float32')
  got = enc.encode(texts)
  alone = np.stack([enc.encode([t])[0] for t in texts[::7]])  # each text in a batch of its own
  np.testing.assert_allclose(got[::7], alone, atol=2e-6)
  assert np.abs(got).sum(-1).min() > 0  # no row left unwritten


def test_a_failure_while_batching_reaches_the_caller():
  def broken():
    yield 1
    raise ValueError('tokenizer failed on item 2')
  items = text_encoder._in_background(broken(), depth=2)
  assert next(items) == 1
  with pytest.raises(ValueError, match='item 2'):
    next(items)


def test_a_consumer_that_stops_early_stops_the_producer():
  produced = []

  def endless():
    while True:
      produced.append(len(produced))
      yield produced[-1]
  before = threading.active_count()
  items = text_encoder._in_background(endless(), depth=2)
  assert [next(items) for _ in range(3)] == [0, 1, 2]
  items.close()  # as when the caller raises: the generator's finally stops and joins the thread
  assert threading.active_count() == before
  count = len(produced)
  time.sleep(0.2)
  assert len(produced) == count <= 3 + 2 + 1  # nothing produced after the close


def test_auto_dtype_is_bf16_on_accelerators_and_kept_by_existing_records(prepared, monkeypatch):  # noqa: F811
  assert [numerics.resolve_dtype('auto', b) for b in ('cpu', 'gpu', 'tpu')] == [
      'float32', 'bfloat16', 'bfloat16']
  assert numerics.resolve_dtype('float32', 'tpu') == 'float32'
  _, config, meta = prepared
  assert config.encoder.dtype == 'auto' and meta['fingerprint']['encoder_dtype'] == 'float32'
  # On a TPU 'auto' means bfloat16, but records already made keep their precision: float32
  # records serve a run there (and a resumed precompute goes on in float32) ...
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert precompute.fingerprint(config.as_configdict())['encoder_dtype'] == 'bfloat16'
  kept = precompute.verify_records(config.as_configdict(), config.data.records_dir)
  assert kept['fingerprint']['encoder_dtype'] == 'float32'
  # ... while a precision asked for by name is held to
  explicit = config.as_configdict()
  explicit.encoder.dtype = 'bfloat16'
  with pytest.raises(RecordsError, match=r"encoder_dtype: 'float32' -> 'bfloat16'"):
    precompute.verify_records(explicit, config.data.records_dir)
