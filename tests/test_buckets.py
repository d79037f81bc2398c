"""Length buckets: the rule, and that they change no loss, no prediction, no data order rule."""

import itertools

import jax
import numpy as np
import pytest

from configs import lamp as lamp_config
from pplug_jax import generation, partitioning, precompute, system as system_lib
from pplug_jax.data import buckets, pipeline, synthetic

USERS = {'train': 40, 'dev': 21, 'test': 3}


def test_rule_picks_quantile_bounds_and_the_smallest_shape():
  config = lamp_config.get_config('task=7')  # maxima 256 x 128
  lengths = np.array([[i, 1 + i % 20, 5] for i in range(1, 101)])  # inputs 1..100
  b = buckets.candidates(config, lengths)
  # inputs: 50th percentile 51 -> 64, 90th 91 -> 96, and 256; targets: 90th 19 -> 24, and 128
  assert b.shapes == ((64, 24), (96, 24), (256, 24), (64, 128), (96, 128), (256, 128))
  got = b.assign(np.array([10, 64, 65, 70, 300]), np.array([3, 24, 3, 30, 500]))
  assert [b.shapes[i] for i in got] == [(64, 24), (64, 24), (96, 24), (96, 128), (256, 128)]
  config.data.bucketing = 'off'
  assert buckets.candidates(config, lengths).shapes == ((256, 128),)
  config.data.bucketing = 'auto'
  config.data.input_buckets = (32,)
  assert {s[0] for s in buckets.candidates(config, lengths).shapes} == {32, 256}


def test_a_shape_some_stream_lacks_is_merged_into_a_larger_one():
  config = lamp_config.get_config('task=7')
  a = np.array([[10, 5, 1]] * 8 + [[200, 100, 1]])
  b = np.array([[100, 5, 1]] * 9)  # no short inputs in this stream
  plan, weights = buckets.for_training(config, [a, b], copies=0)
  for lengths in (a, b):  # every remaining shape has examples in both streams
    idx = plan.assign(*buckets.clip(config, lengths))
    assert (idx >= 0).all()
  counts = [np.bincount(plan.assign(*buckets.clip(config, x)), minlength=len(plan.shapes))
            for x in (a, b)]
  assert all((c > 0).all() or j == len(plan.shapes) - 1 for c in counts for j in range(len(c)))
  assert weights.sum() == pytest.approx(1.0)
  s = buckets.schedule(0, weights, 0, 5000)
  assert (s == buckets.schedule(0, weights, 0, 5000)).all()
  assert (buckets.schedule(0, weights, 4000, 1000) == s[4000:]).all()


@pytest.fixture(scope='module')
def lamp7(tmp_path_factory, minilm_path):
  """LaMP-7-shaped records (byte tokens: inputs ~170, outputs ~100) and a tiny random system."""
  tmp = tmp_path_factory.mktemp('buckets')
  synthetic.generate(str(tmp / 'lamp'), 'LaMP_7', users=USERS, seed=2, empty_frac=0.1,
                     long_frac=0.0, mean_items=6, lengths='lamp')
  config = lamp_config.get_config('demo')
  config.task = 'LaMP_7'
  config.data.update(lamp_dir=str(tmp / 'lamp'), records_dir=str(tmp / 'rec'), num_shards=4,
                     max_input_length=384, max_target_length=192, max_history=16,
                     augment_copies=1, shuffle_buffer=64)
  config.encoder.path = str(minilm_path)
  config.eval.max_new_tokens = 24
  precompute.run(config)
  from pplug_jax import demo
  config.demo_model.pretrain_steps = 0  # a random frozen byte-level T5 is enough here
  config.llm.path = str(tmp / 't5')
  demo.pretrain_tiny_t5(config, config.llm.path)
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  system = system_lib.load_system(config, 384, mesh)
  return config, system


def _off(config):
  c = config.copy_and_resolve_references()
  c.data.bucketing = 'off'
  return c


