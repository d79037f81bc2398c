"""The plug's variants: mean pooling, no instruction token, K persona tokens, time decay.

Each forward is checked against a numpy transcription of its formula; each default against
today's PPlug (the module as it was before the variants, kept verbatim below) bit for bit.
"""

import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import linen as nn
from scipy.special import erf

from configs import lamp as lamp_config
from pplug_jax import partitioning, system as system_lib, validation
from pplug_jax.data import pipeline, synthetic
from pplug_jax.errors import ConfigError
from pplug_jax.models import plug as plug_lib
from pplug_jax.models.layers import NEG_INF, param

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DE, DL = 12, 8


class TodaysPlug(nn.Module):
  """PersonaPlug before the variants (commit 6699f85), verbatim: the bit-exact reference."""
  encoder_dim: int
  llm_dim: int
  persona_scale: float
  instruction_scale: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, history, history_mask):
    query = query.astype(jnp.float32)
    history = history.astype(jnp.float32)
    mask = history_mask > 0
    scores = jnp.einsum('bd,bhd->bh', query, history)
    weights = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1) * mask
    projected = plug_lib.ProjectionMLP(self.llm_dim, self.dtype, name='align_mlp')(history)
    persona = jnp.einsum('bh,bhd->bd', weights, projected.astype(jnp.float32))
    v = param(self, 'inst_token', nn.initializers.normal(self.encoder_dim**-0.5),
              (self.encoder_dim,), jnp.float32, ('plug_in',))
    inst = plug_lib.ProjectionMLP(self.llm_dim, self.dtype, name='align_mlp_inst')(v[None])
    inst = jnp.broadcast_to(inst.astype(jnp.float32), persona.shape)
    soft = jnp.stack([inst * self.instruction_scale, persona * self.persona_scale], axis=1)
    return soft, weights


def _inputs(n=4, hist=6, seed=0):
  rng = np.random.RandomState(seed)
  h = rng.normal(size=(n, hist, DE)).astype(np.float32)
  h /= np.linalg.norm(h, axis=-1, keepdims=True)
  m = (rng.rand(n, hist) < 0.7).astype(np.int32)
  m[:, 0] = 1
  m[-1] = 0  # a user with no history
  q = rng.normal(size=(n, DE)).astype(np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  age = (rng.rand(n, hist) * 400).round().astype(np.float32) * m
  return q, h, m, age


def _plug(**variant):
  return plug_lib.PersonaPlug(DE, DL, 3.0, 0.5, **variant)


def _init(plug, q, h, m, age=None, seed=0):
  return nn.meta.unbox(plug.init(jax.random.PRNGKey(seed), q, h, m, age)['params'])


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _mlp(p, x):
  return _gelu(x @ p['fc1']['kernel'] + p['fc1']['bias']) @ p['fc2']['kernel'] + p['fc2']['bias']


def _softmax_masked(s, m):
  s = np.where(m > 0, s, -np.inf)
  top = np.max(np.where(np.isfinite(s), s, -1e30), axis=-1, keepdims=True)
  e = np.where(m > 0, np.exp(s - top), 0.0)
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)


def oracle(params, q, h, m, age=None, pooling='attention', instruction=True, k=1,
           lam=None):
  """The variants' formulas in float64 numpy."""
  p = _np(params)
  q, h, m = (np.asarray(x, np.float64) for x in (q, h, m))
  queries = q[:, None] + (p['persona_offsets'][None] if k > 1 else 0.0)  # [B, K, de]
  if pooling == 'mean':
    scores = np.zeros(m.shape)[:, None]
  else:
    scores = np.einsum('bkd,bhd->bkh', queries, h)
  if lam is not None:
    scores = scores - lam * np.asarray(age, np.float64)[:, None]
  w = _softmax_masked(scores, m[:, None])  # [B, K, H]
  personas = np.einsum('bkh,bhd->bkd', w, _mlp(p['align_mlp'], h)) * 3.0
  tokens = [personas]
  if instruction:
    inst = _mlp(p['align_mlp_inst'], p['inst_token'][None]) * 0.5
    tokens.insert(0, np.broadcast_to(inst[None], (len(q), 1, DL)))
  return np.concatenate(tokens, axis=1), w.mean(1)


# ------------------------------------------------------------------ defaults = today, bit for bit

