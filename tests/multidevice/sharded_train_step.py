"""Run on 8 simulated devices: one train step on meshes 2x4 and 8x1 equals the 1-device step.

    sharded_train_step.py LLM_DIR      (a T5 or a decoder-only directory: its config.json says)
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import lamp as lamp_config
from pplug_jax import partitioning, system as system_lib
from pplug_jax.models import backbone

DIM = 12


def batch(accum=2, micro=8, seed=0):
  rng = np.random.RandomState(seed)
  n = accum * micro
  h = rng.normal(size=(n, 6, DIM)).astype(np.float32)
  hmask = (rng.rand(n, 6) < 0.7).astype(np.int32)
  hmask[3] = 0  # a cold-start user
  ids = rng.randint(2, 96, (n, 9)).astype(np.int32)
  tgt = rng.randint(2, 96, (n, 5)).astype(np.int32)
  b = dict(query_embedding=rng.normal(size=(n, DIM)).astype(np.float32), history=h,
           history_mask=hmask, input_ids=ids, input_mask=np.ones_like(ids), target_ids=tgt,
           target_mask=np.ones_like(tgt))
  return {k: v.reshape((accum, micro) + v.shape[1:]) for k, v in b.items()}


def one_step(path, mesh_shape, devices):
  config = lamp_config.get_config('demo')
  config.llm.path = path
  config.llm.tokenizer = ''
  mesh = partitioning.make_mesh(mesh_shape, devices=devices)
  rules = tuple(config.logical_axis_rules)
  system = system_lib.load_system(config, DIM, mesh)
  tx, _ = system_lib.build_optimizer(config, 4)
  params = system.init_trainable(0)
  state = {'step': jnp.int32(1), 'params': params, 'opt_state': tx.init(params)}
  state_sh = partitioning.replicated_like(state, mesh)
  state = jax.device_put(state, state_sh)
  b = batch()
  b_sh = {k: partitioning.batch_sharding(mesh, rules, v.ndim, leading=1) for k, v in b.items()}
  gb = {k: jax.make_array_from_process_local_data(b_sh[k], v) for k, v in b.items()}
  step = jax.jit(system_lib.make_train_step(system, tx),
                 in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, system.llm_params),
                               b_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
  new, metrics = step(state, system.llm_params, gb)
  if mesh_shape == (2, 4) and not backbone.is_decoder_only(system.llm):
    wi = system.llm_params['decoder']['layers_0']['mlp']['wi_0']['kernel']
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, 'model'), wi.sharding.spec
  elif mesh_shape == (2, 4):  # the MLP over the model axis; 2 KV heads on 4: K/V replicated
    layer = system.llm_params['layers']['layers_0']
    wi = layer['mlp']['wi_0']['kernel']
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, 'model'), wi.sharding.spec
    assert system.llm.config.num_kv_heads == 2 and not system.llm.config.shard_kv_heads
    key = layer['attention']['key']['kernel']
    assert all(a is None for a in key.sharding.spec), key.sharding.spec
    query = layer['attention']['query']['kernel']
    assert 'model' in query.sharding.spec, query.sharding.spec
  return float(metrics['loss']), jax.tree.map(np.asarray, new['params'])


def main(path):
  assert jax.device_count() == 8
  ref_loss, ref = one_step(path, (1, 1), jax.devices()[:1])
  out = {}
  for shape in ((2, 4), (8, 1)):
    loss, params = one_step(path, shape, jax.devices())
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref, params))
    out[f'{shape}'] = {'loss_diff': abs(loss - ref_loss), 'param_diff': max(diffs)}
    assert abs(loss - ref_loss) <= 1e-5, (shape, loss, ref_loss)
    assert max(diffs) <= 1e-6, (shape, max(diffs))
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1])
