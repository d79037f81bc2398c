"""Decoder-only causal LMs (Llama 2/3.x, Qwen2/2.5, Qwen3) in Linen with T5X-style axis names.

One module covers the three families; they differ only in config: grouped-query attention,
q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), RoPE theta and Llama 3 frequency scaling,
tied or untied heads. The model takes input *embeddings* (the plug prepends soft tokens).

Positions are `cumsum(mask) - 1` over the sequence, so padding anywhere (between the prompt and
the target, say) never shifts a row's positions, and masked keys are never attended to.
Generation keeps the prefix's keys/values (one copy per input, shared by its beams) apart from
the generated tokens' (one per beam, in a static-shape cache).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pplug_jax.errors import UserError
from pplug_jax.models.layers import NEG_INF, Dense, Embed, constrain, dropout, param
from pplug_jax.models.numerics import as_dtype
from pplug_jax.models.stack import layer_stack

SUPPORTED_MODEL_TYPES = ('llama', 'qwen2', 'qwen3')
SUPPORTED_ROPE_TYPES = ('default', 'linear', 'llama3')


class UnsupportedModelError(UserError):
  """A config.json this module cannot run faithfully; the message names what is supported."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of a decoder-only LM; defaults are a tiny Llama."""
  model_type: str = 'llama'
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = 'default'          # 'default' | 'linear' | 'llama3'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  qkv_bias: bool = False              # Qwen2; Llama with attention_bias
  out_bias: bool = False              # Llama with attention_bias
  mlp_bias: bool = False
  qk_norm: bool = False               # Qwen3
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int | None = None
  dtype: Any = jnp.float32            # compute dtype
  param_dtype: Any = jnp.float32
  remat_policy: str = 'none'          # 'none' | 'full' | 'dots_with_no_batch_dims' | 'dots'
  scan_layers: bool = False
  shard_kv_heads: bool = True         # False: K/V projections replicated (model axis > KV heads)
  dropout_rate: float = 0.0           # attention-weight dropout, only with a 'dropout' rng

  @property
  def d_model(self) -> int:
    """The embedding width (the plug's output size), named as for T5."""
    return self.hidden_size

  @property
  def eos_token_id(self) -> int:
    """The first end-of-sequence id (the one appended to targets)."""
    return self.eos_token_ids[0]

  @property
  def fill_token_id(self) -> int:
    """What pads generated rows after EOS: pad_token_id, else EOS (as HF generate does)."""
    return self.eos_token_ids[0] if self.pad_token_id is None else self.pad_token_id

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = 'config.json',
              **overrides) -> 'DecoderConfig':
    """Builds the config from a Hugging Face `config.json` dict; refuses what it cannot run."""
    model_type = hf.get('model_type')
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
          f'{source}: model_type={model_type!r} is not a supported decoder-only family; '
          f'supported: {", ".join(SUPPORTED_MODEL_TYPES)} (and t5 for FlanT5).')
    act = hf.get('hidden_act', 'silu')
    if act != 'silu':
      raise UnsupportedModelError(f'{source}: hidden_act={act!r}; only silu (SwiGLU) is '
                                  'supported.')
    sliding = hf.get('use_sliding_window') or 'sliding_attention' in (hf.get('layer_types') or [])
    if sliding:
      raise UnsupportedModelError(f'{source}: sliding-window attention is not supported; use a '
                                  'checkpoint with use_sliding_window=false.')
    rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise UnsupportedModelError(f'{source}: rope type {rope_type!r} is not supported; '
                                  f'supported: {", ".join(SUPPORTED_ROPE_TYPES)}.')
    heads = hf['num_attention_heads']
    eos = hf.get('eos_token_id')
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    if not eos:
      raise UnsupportedModelError(f'{source}: no eos_token_id; generation cannot stop. Add it '
                                  "from the model's generation_config.json.")
    bias = bool(hf.get('attention_bias', False))
    kw = dict(
        model_type=model_type, vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'], num_layers=hf['num_hidden_layers'],
        num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
        rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
        rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
        rope_type=rope_type, rope_factor=float(rope.get('factor', 1.0)),
        rope_low_freq_factor=float(rope.get('low_freq_factor', 1.0)),
        rope_high_freq_factor=float(rope.get('high_freq_factor', 4.0)),
        rope_original_max_positions=int(rope.get('original_max_position_embeddings',
                                                 hf.get('max_position_embeddings', 8192))),
        qkv_bias=model_type == 'qwen2' or bias, out_bias=model_type != 'qwen2' and bias,
        mlp_bias=bool(hf.get('mlp_bias', False)) and model_type == 'llama',
        qk_norm=model_type == 'qwen3',
        tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
        bos_token_id=hf.get('bos_token_id'), eos_token_ids=eos,
        pad_token_id=hf.get('pad_token_id'))
    kw.update(overrides)
    for key in ('dtype', 'param_dtype'):
      if key in kw:
        kw[key] = as_dtype(kw[key])
    return cls(**kw)


