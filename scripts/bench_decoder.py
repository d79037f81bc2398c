"""Times the decoder-only (Llama) PPlug train step and generation against PyTorch references.

Shapes (fp32 on CPU, random weights): a tiny Llama with hidden 256, 4 layers, 8 heads, 4 KV
heads (GQA, head dim 32), intermediate 688, vocab 32000, untied head; batch 8, prompt 128 tokens
+ 2 soft tokens, target 32, history 32 items of 768-d, 32 new tokens. `--quick`: hidden 128,
2 layers, 4 heads, 2 KV heads, intermediate 344, vocab 8000; batch 4, prompt 32, target 8,
history 8, 8 new tokens (a smoke run).

1. Train step. Ours: `system.make_train_step` (jitted; the frozen Llama loaded through
   config.llm.path from the directory transformers' `save_pretrained` wrote). The reference:
   transformers' LlamaForCausalLM (frozen) fed inputs_embeds = [I; P; Emb(prompt); Emb(target)]
   with labels -100 on the soft and prompt positions (HF defaults: full logits, its own shifted
   loss), the official plug (`bench_common.reference_plug`, given our plug's initial weights and
   persona scale) and torch AdamW + gradient clipping on the plug only. The first step's losses
   of the two must agree (identical plug weights, same batch).
2. Generation, greedy and beam 4. Ours: `decoding.greedy` / `decoding.beam_search` on the
   backbone (what `generation.decode_tokens` runs), jitted. The reference: HF
   `generate(inputs_embeds=..., attention_mask=..., max_new_tokens=N, min_new_tokens=N)` (HF's
   defaults otherwise: KV cache, length_penalty 1, early_stopping False). EOS is disabled on both
   sides (ours: an EOS id outside the vocabulary; HF: min_new_tokens=N) so both produce exactly N
   tokens per row. Both get the same input embeddings [2 soft vectors; Emb(prompt)].

torch's thread count is left at its default (printed as torch_threads); XLA uses its own
default CPU threads. One JSON line per measurement: ours_s, torch_s (seconds per call, median)
and ratio = torch_s / ours_s (> 1: ours faster).

    python scripts/bench_decoder.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import matmul_peak_flops, reference_plug, timeit
from configs import lamp as lamp_config
from pplug_jax import decoding, partitioning, system as system_lib
from pplug_jax.models import decoder as decoder_lib

FULL = dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, vocab=32000,
            batch=8, prompt=128, target=32, history=32, new_tokens=32)
QUICK = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=344, vocab=8000,
             batch=4, prompt=32, target=8, history=8, new_tokens=8)
DE = 768  # history / query embedding width (BGE-base)


def random_llama(shapes: dict, seed: int = 0):
  """(torch LlamaForCausalLM, eval, frozen; the directory save_pretrained wrote it to)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(seed)
  config = LlamaConfig(vocab_size=shapes['vocab'], hidden_size=shapes['hidden'],
                       intermediate_size=shapes['intermediate'],
                       num_hidden_layers=shapes['layers'], num_attention_heads=shapes['heads'],
                       num_key_value_heads=shapes['kv_heads'], max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       rms_norm_eps=1e-6)
  model = LlamaForCausalLM(config).eval()
  path = tempfile.mkdtemp(prefix='bench_llama_')
  model.save_pretrained(path)
  for p in model.parameters():
    p.requires_grad_(False)
  return model, path


