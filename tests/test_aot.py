"""The TPU planner: real AOT compiles for a libtpu topology on this CPU, analytic FLOPs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from pplug_jax import aot
from pplug_jax.models import t5


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
