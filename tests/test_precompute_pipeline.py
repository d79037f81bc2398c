"""Precompute -> TFRecords -> tf.data pipeline, checked against the encoder run directly."""

import itertools
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import lamp as lamp_config
from pplug_jax import precompute, tokenizers
from pplug_jax.data import lamp, pipeline, records, synthetic
from pplug_jax.errors import RecordsError
from pplug_jax.models import bert, hf_weights

USERS = {'train': 24, 'dev': 11, 'test': 7}


def _config(tmp, minilm_path, **data):
  c = lamp_config.get_config('demo')
  c.data.lamp_dir = str(tmp / 'lamp')
  c.data.records_dir = str(tmp / 'rec')
  c.encoder.path = str(minilm_path)
  c.data.num_shards = 3
  c.data.max_history = 40
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, minilm_path):
  tmp = tmp_path_factory.mktemp('pre')
  synthetic.generate(str(tmp / 'lamp'), 'LaMP_2', users=USERS, seed=1, empty_frac=0.1,
                     long_frac=0.0, mean_items=8)
  config = _config(tmp, minilm_path)
  meta = precompute.run(config)
  # frozen: a test that needs other settings changes a copy (_changed), never the shared one
  return tmp, ml_collections.FrozenConfigDict(config), meta


def _changed(config, **changes):
  """A mutable copy of a (frozen) config with `section.key` changes, e.g. data__max_history."""
  out = config.as_configdict()
  for key, value in changes.items():
    section, name = key.split('__')
    out[section][name] = value
  return out


def _records(config, split):
  meta = records.read_metadata(config.data.records_dir)
  parse = records.parse_fn(meta['fingerprint']['dim'], meta['fingerprint']['embedding_dtype'])
  files = records.split_shards(config.data.records_dir, split)
  return {r['id'].decode(): r for r in
          tf.data.TFRecordDataset(files).map(parse).as_numpy_iterator()}


def test_records_hold_exactly_the_encoders_embeddings(prepared, minilm_path):
  tmp, config, meta = prepared
  assert meta['splits']['dev']['examples'] == USERS['dev']
  assert meta['fingerprint']['dim'] == 384 and meta['stats']['items_per_second'] > 0
  examples = {e.id: e for e in lamp.load_split(config.data.lamp_dir, 'LaMP_2', 'dev')}
  recs = _records(config, 'dev')
  assert set(recs) == set(examples)
  # the encoder run directly: one text at a time, no batching, no length sorting
  bconf, params = hf_weights.load_bert(str(minilm_path))
  tok = tokenizers.load_tokenizer(str(minilm_path))
  model = bert.Bert(bconf)

  def direct(text):
    enc = tok([text], truncation=True, max_length=config.data.item_max_length, return_tensors='np')
    return np.asarray(model.apply({'params': params}, jnp.asarray(enc['input_ids']),
                                  jnp.asarray(enc['attention_mask']),
                                  method=bert.Bert.embed_text))[0]

  checked = 0
  for eid, ex in list(examples.items())[:5]:
    r = recs[eid]
    hist = lamp.recent_history(ex.profile, config.data.max_history)
    assert r['history_embeddings'].shape == (len(hist), 384)
    assert [i.decode() for i in r['history_item_ids']] == [i.id for i in hist]
    for k in range(0, len(hist), 3):
      np.testing.assert_allclose(r['history_embeddings'][k], direct(hist[k].text), atol=2e-5)
      checked += 1
    np.testing.assert_allclose(r['query_embedding'], direct(ex.query), atol=2e-5)
    assert r['target_text'].decode() == ex.output
  assert checked > 5

  # ... and the pipeline yields them unchanged, padded, with masks
  n, it = pipeline.eval_batches(config, config.data.records_dir, 'dev', 4)
  for batch in it:
    for row in range(4):
      if not batch['valid'][row]:
        continue
      r = recs[batch['id'][row].decode()]
      m = int(batch['history_mask'][row].sum())
      assert m == r['history_length']
      np.testing.assert_array_equal(batch['history'][row, :m], r['history_embeddings'])
      assert not batch['history'][row, m:].any()


