"""Times greedy and beam-4 generation against transformers' PyTorch `generate` on the same shapes.

flan-t5-small shapes (random weights), batch 8, input 256 + 2 soft tokens (given as input
embeddings), exactly 32 new tokens, fp32 on CPU. EOS is disabled on both sides (ours: an EOS id
outside the vocabulary; HF: min_new_tokens=32) so both produce exactly 32 tokens per row.

    python scripts/bench_generation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import random_flan_t5_small, timeit
from pplug_jax import decoding
from pplug_jax.models import hf_weights, t5

B, S, NEW = 8, 258, 32


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  import torch
  ref, path = random_flan_t5_small()
  config, params = hf_weights.load_t5(path)
  config = dataclasses.replace(config, eos_token_id=-1)  # never stop early: exactly NEW tokens
  model = t5.T5(config)
  rng = np.random.RandomState(0)
  emb = rng.normal(size=(B, S, 512)).astype(np.float32)
  mask = np.ones((B, S), np.int32)
  e, m = jnp.asarray(emb), jnp.asarray(mask)
  greedy = jax.jit(lambda p, e, m: decoding.greedy(model, p, e, m, NEW))
  beam = jax.jit(lambda p, e, m: decoding.beam_search(model, p, e, m, NEW, 4)[0])
  out = {'shapes': dict(batch=B, input=S, new_tokens=NEW, model='flan-t5-small'),
         'torch_threads': torch.get_num_threads()}
  te, tm = torch.tensor(emb), torch.tensor(mask)
  for name, fn, beams in (('greedy', greedy, 1), ('beam4', beam, 4)):
    ours = timeit(lambda: jax.block_until_ready(fn(params, e, m)), warmup=1, repeats=args.repeats)

    def hf(beams=beams):
      with torch.no_grad():
        seq = ref.generate(inputs_embeds=te, attention_mask=tm, max_new_tokens=NEW,
                           min_new_tokens=NEW, num_beams=beams, do_sample=False)
      assert seq.shape[1] == NEW + 1

    theirs = timeit(hf, warmup=1, repeats=args.repeats)
    assert np.asarray(fn(params, e, m)).shape == (B, NEW)
    out[name] = {'ours_tokens_per_s': B * NEW / ours, 'reference_tokens_per_s': B * NEW / theirs,
                 'speedup': theirs / ours, 'ours_s': ours, 'reference_s': theirs}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
