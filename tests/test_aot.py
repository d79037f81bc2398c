"""The TPU planner: real AOT compiles for a libtpu topology on this CPU, analytic FLOPs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from multidevice_util import with_devices
from pplug_jax import aot, flops
from pplug_jax.models import decoder, hf_weights, t5


def test_forward_flops_formula_matches_xla_cost_analysis():
  """XLA counts every op of an unscanned T5 forward; the formula counts the matmuls alone."""
  c = t5.T5Config(vocab_size=512, d_model=128, num_heads=4, d_kv=32, d_ff=384,
                  num_encoder_layers=2, num_decoder_layers=3)
  model = t5.T5(c)
  enc_len, dec_len = 40, 24
  args = (jnp.zeros((1, enc_len, c.d_model)), jnp.ones((1, enc_len), jnp.int32),
          jnp.zeros((1, dec_len), jnp.int32))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
  cost = jax.jit(model.apply).lower(params, *args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ours = flops.t5_forward_flops(c, enc_len, dec_len)
  assert 0.9 * cost['flops'] <= ours <= 1.02 * cost['flops'], (ours, cost['flops'])


def test_decoder_forward_flops_formula_matches_xla_cost_analysis():
  """The same for an unscanned decoder-only LM (GQA) on the training sequence [input; target]."""
  c = decoder.DecoderConfig(vocab_size=512, hidden_size=128, intermediate_size=320, num_layers=3,
                            num_heads=4, num_kv_heads=2, head_dim=32)
  model = decoder.CausalLM(c)
  prefix, target = 40, 24
  args = (jnp.zeros((1, prefix, c.hidden_size)), jnp.ones((1, prefix), jnp.int32),
          jnp.zeros((1, target), jnp.int32), jnp.ones((1, target), jnp.int32))
  params = hf_weights.decoder_abstract_params(c, boxed=False)
  fn = lambda p, *a: model.apply({'params': p}, *a, method=decoder.CausalLM.target_logits)
  cost = jax.jit(fn).lower(params, *args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ours = flops.llm_forward_flops(c, prefix, target)
  assert 0.9 * cost['flops'] <= ours <= 1.02 * cost['flops'], (ours, cost['flops'])


def test_encoder_flops_per_item_match_xla_cost_analysis():
  """The precompute ETA's count: an unscanned BERT forward at one length."""
  from pplug_jax.models import bert
  c = bert.BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=3,
                      num_attention_heads=4, intermediate_size=512)
  model = bert.Bert(c)
  length = 96
  args = (jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
  fn = lambda p, *a: model.apply(p, *a, method=bert.Bert.embed_text)
  cost = jax.jit(fn).lower(params, *args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ours = flops.encoder_flops_per_item(c, length)
  assert 0.9 * cost['flops'] <= ours <= 1.02 * cost['flops'], (ours, cost['flops'])


def test_train_step_flops_at_each_bucket_match_xla_cost_analysis(tmp_path):
  """The real compiled train step (frozen T5, plug, optimizer), unscanned, at two buckets: the
  count training's MFU divides by."""
  from configs import lamp as lamp_config
  from hf_fixtures import save_tiny_t5
  from pplug_jax import partitioning, system as system_lib
  save_tiny_t5(str(tmp_path / 't5'), d_model=128, num_heads=4, d_kv=32, d_ff=384, vocab_size=512)
  c = lamp_config.get_config('demo')
  c.llm.path = str(tmp_path / 't5')
  c.optim.batch_size, c.optim.grad_accum = 4, 1
  c.data.max_history = 16
  system = aot.abstract_system(c, partitioning.make_mesh((1, 1), devices=jax.devices()[:1]))
  tx, _ = system_lib.build_optimizer(c, 100)
  abstract = aot._abstract_state(system, tx, c)
  for shape in ((32, 16), (64, 8)):
    compiled, _, _ = system_lib.compile_train_step(system, tx, abstract, c, shape)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = flops.train_step_flops(system, c, shape)
    assert 0.9 * cost['flops'] <= ours <= 1.02 * cost['flops'], (shape, ours, cost['flops'])


def test_advice_names_the_knob_that_matters():
  chip = flops.Chip('test', 16.0, 100.0)
  fits, advice = aot._verdict({'arguments': 12.0, 'temporaries': 4.0, 'total': 16.5}, chip)
  assert not fits and 'mesh model axis' in advice[0]
  fits, advice = aot._verdict({'arguments': 1.0, 'temporaries': 15.0, 'total': 16.5}, chip)
  assert not fits and 'remat_policy' in advice[0] and 'grad_accum' in advice[0]
  assert aot._verdict({'arguments': 1.0, 'temporaries': 1.0, 'total': 2.0}, chip) == (True, [])


# A process that loads libtpu as a training job on a TPU VM does: it takes libtpu's lock.
_HOLD_LIBTPU = """
import os, sys, time
os.environ.update(TPU_SKIP_MDS_QUERY='1', TPU_WORKER_HOSTNAMES='localhost',
                  TPU_ACCELERATOR_TYPE='v5litepod-4', JAX_PLATFORMS='cpu')
os.environ.pop('ALLOW_MULTIPLE_LIBTPU_LOAD', None)
from jax.experimental import topologies
try:
  topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')
  print('held', flush=True)
except Exception as e:
  print('busy' if 'lockfile' in str(e) else repr(e), flush=True)
  sys.exit(0)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
def test_two_plans_at_once_beside_a_job_that_holds_the_tpu(tiny_t5, tmp_path):
  pytest.importorskip('libtpu', reason='the [tpu] extra is not installed')
  env = {k: v for k, v in os.environ.items() if k != 'ALLOW_MULTIPLE_LIBTPU_LOAD'}
  env['JAX_PLATFORMS'] = 'cpu'
  job = subprocess.Popen([sys.executable, '-c', _HOLD_LIBTPU, '600'], stdout=subprocess.PIPE,
                         text=True, env=env)
  try:
    state = job.stdout.readline().strip()
    assert state in ('held', 'busy'), state  # busy: another process holds it, just as well
    if state == 'held':  # the premise: a second plain load is refused while the job runs
      second = subprocess.run([sys.executable, '-c', _HOLD_LIBTPU, '0'], capture_output=True,
                              text=True, env=env, timeout=120)
      assert second.stdout.strip() == 'busy', second.stdout + second.stderr[-2000:]
    outs = [tmp_path / f'plan{i}.json' for i in range(2)]
    plans = [subprocess.Popen(
        [sys.executable, '-m', 'pplug_jax.aot', '--config', 'configs/lamp.py:demo',
         f'--config.llm.path={tiny_t5["v1.1"][0]}', '--topology', 'v5e:2x2', '--mesh', '2,2',
         '--json', str(out), *(['--items=200000', '--item_tokens=128', '--train_examples=3000',
                                '--eval_examples=500'] if out == outs[0] else [])],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for out in outs]
    results = [p.communicate(timeout=400) for p in plans]
  finally:
    job.kill()
    job.wait()
  for p, (stdout, stderr) in zip(plans, results):
    assert p.returncode == 0, stderr[-3000:]
    assert 'v5e:2x2: 4 x v5e' in stdout and 'fits' in stdout
  plan, other = (json.loads(out.read_text()) for out in outs)
  assert plan['train_step']['flops'] == other['train_step']['flops']
  assert 'ETA at peak' in results[0][0] and 'eta' not in other
  eta = plan['eta']
  # The demo's recipe on --train_examples=3000: each example and its 2 augmented copies, 3
  # epochs, 16 examples a step: 27,000 / 16 = 1,687 whole steps. 500 eval examples in
  # batches of 40: 13 batches, the last one ragged.
  assert eta['train_steps'] == 1687 and eta['eval_batches'] == 13
  # At peak (v5e: 197 TFLOP/s bf16 a chip, Google's published figure; 4 chips) every phase
  # takes its FLOPs over 7.88e14 FLOP/s: the step's (whose count test_train_step_flops_* holds
  # to XLA's), 200,000 items of the encoder's (test_encoder_flops_per_item_*).
  peak = 4 * 197e12
  assert eta['train_s'] == pytest.approx(1687 * plan['train_step']['flops'] / peak)
  assert eta['precompute_s'] == pytest.approx(200000 * eta['encoder_flops_per_item'] / peak)
  assert eta['eval_s'] == pytest.approx(13 * plan['generate']['flops'] / peak)
  assert plan['topology'] == 'v5e:2x2' and plan['chip'] == 'v5e' and plan['chips'] == 4
  assert plan['mesh'] == [2, 2] and plan['hbm_per_chip_gib'] == 16.0
  for name in ('train_step', 'generate'):
    step = plan[name]
    assert set(step) >= {'per_chip_gib', 'fits', 'compile_s', 'flops', 'step_time_lower_bound_s'}
    assert 0 < step['per_chip_gib'] < 1 and step['fits'] and step['flops'] > 0
  assert plan['train_step']['step_time_lower_bound_s'] == pytest.approx(
      plan['train_step']['flops'] / (4 * 197e12))


# Parameter counts the Hugging Face Hub reports for each checkpoint (safetensors metadata).
PUBLISHED_PARAMETERS = {'llama2-7b': 6_738_415_616, 'llama3.1-8b': 8_030_261_248,
                        'qwen2.5-7b': 7_615_616_512, 'qwen3-8b': 8_190_735_360,
                        'flan-t5-small': 76_961_152, 'flan-t5-xxl': 11_135_332_352}


@pytest.mark.parametrize('llm', sorted(PUBLISHED_PARAMETERS))
def test_the_planner_knows_each_named_backbone_without_its_weights(llm):
  """The training loader in abstract mode, from the published config.json alone."""
  from configs import lamp
  from pplug_jax import partitioning, system
  config = lamp.get_config(f'task=2,llm={llm}')
  _, params = system.load_llm(config, partitioning.make_mesh((1, 1)), abstract=True)
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)
  assert sum(int(np.prod(x.shape)) for x in leaves) == PUBLISHED_PARAMETERS[llm]


def test_abstract_loading_places_every_tensor_as_the_real_load(tiny_t5, tmp_path):
  """The planner's system is the training loader's: same tree, shapes, dtypes and shardings
  as the weights loaded for training, on a mesh that splits the model axis (T5 and Llama, one
  process)."""
  subprocess.run([sys.executable, '-c', f'''
import sys; sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
import jax, numpy as np
from configs import lamp
from hf_fixtures import save_tiny_decoder
from pplug_jax import partitioning, system
llama = {str(tmp_path / "llama")!r}
save_tiny_decoder(llama, heads=4, kv_heads=2)
mesh = partitioning.make_mesh((2, 2))
placed = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), t)
for path in ({str(tiny_t5["v1.1"][0])!r}, llama):
  config = lamp.get_config('demo')
  config.llm.path = path
  config.llm.tokenizer = 'byte'
  real = system.load_system(config, 384, mesh)
  abstract = system.load_system(config, 384, mesh, abstract=True)
  assert placed(real.llm_params) == placed(abstract.llm_params)
  assert real.llm.config == abstract.llm.config
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(real.llm_params))
  assert jax.tree.structure(real.init_trainable(0)) == jax.tree.structure(
      jax.eval_shape(lambda: abstract.init_trainable(0)))
  print('ok', type(real.llm).__name__, real.plug.persona_scale, abstract.plug.persona_scale)
'''], check=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, XLA_FLAGS=with_devices(4),
               JAX_PLATFORMS='cpu'))