def test_default_plug_is_todays_plug_bit_for_bit():
  q, h, m, _ = _inputs()
  old, new = TodaysPlug(DE, DL, 3.0, 0.5), _plug()
  p_old = nn.meta.unbox(old.init(jax.random.PRNGKey(7), q, h, m)['params'])
  p_new = _init(new, q, h, m, seed=7)
  assert jax.tree.structure(p_old) == jax.tree.structure(p_new)
  for a, b in zip(jax.tree.leaves(p_old), jax.tree.leaves(p_new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  s_old, w_old = old.apply({'params': p_old}, q, h, m)
  s_new, w_new = new.apply({'params': p_old}, q, h, m)  # old params load into the new plug
  np.testing.assert_array_equal(np.asarray(s_old), np.asarray(s_new))
  np.testing.assert_array_equal(np.asarray(w_old), np.asarray(w_new))
  # the config's defaults build exactly this plug
  assert plug_lib.variant_settings(lamp_config.get_config('demo').plug) == \
      plug_lib.variant_settings({})
  assert plug_lib.num_soft_tokens(lamp_config.get_config('demo').plug) == 2


def test_zero_offsets_and_zero_lambda_give_todays_persona():
  q, h, m, age = _inputs(seed=1)
  old = TodaysPlug(DE, DL, 3.0, 0.5)
  p_old = nn.meta.unbox(old.init(jax.random.PRNGKey(3), q, h, m)['params'])
  s_old, w_old = (np.asarray(x) for x in old.apply({'params': p_old}, q, h, m))
  # K = 4 with its zero-initialised offsets: every persona token is today's persona
  k4 = _plug(num_persona_tokens=4)
  p4 = _init(k4, q, h, m, seed=3)
  np.testing.assert_array_equal(np.asarray(p4['persona_offsets']), 0.0)
  np.testing.assert_array_equal(np.asarray(p4['inst_token']), np.asarray(p_old['inst_token']))
  s4, w4 = k4.apply({'params': p4}, q, h, m)
  assert s4.shape == (4, 5, DL)
  np.testing.assert_allclose(np.asarray(s4[:, 0]), s_old[:, 0], rtol=0, atol=0)
  for j in range(1, 5):
    np.testing.assert_allclose(np.asarray(s4[:, j]), s_old[:, 1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(w4), w_old, rtol=1e-6, atol=1e-7)
  # time decay with lambda = 0 (raw = -inf): today's pooling exactly
  td = _plug(time_decay='learned')
  p_td = dict(p_old, time_decay_raw=jnp.float32(-jnp.inf))
  s_td, w_td = td.apply({'params': p_td}, q, h, m, age)
  np.testing.assert_array_equal(np.asarray(s_td), s_old)
  np.testing.assert_array_equal(np.asarray(w_td), w_old)


# ------------------------------------------------------------------ each variant against numpy

VARIANTS = {
    'mean': dict(pooling='mean'),
    'no_instruction': dict(instruction=False),
    'k3': dict(num_persona_tokens=3),
    'time_decay': dict(time_decay='learned', time_decay_init=0.004),
    'k3_time_decay_no_instruction': dict(num_persona_tokens=3, time_decay='learned',
                                         instruction=False, time_decay_init=0.01),
}


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_variant_forward_matches_numpy(name):
  variant = VARIANTS[name]
  q, h, m, age = _inputs(seed=2)
  plug = _plug(**variant)
  params = _init(plug, q, h, m, age, seed=4)
  k = variant.get('num_persona_tokens', 1)
  if k > 1:  # trained offsets are not zero: give them values
    params['persona_offsets'] = jnp.asarray(
        np.random.RandomState(5).normal(size=(k, DE)).astype(np.float32))
  lam = None
  if variant.get('time_decay') == 'learned':
    lam = float(np.log1p(np.exp(np.float64(params['time_decay_raw']))))
    np.testing.assert_allclose(lam, variant['time_decay_init'], rtol=1e-6)
  soft, w = plug.apply({'params': params}, q, h, m, age if lam is not None else None)
  want, want_w = oracle(params, q, h, m, age, variant.get('pooling', 'attention'),
                        variant.get('instruction', True), k, lam)
  assert soft.shape == want.shape == (4, plug.num_soft_tokens, DL)
  np.testing.assert_allclose(np.asarray(soft), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(soft[-1, int(plug.instruction):]), 0.0)  # no history


def test_mean_pooling_is_uniform_over_the_real_items():
  q, h, m, _ = _inputs(seed=3)
  plug = _plug(pooling='mean')
  params = _init(plug, q, h, m)
  soft, w = plug.apply({'params': params}, q, h, m)
  counts = m.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(w), m / np.maximum(counts, 1), rtol=1e-7)
  # the query does not matter
  soft2, _ = plug.apply({'params': params}, -q, h, m)
  np.testing.assert_array_equal(np.asarray(soft), np.asarray(soft2))


def test_time_decay_lambda_gradient_matches_finite_differences():
  q, h, m, age = _inputs(seed=4)
  age = age / 100.0  # keep the softmax away from one-hot so the gradient is informative
  plug = _plug(time_decay='learned', time_decay_init=0.5)
  params = _init(plug, q, h, m, age)
  r = jnp.asarray(np.random.RandomState(0).normal(size=(4, 2, DL)).astype(np.float32))

  def loss(raw):
    soft, _ = plug.apply({'params': dict(params, time_decay_raw=raw)}, q, h, m, age)
    return jnp.sum(soft * r)

  raw0 = params['time_decay_raw']
  grad = float(jax.grad(loss)(raw0))
  eps = 1e-2
  fd = (float(loss(raw0 + eps)) - float(loss(raw0 - eps))) / (2 * eps)
  assert abs(grad) > 1e-3
  np.testing.assert_allclose(grad, fd, rtol=2e-2)


# ------------------------------------------------------------------ in the system and the batch

def _system(tiny_t5, **plug_keys):
  config = lamp_config.get_config('demo')
  config.llm.path = tiny_t5['v1.1'][0]
  config.llm.param_dtype = config.llm.dtype = 'float32'
  config.plug.update(plug_keys)
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  return config, system_lib.load_system(config, DE, mesh)


def _batch(with_age=False):
  q, h, m, age = _inputs(seed=5)
  rng = np.random.RandomState(1)
  ids = rng.randint(2, 96, (4, 7)).astype(np.int32)
  imask = np.ones_like(ids)
  imask[1, 5:] = 0
  b = dict(query_embedding=q, history=h, history_mask=m, input_ids=ids, input_mask=imask,
           target_ids=ids[:, :3], target_mask=np.ones_like(ids[:, :3]))
  if with_age:
    b['history_age'] = age
  return {k: jnp.asarray(v) for k, v in b.items()}


def test_no_instruction_token_gives_one_soft_token_with_masks_right(tiny_t5):
  _, default = _system(tiny_t5)
  _, system = _system(tiny_t5, instruction=False)
  assert system.plug.num_soft_tokens == 1
  trainable = system.init_trainable(0)
  assert set(trainable['plug']) == {'align_mlp'}
  batch = _batch()
  embedded, mask = system.encoder_inputs(trainable, system.llm_params, batch)
  plain, plain_mask = default.encoder_inputs(None, default.llm_params, batch)
  soft, _ = system.soft_tokens(trainable, batch)
  assert embedded.shape == (4, 1 + 7, plain.shape[-1])
  np.testing.assert_array_equal(np.asarray(embedded[:, 0]), np.asarray(soft[:, 0]))
  np.testing.assert_array_equal(np.asarray(embedded[:, 1:]), np.asarray(plain))  # the text
  np.testing.assert_array_equal(np.asarray(mask[:, 0]), 1)
  np.testing.assert_array_equal(np.asarray(mask[:, 1:]), np.asarray(plain_mask))
  # persona zeroed: nothing left but zeros in front of the text
  zeroed, _ = system.encoder_inputs(trainable, system.llm_params, batch, persona=False)
  np.testing.assert_array_equal(np.asarray(zeroed[:, 0]), 0.0)
  assert np.isfinite(float(system.loss(trainable, system.llm_params, batch)))


def test_k_persona_tokens_and_time_decay_train_in_the_system(tiny_t5):
  config, system = _system(tiny_t5, num_persona_tokens=3, time_decay='learned')
  trainable = system.init_trainable(0)
  batch = _batch(with_age=True)
  embedded, mask = system.encoder_inputs(trainable, system.llm_params, batch)
  assert embedded.shape[1] == 4 + 7 and mask.shape[1] == 4 + 7
  zeroed, _ = system.encoder_inputs(trainable, system.llm_params, batch, persona=False)
  np.testing.assert_array_equal(np.asarray(zeroed[:, 1:4]), 0.0)
  np.testing.assert_array_equal(np.asarray(zeroed[:, 0]), np.asarray(embedded[:, 0]))
  grads = jax.grad(system.loss)(trainable, system.llm_params, batch)
  assert float(jnp.abs(grads['plug']['time_decay_raw'])) > 0
  assert float(jnp.abs(grads['plug']['persona_offsets']).sum()) > 0
  assert pipeline.shapes(config, DE)['history_age'] == (config.data.max_history,)
  assert 'history_age' not in pipeline.shapes(lamp_config.get_config('demo'), DE)


def test_dates_parse_to_days_and_ages_follow_their_items():
  dates = ['2010-01-01', '1999-12-31', '2004-02-29', '2016', '2016-03', '2012/5/7',
           '2012-05-07 10:31:00', '', 'May 2009']
  days, ok = (x.numpy() for x in pipeline.date_days(tf.constant(dates)))
  want = [np.datetime64(d, 'D').astype(int) for d in
          ('2010-01-01', '1999-12-31', '2004-02-29', '2016-01-01', '2016-03-01', '2012-05-07',
           '2012-05-07')]
  np.testing.assert_array_equal(days[:7], want)
  np.testing.assert_array_equal(ok, [True] * 7 + [False] * 2)
  ages = pipeline.history_ages(tf.constant(['2010-01-01', '', '2010-01-11'])).numpy()
  np.testing.assert_array_equal(ages, [10.0, 0.0, 0.0])  # undated: the newest date
  np.testing.assert_array_equal(pipeline.history_ages(tf.constant(['', 'x'])).numpy(), 0.0)
  # pad_example: ages of the kept (most recent) items, a cap, and padding
  config = lamp_config.get_config('demo')
  config.plug.time_decay = 'learned'
  config.data.history_cap = 3
  n = 5
  ex = {'id': tf.constant(b'u'), 'target_text': tf.constant(b't'),
        'input_ids': tf.constant([5, 6]), 'target_ids': tf.constant([7]),
        'query_encoder_ids': tf.constant([1]), 'query_embedding': tf.zeros([DE]),
        'history_embeddings': tf.reshape(tf.range(n * DE, dtype=tf.float32), [n, DE]),
        'history_item_ids': tf.constant([b'a', b'b', b'c', b'd', b'e']),
        'history_dates': tf.constant(['2000-01-01', '2000-01-05', '2000-01-02', '', '2000-01-04'])}
  out = pipeline.pad_example(ex, config, with_item_ids=True)
  assert out['history'].shape == (3, DE)
  np.testing.assert_array_equal(out['history_age'].numpy(), [2.0, 0.0, 0.0])  # newest: 01-04
  np.testing.assert_array_equal(out['history_item_ids'].numpy(), [b'c', b'd', b'e'])
  config.data.history_cap = 0  # no cap: max_history rows
  out = pipeline.pad_example(ex, config)
  assert out['history_age'].shape == (config.data.max_history,)
  np.testing.assert_array_equal(out['history_age'].numpy()[:6], [4, 0, 3, 0, 1, 0])
  # augmentation: each kept item keeps its own date
  _, apply = pipeline._augment(1, 0.5, seed=0, fixed=True)  # each copy drops >= 1 item
  dated = dict(ex, history_embeddings=tf.reshape(tf.range(n, dtype=tf.float32), [n, 1]),
               history_dates=tf.constant([f'2000-01-0{i + 1}' for i in range(n)]))
  for index in range(8):
    dropped = apply(tf.constant(0, tf.int64), (dated, tf.constant(index + 1, tf.int64)))
    rows = dropped['history_embeddings'].numpy()[:, 0].astype(int)
    assert len(rows) < n
    assert [d.decode() for d in dropped['history_dates'].numpy()] == \
        [f'2000-01-0{i + 1}' for i in rows]


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize('key,value,fragment', [
    ('num_persona_tokens', 0, 'config.plug.num_persona_tokens=0: must be an integer >= 1'),
    ('pooling', 'max', "config.plug.pooling='max': use one of ['attention', 'mean']"),
    ('time_decay', 'exp', "config.plug.time_decay='exp': use one of ['none', 'learned']"),
    ('time_decay_init', -0.1, 'config.plug.time_decay_init=-0.1: must be >= 0'),
])
def test_bad_plug_variant_keys_are_named(key, value, fragment):
  config = lamp_config.get_config('demo')
  config.plug[key] = value
  with pytest.raises(ConfigError) as err:
    validation.check_config(config, num_devices=1, process_count=1)
  assert fragment in str(err.value)


def test_k_above_one_with_mean_pooling_is_refused():
  config = lamp_config.get_config('demo')
  config.plug.update(num_persona_tokens=4, pooling='mean')
  with pytest.raises(ConfigError, match="need config.plug.pooling='attention'"):
    validation.check_config(config, num_devices=1, process_count=1)


def _tree(folder):
  return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), 'rb').read()
          for d, _, files in os.walk(folder) for f in files}