@pytest.mark.slow
def test_bucketed_evaluation_equals_padded_nll_and_greedy_predictions(lamp7):
  config, system = lamp7
  trainable = system.init_trainable(0)
  n, it = pipeline.eval_batches(config, config.data.records_dir, 'dev', 8)
  shapes = {(b['input_ids'].shape[1], b['target_ids'].shape[1]) for b in it}
  assert len(shapes) > 1 and (384, 192) not in shapes  # less padding than the maxima
  got = generation.SplitGenerator(system, config).generate_split(
      trainable, config.data.records_dir, 'dev', 8)
  want = generation.SplitGenerator(system, _off(config)).generate_split(
      trainable, config.data.records_dir, 'dev', 8)
  assert len(got['predictions']) == USERS['dev']
  assert got['predictions'] == want['predictions']
  assert got['nll'] == pytest.approx(want['nll'], rel=1e-5)


def test_a_bucketed_training_batch_has_the_padded_batchs_loss(lamp7):
  config, system = lamp7
  trainable = system.init_trainable(0)
  batch = next(pipeline.train_batches(config, config.data.records_dir, 8))
  li, lt = batch['input_ids'].shape[1], batch['target_ids'].shape[1]
  padded = dict(batch)
  for key, length in (('input_ids', 384), ('input_mask', 384), ('target_ids', 192),
                      ('target_mask', 192)):
    padded[key] = np.pad(batch[key], [(0, 0), (0, length - batch[key].shape[1])])
  numeric = lambda b: {k: v for k, v in b.items() if v.dtype.kind not in 'SUO'}
  loss = float(jax.jit(system.loss)(trainable, system.llm_params, numeric(batch)))
  loss_padded = float(jax.jit(system.loss)(trainable, system.llm_params, numeric(padded)))
  assert (li, lt) != (384, 192)
  assert loss == pytest.approx(loss_padded, rel=1e-5)


def _signature(batch):
  return (batch['input_ids'].shape[1], batch['target_ids'].shape[1],
          tuple(i.decode() for i in batch['id']))


def test_training_order_is_seeded_and_resumes_at_the_exact_batch(lamp7):
  config, _ = lamp7
  rdir = config.data.records_dir
  first = [_signature(b) for b in itertools.islice(pipeline.train_batches(config, rdir, 4), 24)]
  again = [_signature(b) for b in itertools.islice(pipeline.train_batches(config, rdir, 4), 24)]
  assert first == again
  assert len({s[:2] for s in first}) > 1  # several shapes take turns
  resumed = [_signature(b) for b in itertools.islice(
      pipeline.train_batches(config, rdir, 4, skip_batches=9), 15)]
  assert resumed == first[9:]
  other = config.copy_and_resolve_references()
  other.seed = 1
  assert [_signature(b) for b in itertools.islice(
      pipeline.train_batches(other, rdir, 4), 24)] != first


def test_every_process_runs_the_same_shapes(lamp7):
  config, _ = lamp7
  rdir = config.data.records_dir
  c = config.copy_and_resolve_references()
  c.data.num_streams = 2
  per_process = [[_signature(b) for b in itertools.islice(
      pipeline.train_batches(c, rdir, 2, process_index=p, process_count=2), 20)]
                 for p in range(2)]
  assert [s[:2] for s in per_process[0]] == [s[:2] for s in per_process[1]]
  # ... and one process running both streams sees exactly their union, step by step
  both = [_signature(b) for b in itertools.islice(pipeline.train_batches(c, rdir, 4), 20)]
  assert [s[2] for s in both] == [a[2] + b[2] for a, b in zip(*per_process)]

  seen, sequences = [], []
  for p in range(3):
    n, it = pipeline.eval_batches(config, rdir, 'dev', 2, p, 3)
    batches = list(it)
    assert len(batches) == n
    sequences.append([(b['input_ids'].shape[1], b['target_ids'].shape[1]) for b in batches])
    seen += [i.decode() for b in batches for i, ok in zip(b['id'], b['valid']) if ok]
  assert sequences[0] == sequences[1] == sequences[2]
  assert sorted(seen) == sorted(set(seen)) and len(seen) == USERS['dev']
