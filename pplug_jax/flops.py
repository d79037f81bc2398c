"""Model FLOPs (analytic, as MFU counts them) and each accelerator's peak FLOP/s.

The planner (`aot`) bounds step times with them; training logs model TFLOP/s per device and MFU
with them; the runbook's precompute ETA uses the encoder's. XLA's own cost analysis counts a
scanned layer once, so these formulas are the count (tests check them against XLA unscanned).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from pplug_jax.data import pipeline
from pplug_jax.models import bert as bert_lib, decoder as decoder_lib, plug as plug_lib, \
    t5 as t5_lib

if TYPE_CHECKING:  # the system is only read here, so no import of it at run time
  from pplug_jax import system as system_lib


@dataclasses.dataclass(frozen=True)
class Chip:
  """What one device of a topology has: HBM and peak dense bf16 FLOP/s (public specs)."""
  name: str
  hbm_gib: float
  peak_bf16_tflops: float


# Keyed by jax's device_kind, for the devices of an AOT topology (the planner): v4 topologies
# list each TensorCore as a device, half a chip.
CHIPS = {
    'TPU v4': Chip('v4 TensorCore (half a chip)', 16.0, 137.5),
    'TPU v5 lite': Chip('v5e', 16.0, 197.0),
    'TPU v5': Chip('v5p', 95.0, 459.0),
    'TPU v5p': Chip('v5p', 95.0, 459.0),
    'TPU v6 lite': Chip('v6e', 32.0, 918.0),
    'TPU v6e': Chip('v6e', 32.0, 918.0),
}


def t5_forward_flops(c: t5_lib.T5Config, enc_len: int, dec_len: int) -> float:
  """Forward FLOPs of one example: 2 x multiply-adds of every matmul, attention included."""
  inner = c.num_heads * c.d_kv
  ff = (3 if c.gated else 2) * c.d_model * c.d_ff
  enc_layer = enc_len * (4 * c.d_model * inner + ff) + 2 * enc_len * enc_len * inner
  dec_layer = (dec_len * (4 * c.d_model * inner + 2 * c.d_model * inner + ff) +
               enc_len * 2 * c.d_model * inner +            # cross-attention keys and values
               2 * dec_len * dec_len * inner + 2 * dec_len * enc_len * inner)
  head = dec_len * c.d_model * c.vocab_size
  return 2.0 * (c.num_encoder_layers * enc_layer + c.num_decoder_layers * dec_layer + head)


def _decoder_layers_flops(c: decoder_lib.DecoderConfig, tokens: int, keys: int) -> float:
  """FLOPs of every layer for `tokens` new positions attending over `keys` positions: q/k/v/o
  projections (grouped k/v), SwiGLU, and the two attention matmuls (computed in full)."""
  q = c.num_heads * c.head_dim
  kv = c.num_kv_heads * c.head_dim
  per_token = 2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
  return 2.0 * c.num_layers * (tokens * per_token + 2 * tokens * keys * q)


def _decoder_forward_flops(c: decoder_lib.DecoderConfig, length: int, head_positions: int
                           ) -> float:
  """Forward FLOPs of one sequence of `length`, with logits at `head_positions` of them."""
  return _decoder_layers_flops(c, length, length) + 2.0 * head_positions * c.hidden_size * \
      c.vocab_size


def llm_forward_flops(c, input_len: int, target_len: int) -> float:
  """One teacher-forced example: T5's encoder input and decoder target, or the decoder-only
  sequence [input; target[:-1]] with logits at the target positions."""
  if isinstance(c, t5_lib.T5Config):
    return t5_forward_flops(c, input_len, target_len)
  return _decoder_forward_flops(c, input_len + target_len - 1, target_len)


def train_step_flops(system: system_lib.System, config,
                     shape: tuple[int, int] | None = None) -> float:
  """FLOPs of one optimizer step over micro-batch x accumulation examples, at the bucket
  `shape` (input x target length; default the maximum lengths).

  Frozen LLM: forward + the input-gradient half of the backward (no weight gradients), so
  2 x forward, plus one more forward of recomputation under remat. The plug's projector runs on
  every history item, forward + full backward (3 x forward).
  """
  c = system.llm.config
  d = config.data
  input_len, target_len = shape or (d.max_input_length, d.max_target_length)
  fwd = llm_forward_flops(c, input_len + plug_lib.num_soft_tokens(config.plug), target_len)
  llm = fwd * (3 if c.remat_policy != 'none' else 2)
  de, dl = system.encoder_dim, c.d_model
  plug = 3 * 2.0 * pipeline.history_length(config) * (de * dl + dl * dl)
  return (llm + plug) * config.optim.batch_size * config.optim.grad_accum


def generate_flops(system: system_lib.System, config, batch: int) -> float:
  """FLOPs of one generation batch with the decode cache.

  T5, per example: the encoder and the cross-attention keys/values once (beams share them); per
  beam and new token: the decoder's projections, feed-forward and LM head, self-attention over
  the cache (on average half the new tokens) and cross-attention over the input.
  Decoder-only, per example: the prefill of [I; P; prompt] with one row of logits; per beam and
  new token: the layers for one position over the prefix and the static cache (computed in
  full), and the LM head.
  """
  c = system.llm.config
  e = config.eval
  enc_len = config.data.max_input_length + plug_lib.num_soft_tokens(config.plug)
  new = e.num_beams * e.max_new_tokens
  if not isinstance(c, t5_lib.T5Config):
    prefill = _decoder_forward_flops(c, enc_len, 1)
    per_token = (_decoder_layers_flops(c, 1, enc_len + e.max_new_tokens) +
                 2.0 * c.hidden_size * c.vocab_size)
    return batch * (prefill + new * per_token)
  inner = c.num_heads * c.d_kv
  ff = (3 if c.gated else 2) * c.d_model * c.d_ff
  encoder = t5_forward_flops(dataclasses.replace(c, num_decoder_layers=0), enc_len, 0)
  cross_kv = 2.0 * c.num_decoder_layers * enc_len * 2 * c.d_model * inner
  per_token = 2.0 * (c.num_decoder_layers * (6 * c.d_model * inner + ff +
                                             2 * (e.max_new_tokens / 2) * inner +
                                             2 * enc_len * inner) +
                     c.d_model * c.vocab_size)
  return batch * (encoder + cross_kv + new * per_token)


# On a running TPU VM, jax's v4 device is a whole chip (both TensorCores, megacore).
_RUNTIME_TFLOPS = {'TPU v4': 275.0}
# Dense bf16 peaks of NVIDIA GPUs, matched by a substring of device_kind, the more specific
# names first ('A100' before 'A10', 'L40S' before 'L4', PCIe before SXM).
_GPU_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('GH200', 989.0),
               ('A100', 312.0), ('A10G', 125.0), ('A10', 125.0), ('L40S', 362.0),
               ('L4', 121.0))


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 [n, n] matmul on the default device, best of `repeats`: the CPU's
  peak, as far as MFU needs one."""
  x = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    mm(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where the figure comes from): public dense bf16 specs for
  TPUs and NVIDIA GPUs, a measured matmul on CPU, (None, why) for an unknown accelerator."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  if device.platform == 'cpu':
    return measured_matmul_flops(), 'measured float32 matmul'
  if kind in _RUNTIME_TFLOPS:
    return _RUNTIME_TFLOPS[kind] * 1e12, f'{kind} spec (bf16)'
  if kind in CHIPS:
    return CHIPS[kind].peak_bf16_tflops * 1e12, f'{kind} spec (bf16)'
  for name, tflops in _GPU_TFLOPS:
    if name in kind:
      return tflops * 1e12, f'{kind} spec (bf16 dense)'
  return None, f'no peak known for {kind!r}: MFU is not logged'


def encoder_flops_per_item(c: bert_lib.BertConfig, length: int) -> float:
  """Forward FLOPs of the text encoder (BERT) on one text of `length` tokens."""
  d, ff = c.hidden_size, c.intermediate_size
  per_layer = length * (4 * d * d + 2 * d * ff) + 2 * length * length * d
  return 2.0 * c.num_hidden_layers * per_layer