def test_time_decay_without_dates_exits_2_before_any_work(tmp_path, tiny_t5, minilm_path):
  lamp_dir = tmp_path / 'lamp'
  synthetic.generate(str(lamp_dir), 'LaMP_2', users={'train': 4, 'dev': 2, 'test': 1}, seed=1,
                     empty_frac=0.0, long_frac=0.0, mean_items=3)
  for split in ('train', 'dev'):
    path = lamp_dir / 'LaMP_2' / f'{split}_questions.json'
    questions = json.loads(path.read_text())
    for q in questions:
      for item in q['profile']:
        item.pop('date')
    path.write_text(json.dumps(questions))
  before = _tree(lamp_dir)
  workdir = tmp_path / 'work'
  proc = subprocess.run(
      [sys.executable, '-m', 'pplug_jax.train', '--config', 'configs/lamp.py:task=2,size=small',
       f'--workdir={workdir}', f'--config.data.lamp_dir={lamp_dir}',
       f'--config.llm.path={tiny_t5["v1.1"][0]}', f'--config.encoder.path={minilm_path}',
       '--config.plug.time_decay=learned'], cwd=ROOT, capture_output=True, text=True,
      timeout=180)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert 'train_questions.json: none of the' in proc.stderr and \
      "config.plug.time_decay='learned' needs dated items" in proc.stderr, proc.stderr[-2000:]
  assert len(lines) <= 2, lines
  assert _tree(lamp_dir) == before
  written = set(_tree(workdir)) if workdir.exists() else set()
  assert written <= {'.lock'}, written  # the workdir lock's file alone: nothing else was made


