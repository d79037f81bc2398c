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
from pplug_jax import aot
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
  ours = aot._t5_forward_flops(c, enc_len, dec_len)
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
  ours = aot._llm_forward_flops(c, prefix, target)
  assert 0.9 * cost['flops'] <= ours <= 1.02 * cost['flops'], (ours, cost['flops'])


def test_advice_names_the_knob_that_matters():
  chip = aot.Chip('test', 16.0, 100.0)
  fits, advice = aot._verdict({'arguments': 12.0, 'temporaries': 4.0, 'total': 16.5}, chip)
  assert not fits and 'mesh model axis' in advice[0]
  fits, advice = aot._verdict({'arguments': 1.0, 'temporaries': 15.0, 'total': 16.5}, chip)
  assert not fits and 'remat_policy' in advice[0] and 'grad_accum' in advice[0]
  assert aot._verdict({'arguments': 1.0, 'temporaries': 1.0, 'total': 2.0}, chip) == (True, [])


def test_plan_compiles_the_real_steps_for_a_small_topology(tiny_t5, tmp_path):
  pytest.importorskip('libtpu', reason='the [tpu] extra is not installed')
  out = tmp_path / 'plan.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'pplug_jax.aot', '--config', 'configs/lamp.py:demo',
       f'--config.llm.path={tiny_t5["v1.1"][0]}', '--topology', 'v5e:2x2', '--mesh', '2,2',
       '--json', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  plan = json.loads(out.read_text())
  assert plan['topology'] == 'v5e:2x2' and plan['chip'] == 'v5e' and plan['chips'] == 4
  assert plan['mesh'] == [2, 2] and plan['hbm_per_chip_gib'] == 16.0
  for name in ('train_step', 'generate'):
    step = plan[name]
    assert set(step) >= {'per_chip_gib', 'fits', 'compile_s', 'flops', 'step_time_lower_bound_s'}
    assert 0 < step['per_chip_gib'] < 1 and step['fits'] and step['flops'] > 0
  assert 'v5e:2x2: 4 x v5e' in proc.stdout and 'fits' in proc.stdout
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
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu'))
