"""Times our jitted PPlug train step against a PyTorch reference on the same shapes.

flan-t5-small shapes (random weights), batch 8, input 256 + 2 soft tokens, target 32, history
32 items of 768-d, fp32 on CPU. The reference: transformers' T5ForConditionalGeneration with
inputs_embeds, frozen, and AdamW on an identical plug.

    python scripts/bench_train_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import matmul_peak_flops, random_flan_t5_small, reference_plug, timeit
from configs import lamp as lamp_config
from pplug_jax import partitioning, system as system_lib

B, S, T, H, DE = 8, 256, 32, 32, 768


def batch_np(seed=0):
  rng = np.random.RandomState(seed)
  h = rng.normal(size=(B, H, DE)).astype(np.float32)
  h /= np.linalg.norm(h, axis=-1, keepdims=True)
  q = rng.normal(size=(B, DE)).astype(np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  return dict(query_embedding=q, history=h, history_mask=np.ones((B, H), np.int32),
              input_ids=rng.randint(2, 32128, (B, S)).astype(np.int32),
              input_mask=np.ones((B, S), np.int32),
              target_ids=rng.randint(2, 32128, (B, T)).astype(np.int32),
              target_mask=np.ones((B, T), np.int32))


def bench_ours(path, repeats, plug: dict | None = None):
  """Seconds per train step and its XLA flop count; `plug`: config.plug overrides (a variant)."""
  config = lamp_config.get_config('demo')
  config.llm.path = path
  config.plug.update(plug or {})
  config.llm.dtype = config.llm.param_dtype = 'float32'
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  system = system_lib.load_system(config, DE, mesh)
  tx, _ = system_lib.build_optimizer(config, 1000)
  params = system.init_trainable(0)
  state = {'step': jnp.int32(10), 'params': params, 'opt_state': tx.init(params)}
  step = jax.jit(system_lib.make_train_step(system, tx), donate_argnums=(0,))
  batch = {k: jnp.asarray(v)[None] for k, v in batch_np().items()}
  if system.plug.uses_dates:  # ages 0..H-1 days
    batch['history_age'] = jnp.broadcast_to(jnp.arange(H, dtype=jnp.float32), (1, B, H))
  compiled = step.lower(state, system.llm_params, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = [state]

  def run():
    holder[0], m = compiled(holder[0], system.llm_params, batch)
    m['loss'].block_until_ready()

  return timeit(run, warmup=2, repeats=repeats), float(cost.get('flops', 0.0))


def bench_reference(model, repeats):
  import torch
  plug = reference_plug(DE, 512)
  opt = torch.optim.AdamW(plug.parameters(), lr=1e-4, weight_decay=1e-4)
  b = {k: torch.tensor(v) for k, v in batch_np().items()}
  b = {k: (v.long() if v.dtype == torch.int32 else v) for k, v in b.items()}

  def run():
    soft = plug(b['query_embedding'], b['history'], b['history_mask'].float())
    emb = torch.cat([soft, model.shared(b['input_ids'])], 1)
    mask = torch.cat([torch.ones(B, 2, dtype=torch.long), b['input_mask']], 1)
    loss = model(inputs_embeds=emb, attention_mask=mask, labels=b['target_ids']).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(plug.parameters(), 1.0)
    opt.step()

  return timeit(run, warmup=2, repeats=repeats)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  import torch
  model, path = random_flan_t5_small()
  peak = matmul_peak_flops()
  ours_s, flops = bench_ours(path, args.repeats)
  ref_s = bench_reference(model, args.repeats)
  out = {
      'shapes': dict(batch=B, input=S, soft_tokens=2, target=T, history=H, model='flan-t5-small'),
      'devices': str(jax.devices()[0]), 'torch_threads': torch.get_num_threads(),
      'ours_examples_per_s': B / ours_s, 'reference_examples_per_s': B / ref_s,
      'speedup': ref_s / ours_s, 'step_gflop_xla': flops / 1e9,
      'ours_gflops_per_s': flops / ours_s / 1e9, 'reference_gflops_per_s': flops / ref_s / 1e9,
      'matmul_peak_gflops_per_s': peak / 1e9, 'ours_fraction_of_peak': flops / ours_s / peak,
  }
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