def test_eval_sees_every_example_once_across_processes(prepared):
  _, config, _ = prepared
  all_ids = set(_records(config, 'dev'))
  seen = []
  counts = set()
  for pi in range(3):
    n, it = pipeline.eval_batches(config, config.data.records_dir, 'dev', 2, pi, 3)
    batches = list(it)
    assert len(batches) == n
    counts.add(n)
    for b in batches:
      seen += [i.decode() for i, v in zip(b['id'], b['valid']) if v]
      assert all(i == b'' for i, v in zip(b['id'], b['valid']) if not v)
  assert len(counts) == 1  # processes step together
  assert sorted(seen) == sorted(all_ids)


def test_augmentation_keeps_items_and_is_deterministic():
  hist = tf.reshape(tf.range(30, dtype=tf.float32), [10, 3])
  for n in (3, 4, 10):
    for s in range(40):
      out = pipeline.drop_history_items(hist[:n], tf.constant([7, s], tf.int64), 0.5).numpy()
      assert (n + 1) // 2 <= out.shape[0] <= n
      rows = out[:, 0].astype(int) // 3
      assert list(rows) == sorted(set(rows))  # a subset, in the original order
  a = pipeline.drop_history_items(hist, tf.constant([1, 2], tf.int64), 0.5).numpy()
  b = pipeline.drop_history_items(hist, tf.constant([1, 2], tf.int64), 0.5).numpy()
  np.testing.assert_array_equal(a, b)


def test_training_batches_deterministic_augmented_and_resumable(prepared):
  _, frozen, _ = prepared
  config = _changed(frozen, data__augment_copies=3)
  total = pipeline.num_train_examples(config, config.data.records_dir)
  n = total * config.optim.epochs // 4  # the data repeats endlessly; training stops on steps
  run = lambda skip=0: list(itertools.islice(
      pipeline.train_batches(config, config.data.records_dir, 4, skip), n - skip))
  a, b = run(), run()
  assert len(a) == len(b) == n > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['history'], y['history'])
    np.testing.assert_array_equal(x['id'], y['id'])
  # a copy never has an empty history, and keeps at least half of it (augment_max_drop 0.5);
  # a history of at most 2 items is never cut
  original = {i: int(r['history_length']) for i, r in _records(config, 'train').items()}
  cut = 0
  for batch in a:
    for eid, kept in zip(batch['id'], batch['history_mask'].sum(1)):
      full = min(original[eid.decode()], config.data.max_history)
      if full <= 2:
        assert kept == full
      else:
        assert full - full // 2 <= kept <= full
        cut += kept < full
  assert cut > 0  # copies that dropped items were seen
  resumed = run(skip=2)
  assert len(resumed) == len(a) - 2
  np.testing.assert_array_equal(resumed[0]['history'], a[2]['history'])


def test_interrupted_precompute_resumes(tmp_path, prepared, minilm_path):
  src_tmp, full_config, _ = prepared
  config = _config(src_tmp, minilm_path)
  config.data.records_dir = str(tmp_path / 'rec')
  precompute.run(config, stop_after_shards=2)
  done = records.split_shards(config.data.records_dir, 'train')
  assert len(done) == 2 and not records.split_shards(config.data.records_dir, 'dev')
  mtimes = {f: os.path.getmtime(f) for f in done}
  precompute.run(config)
  for f, t in mtimes.items():
    assert os.path.getmtime(f) == t  # finished shards kept
  for split in ('train', 'dev', 'test'):
    a, b = _records(config, split), _records(full_config, split)
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k]['history_embeddings'], b[k]['history_embeddings'])
      np.testing.assert_array_equal(a[k]['input_ids'], b[k]['input_ids'])


def test_refuses_records_of_another_encoder_setting(prepared, minilm_path):
  _, frozen, _ = prepared
  config = _changed(frozen, encoder__pooling='cls')
  # the records' own refusal, naming the one setting that changed (not any error that says
  # "pooling", such as the encoder's own)
  with pytest.raises(RecordsError, match=r"these records were made with other settings "
                     r"\(pooling: 'mean' -> 'cls'\)\. Use a new config\.data\.records_dir"):
    precompute.run(config)