def rope_frequencies(c: DecoderConfig) -> np.ndarray:
  """Inverse frequencies [head_dim/2] of the config's RoPE (Llama 3 scaling included)."""
  dim = c.head_dim
  inv = 1.0 / (c.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if c.rope_type == 'linear':
    inv = inv / c.rope_factor
  elif c.rope_type == 'llama3':
    old = c.rope_original_max_positions
    low_wavelen = old / c.rope_low_freq_factor
    high_wavelen = old / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
    smooth = (old / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_tables(c: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, head_dim] in float32 for integer positions [B, T]."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_frequencies(c))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, H, D] by the half-split RoPE (Hugging Face's rotate_half layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
  return x * cos + rotated * sin


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Each token's position counting only real tokens before it: padding never shifts a row."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32 (Hugging Face LlamaRMSNorm)."""
  epsilon: float
  axis_name: str = 'embed'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, 'scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype,
                  (self.axis_name,))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def grouped_attention(q: jax.Array, blocks: list[tuple[jax.Array, jax.Array, jax.Array]],
                      scale: float,
                      weights_dropout=None) -> jax.Array:
  """Softmax attention over several key blocks at once, in float32, with grouped-query heads.

  q: [N, Tq, H, D]. Each block is (k, v [Bk, Tk, Hkv, D], bias [Bk or 1, Tq, Tk]) with N a
  multiple of Bk: several query rows (beams) share one block's keys without copying them.
  The softmax runs over the keys of every block together. Returns [N, Tq, H, D].
  """
  n, tq, h, d = q.shape
  hkv = blocks[0][0].shape[2]
  q = q.reshape(n, tq, hkv, h // hkv, d)
  logits = []
  for k, _, bias in blocks:
    bk = k.shape[0]
    qg = q.reshape(bk, n // bk, tq, hkv, h // hkv, d)
    lg = jnp.einsum('bgqhrd,bkhd->bghrqk', qg, k, preferred_element_type=jnp.float32) * scale
    lg = lg + bias[:, None, None, None].astype(jnp.float32)
    logits.append(lg.reshape(n, hkv, h // hkv, tq, k.shape[1]))
  weights = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  if weights_dropout is not None:
    weights = weights_dropout(weights)
  out, start = 0.0, 0
  for k, v, _ in blocks:
    bk, tk = k.shape[0], k.shape[1]
    w = weights[..., start:start + tk].reshape(bk, n // bk, hkv, h // hkv, tq, tk)
    out = out + jnp.einsum('bghrqk,bkhd->bgqhrd', w.astype(v.dtype), v).reshape(
        n, tq, hkv, h // hkv, d)
    start += tk
  return out.reshape(n, tq, h, d)


class Attention(nn.Module):
  """Causal self-attention with RoPE, grouped-query heads and optional biases / q-k norms."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict | None, rope: tuple[jax.Array, jax.Array],
               bias: tuple[jax.Array, ...], slot: jax.Array | None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    c = self.config
    n, t = x.shape[:2]
    dense = functools.partial(Dense, dtype=c.dtype, param_dtype=c.param_dtype)
    kv_axis = 'joined_kv' if c.shard_kv_heads else None
    kv_heads_axis = 'heads' if c.shard_kv_heads else None
    q = dense(c.num_heads * c.head_dim, ('embed', 'joined_kv'), use_bias=c.qkv_bias,
              name='query')(x).reshape(n, t, c.num_heads, c.head_dim)
    k = dense(c.num_kv_heads * c.head_dim, ('embed', kv_axis), use_bias=c.qkv_bias,
              name='key')(x).reshape(n, t, c.num_kv_heads, c.head_dim)
    v = dense(c.num_kv_heads * c.head_dim, ('embed', kv_axis), use_bias=c.qkv_bias,
              name='value')(x).reshape(n, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      norm = functools.partial(RMSNorm, c.rms_norm_eps, 'kv', c.dtype, c.param_dtype)
      q, k = norm(name='query_norm')(q), norm(name='key_norm')(k)
    q = constrain(apply_rope(q, *rope), ('batch', 'length', 'heads', 'kv'))
    k = constrain(apply_rope(k, *rope), ('batch', 'length', kv_heads_axis, 'kv'))
    v = constrain(v, ('batch', 'length', kv_heads_axis, 'kv'))
    if cache is None:  # a whole sequence (training, prefill)
      blocks = [(k, v, bias[0])]
      new = {'k': k, 'v': v}
    else:  # one step: the shared prefix, then this row's generated tokens with k/v at `slot`
      gk = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, slot, 0, 0))
      gv = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, slot, 0, 0))
      blocks = [(cache['prefix_k'], cache['prefix_v'], bias[0]), (gk, gv, bias[1])]
      new = {'k': gk, 'v': gv}
    out = grouped_attention(q, blocks, c.head_dim**-0.5, lambda w: dropout(self, w,
                                                                           c.dropout_rate))
    out = dense(c.hidden_size, ('joined_kv', 'embed'), use_bias=c.out_bias,
                name='out')(out.reshape(n, t, -1))
    return out, new


class MlpBlock(nn.Module):
  """SwiGLU: wo(silu(wi_0 x) * wi_1 x) (HF gate_proj, up_proj, down_proj)."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dense = functools.partial(Dense, dtype=c.dtype, param_dtype=c.param_dtype,
                              use_bias=c.mlp_bias)
    h = jax.nn.silu(dense(c.intermediate_size, ('embed', 'mlp'), name='wi_0')(x)) * dense(
        c.intermediate_size, ('embed', 'mlp'), name='wi_1')(x)
    h = constrain(h, ('batch', 'length', 'mlp'))
    return dense(c.hidden_size, ('mlp', 'embed'), name='wo')(h)


class DecoderLayer(nn.Module):
  """Pre-norm self-attention + SwiGLU; returns this layer's keys/values when `return_kv`."""
  config: DecoderConfig
  return_kv: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict | None, rope: tuple[jax.Array, jax.Array],
               bias: tuple[jax.Array, ...], slot: jax.Array | None
               ) -> tuple[jax.Array, dict | None]:
    c = self.config
    norm = functools.partial(RMSNorm, c.rms_norm_eps, 'embed', c.dtype, c.param_dtype)
    h, kv = Attention(c, name='attention')(norm(name='input_norm')(x), cache, rope, bias, slot)
    x = x + h
    x = x + MlpBlock(c, name='mlp')(norm(name='post_attention_norm')(x))
    return constrain(x, ('batch', 'length', 'embed')), (kv if self.return_kv else None)


class Layers(nn.Module):
  """The layer stack and the final norm; `return_kv` (static) also gives every layer's K/V."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict | None, rope, bias, slot,
               return_kv: bool = False) -> tuple[jax.Array, dict | None]:
    c = self.config
    stack = layer_stack(c, DecoderLayer, c.num_layers,
                        (0, nn.broadcast, nn.broadcast, nn.broadcast), return_kv=return_kv)
    x, kv = stack(constrain(x.astype(c.dtype), ('batch', 'length', 'embed')), cache, rope, bias,
                  slot)
    x = RMSNorm(c.rms_norm_eps, 'embed', c.dtype, c.param_dtype, name='final_norm')(x)
    return x, kv


def last_real_index(mask: jax.Array) -> jax.Array:
  """Index [B] of each row's last real token (0 for a row with none)."""
  return jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1])[None], 0), axis=1)


def causal_bias(mask: jax.Array) -> jax.Array:
  """[B, T, T] additive bias: key j is visible to query i when j <= i and j is real."""
  t = mask.shape[1]
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  return jnp.where(causal[None] & (mask[:, None, :] > 0), 0.0, NEG_INF)


class CausalLM(nn.Module):
  """Llama / Qwen2 / Qwen3: `embed`, full logits, target logits, `prefill` and `decode_step`."""
  config: DecoderConfig

  def setup(self):
    c = self.config
    self.token_embedder = Embed(c.vocab_size, c.hidden_size, dtype=c.dtype,
                                param_dtype=c.param_dtype)
    self.layers = Layers(c)
    if not c.tie_word_embeddings:
      self.logits_dense = Dense(c.vocab_size, kernel_axes=('embed', 'vocab'), dtype=c.dtype,
                                param_dtype=c.param_dtype)

  def embed(self, ids: jax.Array) -> jax.Array:
    """Token ids [B, S] -> input embeddings [B, S, hidden]."""
    return self.token_embedder(ids)

  def lm_head(self, x: jax.Array) -> jax.Array:
    """Final hidden states -> float32 logits."""
    if self.config.tie_word_embeddings:
      logits = self.token_embedder.attend(x)
    else:
      logits = self.logits_dense(x)
    return constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))

  def hidden(self, embedded: jax.Array, mask: jax.Array) -> jax.Array:
    """Final-norm hidden states [B, T, hidden] of a whole (possibly padded) sequence."""
    rope = rope_tables(self.config, positions_from_mask(mask))
    x, _ = self.layers(embedded, None, rope, (causal_bias(mask),), None)
    return x

  def __call__(self, embedded: jax.Array, mask: jax.Array) -> jax.Array:
    """Logits [B, T, vocab] at every position."""
    return self.lm_head(self.hidden(embedded, mask))

  def target_logits(self, prefix: jax.Array, prefix_mask: jax.Array, target_ids: jax.Array,
                    target_mask: jax.Array) -> jax.Array:
    """Teacher-forced logits [B, T, vocab] predicting target_ids after [prefix] (embeddings).

    The sequence is [prefix; target[:-1]]; target token 0 is predicted from each row's last
    real prefix token, token j > 0 from target token j - 1, wherever padding sits.
    """
    p, t = prefix.shape[1], target_ids.shape[1]
    seq = jnp.concatenate([prefix, self.embed(target_ids[:, :-1]).astype(prefix.dtype)], axis=1)
    mask = jnp.concatenate([prefix_mask, target_mask[:, :-1]], axis=1)
    x = self.hidden(seq, mask)
    last = last_real_index(prefix_mask)
    idx = jnp.concatenate([last[:, None], p + jnp.arange(t - 1)[None].repeat(x.shape[0], 0)],
                          axis=1)
    return self.lm_head(jnp.take_along_axis(x, idx[..., None], axis=1))

  def prefill(self, embedded: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """Runs the prefix: (logits [B, vocab] after its last real token, {'k','v'} [L, B, P, ..]."""
    rope = rope_tables(self.config, positions_from_mask(mask))
    x, kv = self.layers(embedded, None, rope, (causal_bias(mask),), None, True)
    last = last_real_index(mask)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)
    return self.lm_head(x)[:, 0], kv

  def decode_step(self, token_ids: jax.Array, positions: jax.Array, cache: dict,
                  prefix_bias: jax.Array, step_bias: jax.Array, slot: jax.Array
                  ) -> tuple[jax.Array, dict]:
    """One token per row: logits [N, vocab] and the generated keys/values with this one at slot.

    cache: prefix_k/v [L, B, P, Hkv, D] (shared by the N/B beams of an input) and k/v
    [L, N, S, Hkv, D]; prefix_bias [B, 1, P], step_bias [1, 1, S]; positions [N, 1].
    """
    rope = rope_tables(self.config, positions)
    x, kv = self.layers(self.embed(token_ids), cache, rope, (prefix_bias, step_bias), slot,
                        True)
    return self.lm_head(x)[:, 0], kv


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean negative log-likelihood over the real target tokens of the whole batch."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kv_heads_shardable(num_kv_heads: int, model_axis_size: int) -> bool:
  """Whether the K/V heads can be split over the model axis (else they are replicated)."""
  return model_axis_size <= 1 or num_kv_heads % model_axis_size == 0
