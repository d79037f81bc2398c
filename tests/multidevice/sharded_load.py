"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: sharded load == unsharded."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pplug_jax import axis_rules, partitioning
from pplug_jax.models import hf_weights, t5


def main(path: str) -> None:
  assert jax.device_count() == 8, jax.device_count()
  mesh = partitioning.make_mesh((2, 4))
  rules = axis_rules.STANDARD_RULES
  config, params = hf_weights.load_t5(
      path, shardings=lambda boxed: partitioning.logical_shardings(boxed, mesh, rules))
  _, ref_params = hf_weights.load_t5(path)
  expect = {
      ('token_embedder', 'embedding'): P('model', None),
      ('encoder', 'layers_0', 'attention', 'query', 'kernel'): P(None, 'model'),
      ('encoder', 'layers_0', 'attention', 'out', 'kernel'): P('model', None),
      ('decoder', 'layers_1', 'mlp', 'wi_0', 'kernel'): P(None, 'model'),
      ('decoder', 'layers_1', 'mlp', 'wo', 'kernel'): P('model', None),
      ('decoder', 'logits_dense', 'kernel'): P(None, 'model'),
      ('encoder', 'relpos_bias', 'rel_embedding'): P('model', None),
      ('encoder', 'encoder_norm', 'scale'): P(None),
  }
  for path_, spec in expect.items():
    leaf = params
    for k in path_:
      leaf = leaf[k]
    assert isinstance(leaf.sharding, NamedSharding), path_
    assert leaf.sharding.mesh.shape == {'data': 2, 'model': 4}
    assert leaf.sharding.spec == spec, (path_, leaf.sharding.spec, spec)
  # a kernel (embed=32, joined_kv=32) split 4 ways over 'model' holds 8 columns per device
  q = params['encoder']['layers_0']['attention']['query']['kernel']
  assert {s.data.shape for s in q.addressable_shards} == {(32, 8)}

  model = t5.T5(config)
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(2, 96, (4, 8)))
  mask = jnp.ones((4, 8), jnp.int32).at[1, 5:].set(0)
  dec = jnp.asarray(rng.randint(2, 96, (4, 5)))

  def fwd(p):
    return model.apply({'params': p}, model.apply({'params': p}, ids, method=t5.T5.embed), mask,
                       dec)

  batch = NamedSharding(mesh, P('data'))
  with mesh:
    sharded = jax.jit(fwd, out_shardings=batch)(params)
  ref = jax.jit(fwd)(ref_params)
  diff = float(np.abs(np.asarray(sharded) - np.asarray(ref)).max())
  print(json.dumps({'max_abs_diff': diff}))
  assert diff <= 1e-5, diff


if __name__ == '__main__':
  main(sys.argv[1])
