"""Shared set-up for the benchmarks: flan-t5-small shapes with random weights, both frameworks."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

FLAN_T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                     num_decoder_layers=8, num_heads=6, feed_forward_proj='gated-gelu',
                     tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
                     pad_token_id=0, eos_token_id=1)


def random_flan_t5_small(seed: int = 0):
  """(torch model, directory with its safetensors) of a random flan-t5-small-shaped T5."""
  import torch
  from safetensors.torch import save_file
  from transformers import T5Config, T5ForConditionalGeneration
  torch.manual_seed(seed)
  config = T5Config(**FLAN_T5_SMALL)
  model = T5ForConditionalGeneration(config).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(32128, 512) * 512**-0.5)
  path = tempfile.mkdtemp(prefix='bench_t5_')
  state = {k: v.contiguous() for k, v in model.state_dict().items()
           if k not in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')}
  save_file(state, os.path.join(path, 'model.safetensors'))
  hf = config.to_dict()
  hf['tie_word_embeddings'] = False
  hf.pop('scale_decoder_outputs', None)
  import json
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f)
  for p in model.parameters():
    p.requires_grad_(False)
  return model, path


def reference_plug(de: int, dl: int, scale: float = 20.0):
  """The official code's plug in PyTorch (attention pooling, two MLPs, an instruction token),
  seeded; call it as plug(query [B, de], history [B, H, de], mask [B, H]) -> [B, 2, dl]."""
  import torch
  from torch import nn

  class Plug(nn.Module):
    def __init__(self):
      super().__init__()
      self.align_mlp = nn.Sequential(nn.Linear(de, dl), nn.GELU(), nn.Linear(dl, dl))
      self.align_mlp_inst = nn.Sequential(nn.Linear(de, dl), nn.GELU(), nn.Linear(dl, dl))
      self.inst_token = nn.Parameter(torch.randn(de) * de**-0.5)

    def forward(self, q, h, m):
      s = torch.einsum('bd,bhd->bh', q, h).masked_fill(m == 0, -1e9)
      w = torch.softmax(s, -1) * m
      p = torch.einsum('bh,bhd->bd', w, self.align_mlp(h)) * scale
      i = self.align_mlp_inst(self.inst_token)[None].expand_as(p) * scale / 7
      return torch.stack([i, p], 1)

  torch.manual_seed(0)
  return Plug()


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Measured fp32 matmul FLOP/s of this machine through XLA."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - t)


def timeit(fn, warmup: int = 1, repeats: int = 5) -> float:
  """Median seconds per call of fn() (fn must block until done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))