def batch_np(shapes: dict, seed: int = 0) -> dict:
  b, s, t, h, v = (shapes[k] for k in ('batch', 'prompt', 'target', 'history', 'vocab'))
  rng = np.random.RandomState(seed)
  hist = rng.normal(size=(b, h, DE)).astype(np.float32)
  hist /= np.linalg.norm(hist, axis=-1, keepdims=True)
  q = rng.normal(size=(b, DE)).astype(np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  return dict(query_embedding=q, history=hist, history_mask=np.ones((b, h), np.int32),
              input_ids=rng.randint(3, v, (b, s)).astype(np.int32),
              input_mask=np.ones((b, s), np.int32),
              target_ids=rng.randint(3, v, (b, t)).astype(np.int32),
              target_mask=np.ones((b, t), np.int32))


def load_ours(path: str):
  config = lamp_config.get_config('demo,llm=decoder')
  config.llm.path = path
  config.llm.dtype = config.llm.param_dtype = 'float32'
  config.llm.remat_policy = 'none'
  config.llm.scan_layers = False
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  return config, system_lib.load_system(config, DE, mesh)


def bench_train_ours(config, system, shapes, repeats):
  tx, _ = system_lib.build_optimizer(config, 1000)
  params = system.init_trainable(0)
  state = {'step': jnp.int32(10), 'params': params, 'opt_state': tx.init(params)}
  step = jax.jit(system_lib.make_train_step(system, tx), donate_argnums=(0,))
  batch = {k: jnp.asarray(v)[None] for k, v in batch_np(shapes).items()}
  compiled = step.lower(state, system.llm_params, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder, losses = [state], []

  def run():
    holder[0], m = compiled(holder[0], system.llm_params, batch)
    losses.append(float(m['loss']))  # blocks until the step is done

  seconds = timeit(run, warmup=2, repeats=repeats)
  return seconds, float((cost or {}).get('flops', 0.0)), losses[0]


def torch_plug_from_ours(system, plug_params):
  """The official plug in torch, with our plug's initial weights and persona scale."""
  import torch
  plug = reference_plug(DE, system.llm.config.hidden_size, scale=system.plug.persona_scale)
  p = jax.tree.map(np.asarray, plug_params)
  with torch.no_grad():
    for name in ('align_mlp', 'align_mlp_inst'):
      seq = getattr(plug, name)
      for i, fc in ((0, 'fc1'), (2, 'fc2')):
        seq[i].weight.copy_(torch.tensor(p[name][fc]['kernel'].T))
        seq[i].bias.copy_(torch.tensor(p[name][fc]['bias']))
    plug.inst_token.copy_(torch.tensor(p['inst_token']))
  return plug


def bench_train_torch(model, plug, config, shapes, repeats):
  import torch
  b, s = shapes['batch'], shapes['prompt']
  opt = torch.optim.AdamW(plug.parameters(), lr=config.optim.lr,
                          weight_decay=config.optim.weight_decay)
  d = {k: torch.tensor(v) for k, v in batch_np(shapes).items()}
  d = {k: (v.long() if v.dtype == torch.int32 else v) for k, v in d.items()}
  table = model.get_input_embeddings()
  labels = torch.cat([torch.full((b, 2 + s), -100, dtype=torch.long), d['target_ids']], 1)
  mask = torch.cat([torch.ones(b, 2, dtype=torch.long), d['input_mask'], d['target_mask']], 1)
  losses = []

  def run():
    soft = plug(d['query_embedding'], d['history'], d['history_mask'].float())
    emb = torch.cat([soft, table(d['input_ids']), table(d['target_ids'])], 1)
    loss = model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(plug.parameters(), 1.0)
    opt.step()
    losses.append(loss.item())

  return timeit(run, warmup=2, repeats=repeats), losses[0]


def bench_generation(system, ref, shapes, repeats):
  """[(name, ours_s, torch_s, extra)] for greedy and beam 4 on the same input embeddings."""
  import torch
  b, s, n = shapes['batch'], shapes['prompt'], shapes['new_tokens']
  config = dataclasses.replace(system.llm.config, eos_token_ids=(-1,))  # never stop early
  model, params = decoder_lib.CausalLM(config), system.llm_params
  rng = np.random.RandomState(1)
  ids = rng.randint(3, shapes['vocab'], (b, s))
  table = np.asarray(params['token_embedder']['embedding'])
  scale = float(np.linalg.norm(table, axis=-1).mean())
  soft = rng.normal(size=(b, 2, shapes['hidden'])).astype(np.float32)
  soft *= scale / np.linalg.norm(soft, axis=-1, keepdims=True)
  emb = np.concatenate([soft, table[ids]], axis=1)
  mask = np.ones((b, 2 + s), np.int32)
  e, m = jnp.asarray(emb), jnp.asarray(mask)
  te, tm = torch.tensor(emb), torch.tensor(mask).long()
  greedy = jax.jit(lambda p, e, m: decoding.greedy(model, p, e, m, n))
  beam = jax.jit(lambda p, e, m: decoding.beam_search(model, p, e, m, n, 4)[0])
  out = []
  for name, fn, beams in (('greedy', greedy, 1), ('beam4', beam, 4)):
    ours = timeit(lambda: jax.block_until_ready(fn(params, e, m)), warmup=1, repeats=repeats)
    hf_out = []

    def hf(beams=beams):
      with torch.no_grad():
        seq = ref.generate(inputs_embeds=te, attention_mask=tm, max_new_tokens=n,
                           min_new_tokens=n, num_beams=beams, do_sample=False)
      hf_out[:] = [seq.numpy()]

    theirs = timeit(hf, warmup=1, repeats=repeats)
    tokens = np.asarray(fn(params, e, m))
    assert tokens.shape == (b, n), tokens.shape
    assert hf_out[0].shape == (b, n), hf_out[0].shape  # inputs_embeds: new tokens only
    out.append((name, ours, theirs, {'tokens_equal_frac': float((tokens == hf_out[0]).mean())}))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=None, help='default 5 (--quick: 2)')
  parser.add_argument('--quick', action='store_true', help='small shapes: a smoke run')
  args = parser.parse_args()
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  shapes = QUICK if args.quick else FULL
  repeats = args.repeats or (2 if args.quick else 5)
  common = {'shapes': dict(shapes, soft_tokens=2, history_dim=DE, model='llama'),
            'devices': str(jax.devices()[0]), 'torch_threads': torch.get_num_threads(),
            'repeats': repeats}
  ref, path = random_llama(shapes)
  config, system = load_ours(path)
  assert system.llm.config.num_kv_heads == shapes['kv_heads']

  plug = torch_plug_from_ours(system, system.init_trainable(0)['plug'])
  peak = matmul_peak_flops(1024 if args.quick else 2048)
  ours_s, flops, ours_loss = bench_train_ours(config, system, shapes, repeats)
  torch_s, torch_loss = bench_train_torch(ref, plug, config, shapes, repeats)
  loss_diff = abs(ours_loss - torch_loss)
  tokens = shapes['batch'] * (2 + shapes['prompt'] + shapes['target'])
  print(json.dumps({'measurement': 'train_step', **common, 'ours_s': ours_s, 'torch_s': torch_s,
                    'ratio': torch_s / ours_s, 'aim': 1.5,
                    'sequence_tokens_per_step': tokens,
                    'first_step_loss_ours': ours_loss, 'first_step_loss_torch': torch_loss,
                    'first_step_loss_abs_diff': loss_diff,
                    'step_gflop_xla': flops / 1e9, 'ours_gflops_per_s': flops / ours_s / 1e9,
                    'matmul_peak_gflops_per_s': peak / 1e9}), flush=True)
  assert loss_diff < 1e-4, (ours_loss, torch_loss)

  for name, ours, theirs, extra in bench_generation(system, ref, shapes, repeats):
    n = shapes['batch'] * shapes['new_tokens']
    print(json.dumps({'measurement': name, **common, 'ours_s': ours, 'torch_s': theirs,
                      'ratio': theirs / ours, 'aim': 2.0, 'new_tokens_per_call': n,
                      'ours_tokens_per_s': n / ours, 'torch_tokens_per_s': n / theirs,
                      **extra}), flush=True)


if __name__ == '__main__':
  main()
