"""The plug and one real train step: only the plug moves, gradients are right, no NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lamp as lamp_config
from pplug_jax import partitioning, system as system_lib
from pplug_jax.models import plug as plug_lib

DIM = 12


def _system(tiny_t5):
  config = lamp_config.get_config('demo')
  config.llm.path = tiny_t5['v1.1'][0]
  config.llm.param_dtype = config.llm.dtype = 'float32'
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  return config, system_lib.load_system(config, DIM, mesh)


def _batch(n=4, hist=5, seed=0, empty_rows=()):
  rng = np.random.RandomState(seed)
  h = rng.normal(size=(n, hist, DIM)).astype(np.float32)
  h /= np.linalg.norm(h, axis=-1, keepdims=True)
  hmask = (rng.rand(n, hist) < 0.8).astype(np.int32)
  hmask[:, 0] = 1
  for r in empty_rows:
    hmask[r] = 0
    h[r] = 0
  q = rng.normal(size=(n, DIM)).astype(np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  ids = rng.randint(2, 96, (n, 7)).astype(np.int32)
  imask = np.ones_like(ids)
  imask[1, 5:] = 0
  tgt = rng.randint(2, 96, (n, 4)).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in dict(
      query_embedding=q, history=h, history_mask=hmask, input_ids=ids, input_mask=imask,
      target_ids=tgt, target_mask=np.ones_like(tgt)).items()}


def test_only_the_plug_is_updated(tiny_t5):
  config, system = _system(tiny_t5)
  trainable = system.init_trainable(0)
  tx, _ = system_lib.build_optimizer(config, 10)
  state = {'step': jnp.int32(0), 'params': trainable, 'opt_state': tx.init(trainable)}
  plug_before = jax.tree.map(np.array, trainable)
  batch = jax.tree.map(lambda x: x[None], _batch())  # one accumulation step
  step = jax.jit(system_lib.make_train_step(system, tx))
  for _ in range(2):  # warm-up makes the first lr 0; take two steps
    state, metrics = step(state, system.llm_params, batch)
  assert np.isfinite(float(metrics['loss']))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))),
                                         plug_before, state['params']))
  assert all(changed)
  # the optimizer state holds exactly the plug's shapes, nothing of the LLM's
  n_plug = plug_lib.count_params(state['params'])
  opt_sizes = [x.size for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0]
  assert sum(opt_sizes) == 2 * n_plug  # Adam's mu and nu
  assert set(state['params']) == {'plug'}


def test_soft_token_gradient_matches_finite_differences(tiny_t5):
  config, system = _system(tiny_t5)
  batch = _batch(seed=1)
  base, bmask = plug_lib.personalised_inputs(system.llm, system.llm_params, None,
                                             batch['input_ids'], batch['input_mask'])
  soft = jnp.asarray(np.random.RandomState(2).normal(size=(4, 2, 32)).astype(np.float32))

  def loss(s):
    emb = jnp.concatenate([s, base], 1)
    mask = jnp.concatenate([jnp.ones((4, 2), bmask.dtype), bmask], 1)
    return system.loss_from_inputs(system.llm_params, emb, mask, batch)

  with jax.default_matmul_precision('float32'):
    g = np.asarray(jax.grad(loss)(soft))
    loss64 = jax.jit(loss)
    rng = np.random.RandomState(3)
    for _ in range(4):
      d = rng.normal(size=soft.shape).astype(np.float32)
      d /= np.linalg.norm(d)
      eps = 1e-2
      fd = (float(loss64(soft + eps * d)) - float(loss64(soft - eps * d))) / (2 * eps)
      assert abs(fd - float((g * d).sum())) <= 2e-3 * max(1.0, abs(fd)), (fd, (g * d).sum())


def test_empty_history_gives_finite_loss_and_gradients(tiny_t5):
  config, system = _system(tiny_t5)
  trainable = system.init_trainable(0)
  batch = _batch(seed=4, empty_rows=(0, 2))
  soft, weights = system.soft_tokens(trainable, batch)
  np.testing.assert_array_equal(np.asarray(soft[0, 1]), 0.0)  # defined persona: zero
  assert np.asarray(weights[0]).sum() == 0 and abs(float(weights[1].sum()) - 1) < 1e-6
  loss, grads = jax.value_and_grad(system.loss)(trainable, system.llm_params, batch)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
  # all users cold-start: still finite
  cold = _batch(seed=5, empty_rows=range(4))
  loss, grads = jax.value_and_grad(system.loss)(trainable, system.llm_params, cold)
  assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(x)).all()
                                          for x in jax.tree.leaves(grads))


def test_persona_scale_is_the_mean_embedding_norm(tiny_t5):
  config, system = _system(tiny_t5)
  table = np.asarray(system.llm_params['token_embedder']['embedding'])
  want = np.linalg.norm(table, axis=-1).mean()
  assert abs(system.plug.persona_scale - want) < 1e-4 * want
  assert abs(system.plug.instruction_scale - want / 7) < 1e-4 * want
  # export reads the table from disk: the same scale, in float32 and in bfloat16
  from pplug_jax.models import hf_weights
  disk = hf_weights.embedding_table(config.llm.path)
  assert plug_lib.persona_scale(config, disk) == system.plug.persona_scale
  config.llm.param_dtype = config.llm.dtype = 'bfloat16'
  bf16 = system_lib.load_system(config, DIM, system.mesh)
  assert plug_lib.persona_scale(config, disk) == bf16.plug.persona_scale
  assert abs(bf16.plug.persona_scale - want) < 1e-2 * want


def test_plug_attention_matches_numpy():
  plug = plug_lib.PersonaPlug(DIM, 8, 3.0, 0.5)
  b = _batch(seed=6)
  params = plug.init(jax.random.PRNGKey(0), b['query_embedding'], b['history'],
                     b['history_mask'])['params']
  from flax import linen as nn
  params = nn.meta.unbox(params)
  soft, w = plug.apply({'params': params}, b['query_embedding'], b['history'], b['history_mask'])
  q, h, m = (np.asarray(b[k], np.float64) for k in ('query_embedding', 'history', 'history_mask'))
  s = np.einsum('bd,bhd->bh', q, h)
  s = np.where(m > 0, s, -np.inf)
  wn = np.exp(s - s.max(1, keepdims=True))
  wn /= wn.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(w), wn, atol=1e-6)
  from scipy.special import erf
  gelu = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))
  p = params['align_mlp']
  proj = gelu(h @ p['fc1']['kernel'] + p['fc1']['bias']) @ p['fc2']['kernel'] + p['fc2']['bias']
  persona = np.einsum('bh,bhd->bd', wn, proj) * 3.0
  np.testing.assert_allclose(np.asarray(soft[:, 1]), persona, atol=1e-5)
  pi = params['align_mlp_inst']
  v = np.asarray(params['inst_token'])
  inst = (gelu(v @ pi['fc1']['kernel'] + pi['fc1']['bias']) @ pi['fc2']['kernel'] +
          pi['fc2']['bias']) * 0.5
  np.testing.assert_allclose(np.asarray(soft[2, 0]), inst, atol=1e-5)


def test_a_misspelt_config_argument_is_an_error_listing_the_valid_ones():
  """configs/lamp.py's own argument parser (misspelt --config.KEY flags are test_bad_input's)."""
  with pytest.raises(ValueError) as e:
    lamp_config.get_config('demo,tsk=2')
  assert str(e.value) == ("configs/lamp.py: unknown args ['tsk']; use demo, task=N, size=small..xxl, "
                          'llm=NAME, split=user|time, encoder=bge|contriever|minilm, reference.')


def test_bad_values_and_missing_inputs_are_one_error_before_any_work(tmp_path):
  """One pass: the invalid value and every missing input together, and nothing written."""
  from pplug_jax import training
  from pplug_jax.errors import ConfigError
  config = lamp_config.get_config('task=4,size=xxl')
  config.optim.lr = -1.0
  workdir = tmp_path / 'w'
  with pytest.raises(ConfigError) as e:
    training.train_and_evaluate(config, str(workdir))
  lines = str(e.value).split('\n')
  assert lines[:2] == ['invalid config:', '  config.optim.lr=-1.0: must be > 0.']
  for key, line in zip(('config.llm.path', 'config.encoder.path', 'config.data.lamp_dir'),
                       lines[2:5]):
    assert line.startswith(f"  {key}=''"), lines
  assert 'google/flan-t5-xxl' in lines[2]
  assert lines[5:] == ['With nothing downloaded, run the demo: --config configs/lamp.py:demo']
  assert not workdir.exists()  # nothing written


def test_train_step_on_8_devices_equals_single_device(tiny_t5):
  from multidevice_util import run_on_8_devices
  out = run_on_8_devices('sharded_train_step.py', tiny_t5['v1.1'][0])
  assert set(out) == {'(2, 4)', '(8, 1)'}


def test_finetune_mode_trains_the_input_encoder_too(tiny_t5, tiny_bert):
  """encoder.mode=finetune: the Flax BERT embeds the query ids and gets updated; LLM frozen."""
  config = lamp_config.get_config('demo')
  config.llm.path = tiny_t5['v1.1'][0]
  config.encoder.path = tiny_bert[0]
  config.encoder.mode = 'finetune'
  config.encoder.pooling = 'cls'
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  dim = 32
  system = system_lib.load_system(config, dim, mesh)
  trainable = system.init_trainable(0)
  assert set(trainable) == {'plug', 'query_encoder'}
  rng = np.random.RandomState(0)
  b = {k: np.asarray(v) for k, v in _batch().items()}
  b['history'] = rng.normal(size=(4, 5, dim)).astype(np.float32)
  b['query_encoder_ids'] = rng.randint(1, 120, (4, 6)).astype(np.int32)
  b['query_encoder_mask'] = np.ones((4, 6), np.int32)
  batch = {k: jnp.asarray(v)[None] for k, v in b.items()}
  tx, _ = system_lib.build_optimizer(config, 10)
  state = {'step': jnp.int32(0), 'params': trainable, 'opt_state': tx.init(trainable)}
  before = jax.tree.map(np.array, trainable)
  llm_before = jax.tree.map(np.array, system.llm_params)
  step = jax.jit(system_lib.make_train_step(system, tx))
  for _ in range(2):  # the schedule's first learning rate is 0 (warm-up)
    state, metrics = step(state, system.llm_params, batch)
  assert np.isfinite(float(metrics['loss']))
  moved = jax.tree.map(lambda a, c: bool(np.any(a != np.asarray(c))), before['query_encoder'],
                       state['params']['query_encoder'])
  assert moved['layers_0']['query']['kernel'] and moved['word_embeddings']['embedding']
  jax.tree.map(np.testing.assert_array_equal, llm_before, jax.tree.map(np.array,
                                                                         system.llm_params))
  # the query embedding really comes from the encoder, not from the precomputed field
  b2 = dict(batch)
  b2['query_embedding'] = batch['query_embedding'] * 0 + 7.0
  one = jax.tree.map(lambda x: x[0], batch)
  two = jax.tree.map(lambda x: x[0], b2)
  np.testing.assert_array_equal(np.asarray(system.soft_tokens(trainable, one)[0]),
                                np.asarray(system.soft_tokens(trainable, two)[0]))


def test_non_finite_loss_stops_with_a_clear_message():
  from pplug_jax import training
  training._check_finite(1.5, 3)
  for bad in (float('nan'), float('inf')):
    with pytest.raises(SystemExit, match='loss is (nan|inf) at step 7'):
      training._check_finite(bad, 7)


@pytest.mark.parametrize('frac,total,warmup', [(0.05, 1687, 84), (0.05, 37, 2), (0.05, 25, 1),
                                               (0.0, 10, 1), (0.1, 5, 1)])
def test_one_warmup_schedule_for_the_plug_and_the_baselines(frac, total, warmup):
  """The plug's and ROPG/RSPG's optimisers share one schedule and rounding rule, and it is
  transformers' get_linear_schedule_with_warmup at that many warm-up steps."""
  import torch
  from transformers import get_linear_schedule_with_warmup
  from pplug_jax.baselines import trainer
  assert system_lib.warmup_steps(frac, total) == warmup
  lr = 1e-3
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=lr)
  torch_schedule = get_linear_schedule_with_warmup(opt, warmup, total)
  want = []
  for _ in range(total):
    want.append(opt.param_groups[0]['lr'])
    opt.step()
    torch_schedule.step()
  ours = system_lib.warmup_linear_schedule(lr, frac, total)
  np.testing.assert_allclose([float(ours(s)) for s in range(total)], want, rtol=1e-5, atol=1e-7 * lr)
  # ROPG/RSPG's Adam follows the same schedule: one Adam step's size is the learning rate
  settings = trainer.FitSettings('ropg', lr, 8, 1, frac, 1e9, 10, 0)
  tx = trainer.optimizer(settings, total)
  params = jnp.zeros(())
  state = tx.init(params)
  for s in range(min(total, 4)):
    updates, state = tx.update(jnp.ones(()), state, params)
    np.testing.assert_allclose(-float(updates), want[s], rtol=1e-4, atol=1e-12)
