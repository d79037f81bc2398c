"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: the text encoder's batch is
sharded over the 8 devices (read from the compiled HLO) and its embeddings equal one device's."""

import json
import re
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from pplug_jax.models.text_encoder import TextEncoder


def main(path: str) -> None:
  assert jax.device_count() == 8, jax.device_count()
  rng = np.random.RandomState(0)
  words = 'the a user wrote about films music travel food history science of and in'.split()
  # mixed lengths, 72 texts: three batches of 32 (several length buckets), the last partial
  texts = [' '.join(rng.choice(words, rng.randint(1, 60))) for _ in range(72)]
  eight = TextEncoder(path, batch_size=32, dtype='float32')
  one = TextEncoder(path, batch_size=32, dtype='float32', devices=jax.devices()[:1])
  assert eight.num_devices == 8 and one.num_devices == 1

  ids = np.zeros((32, 64), np.int32)
  compiled = eight._embed.lower(eight.params, jax.device_put(ids, eight._rows),
                                jax.device_put(ids, eight._rows)).compile()
  arg_shardings = compiled.input_shardings[0]
  assert arg_shardings[1].spec == P('data') and arg_shardings[2].spec == P('data')
  assert arg_shardings[1].mesh.shape == {'data': 8}
  hlo = compiled.as_text()
  # SPMD-partitioned: each device's program takes 32 / 8 = 4 rows of the ids and the mask
  entry = hlo[hlo.index('ENTRY'):]
  entry = entry[:entry.index('\n}')]
  params = re.findall(r'(\w+)\[([\d,]+)\][^\n]*parameter\((\d+)\)', entry)
  row_params = [shape for dt, shape, _ in params if dt == 's32']
  assert row_params == ['4,64', '4,64'], params
  assert compiled.output_shardings.spec == P('data')

  got8, got1 = eight.encode(texts), one.encode(texts)
  bf16 = TextEncoder(path, batch_size=32, dtype='bfloat16').encode(texts)
  cos = np.sum(bf16 * got1, -1) / np.linalg.norm(bf16, axis=-1) / np.linalg.norm(got1, axis=-1)
  print(json.dumps({'max_abs_8_vs_1': float(np.abs(got8 - got1).max()),
                    'max_abs_bf16_vs_f32': float(np.abs(bf16 - got1).max()),
                    'min_cos_bf16_vs_f32': float(cos.min()),
                    'row_params': row_params}))


if __name__ == '__main__':
  main(sys.argv[1])