@pytest.mark.parametrize('flags', [
    ('--config.plug.pooling=mean', '--config.plug.instruction=False'),
    ('--config.plug.num_persona_tokens=2', '--config.plug.time_decay=learned'),
], ids=['mean-no-instruction', 'k2-time-decay'])
def test_each_variant_exports_and_its_inference_equals_its_evaluation(flags, demo_run, tmp_path):
  """A variant trained on the demo's records, exported, and served by PersonaPlugGenerator from
  the LaMP profile items (with their dates) gives evaluate's outputs on the same dev examples."""
  from conftest import prepared_copy, train_cmd
  from pplug_jax import checkpoints, evaluate, fileio
  from pplug_jax.data import lamp
  from pplug_jax.inference import PersonaPlugGenerator
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'plug')
  prepared_copy(str(demo_run[0]), workdir)
  proc = subprocess.run(train_cmd(workdir, *flags, '--config.optim.max_steps=60',
                                  '--config.train.eval_every=1000', '--config.demo_compare=False'),
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = checkpoints.load_config(workdir)
  evaluate.evaluate(config, workdir, 'dev', 'best')
  from_checkpoint = {g['id']: g['output']
                     for g in fileio.read_json(os.path.join(workdir, 'predictions_dev.json'))['golds']}
  proc = subprocess.run([sys.executable, '-m', 'pplug_jax.export', f'--workdir={workdir}',
                         f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  gen = PersonaPlugGenerator(config.llm.path, config.encoder.path, out)
  for key in ('pooling', 'instruction', 'num_persona_tokens', 'time_decay'):
    assert gen.config.plug[key] == config.plug[key], key
  questions, _ = lamp.split_files(lamp.task_dir(config.data.lamp_dir, 'LaMP_2'), 'dev')
  raw = fileio.read_json(questions)[:24]
  texts = gen.generate([q['input'] for q in raw], profiles=[q['profile'] for q in raw])
  assert texts == [from_checkpoint[q['id']] for q in raw]
  assert len(set(texts)) >= 3, texts  # the persona steers: not one answer for every user
