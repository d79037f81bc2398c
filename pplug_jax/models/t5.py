"""T5 encoder-decoder (FlanT5 = T5 v1.1; v1.0 by config) in Linen with T5X's tree and axis names.

The encoder takes input *embeddings* (the plug prepends soft tokens), the decoder runs either
over a whole target (training) or one token at a time against an explicit key/value cache
(generation). Cross-attention keys/values live in the cache, computed once per input and
shared by every beam of that input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from pplug_jax.models.layers import (NEG_INF, Dense, Embed, constrain, dropout,
                                     multihead_attention, param)
from pplug_jax.models.numerics import ACTIVATIONS, as_dtype
from pplug_jax.models.stack import REMAT_POLICIES, layer_stack  # noqa: F401 (re-exported)

Cache = dict[str, jax.Array]

@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 model; defaults are flan-t5-small."""
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  d_kv: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  gated: bool = True                 # v1.1: gated feed-forward; v1.0: plain
  activation: str = 'gelu_new'       # v1.1: tanh-approximated GELU; v1.0: relu
  tie_word_embeddings: bool = False  # LM head is the token embedding (v1.0)
  scale_decoder_outputs: bool = False  # v1.0 scales the final state by d_model**-0.5
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: Any = jnp.float32           # compute dtype
  param_dtype: Any = jnp.float32
  remat_policy: str = 'none'         # 'none' | 'full' | 'dots_with_no_batch_dims'
  scan_layers: bool = False
  vocab_limit: int = 0               # > 0: logits of ids >= it are -inf (a resized vocabulary)
  dropout_rate: float = 0.0          # applied only when a 'dropout' rng is given (training)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> 'T5Config':
    """Builds the config from a Hugging Face T5 `config.json` dict."""
    ff = hf.get('feed_forward_proj', 'relu')
    gated = ff.startswith('gated-')
    act = ff.split('-')[-1]
    if act == 'gelu' and gated:
      act = 'gelu_new'  # HF maps "gated-gelu" to the tanh approximation
    kw = dict(
        vocab_size=hf['vocab_size'], d_model=hf['d_model'], num_heads=hf['num_heads'],
        d_kv=hf['d_kv'], d_ff=hf['d_ff'], num_encoder_layers=hf['num_layers'],
        num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
        relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
        relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
        layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6), gated=gated, activation=act,
        tie_word_embeddings=hf.get('tie_word_embeddings', True),
        # transformers>=5 writes tie_word_embeddings=True always and keeps the v1.0/v1.1
        # distinction in scale_decoder_outputs; older configs only have tie_word_embeddings.
        scale_decoder_outputs=hf.get('scale_decoder_outputs',
                                     hf.get('tie_word_embeddings', True)),
        pad_token_id=hf.get('pad_token_id', 0), eos_token_id=hf.get('eos_token_id', 1),
        decoder_start_token_id=hf.get('decoder_start_token_id', 0))
    kw.update(overrides)
    for key in ('dtype', 'param_dtype'):
      if key in kw:
        kw[key] = as_dtype(kw[key])
    return cls(**kw)


class RMSNorm(nn.Module):
  """T5 layer norm: no mean, no bias, float32 statistics."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, 'scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype,
                  ('embed',))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """Maps key-minus-query offsets to T5's log-spaced buckets."""
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
      math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias over relative-position buckets; one per stack, shared by layers."""
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """q_pos [Tq], k_pos [Tk] -> float32 bias [1, H, Tq, Tk]."""
    c = self.config
    table = param(self, 'rel_embedding', nn.initializers.normal(1.0),
                  (c.num_heads, c.relative_attention_num_buckets), c.param_dtype,
                  ('heads', 'relpos_buckets'))
    buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional,
                                       c.relative_attention_num_buckets,
                                       c.relative_attention_max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=1)  # [H, Tq, Tk]
    return bias[None]


class Attention(nn.Module):
  """T5 multi-head attention: no bias terms and no 1/sqrt(d) logit scaling."""
  config: T5Config

  def setup(self):
    c = self.config
    inner = c.num_heads * c.d_kv
    dense = functools.partial(Dense, dtype=c.dtype, param_dtype=c.param_dtype)
    self.query = dense(inner, kernel_axes=('embed', 'joined_kv'))
    self.key = dense(inner, kernel_axes=('embed', 'joined_kv'))
    self.value = dense(inner, kernel_axes=('embed', 'joined_kv'))
    self.out = dense(c.d_model, kernel_axes=('joined_kv', 'embed'))

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

  def project_q(self, x: jax.Array) -> jax.Array:
    return constrain(self._heads(self.query(x)), ('batch', 'length', 'heads', 'kv'))

  def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    k = constrain(self._heads(self.key(x)), ('batch', 'length', 'heads', 'kv'))
    v = constrain(self._heads(self.value(x)), ('batch', 'length', 'heads', 'kv'))
    return k, v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    out = multihead_attention(q, k, v, bias, weights_dropout=lambda w: dropout(
        self, w, self.config.dropout_rate))
    return self.out(out.reshape(*out.shape[:-2], -1))


class MlpBlock(nn.Module):
  """Feed-forward: wo(act(wi_0 x) * wi_1 x) when gated (v1.1), else wo(act(wi x))."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dense = functools.partial(Dense, dtype=c.dtype, param_dtype=c.param_dtype)
    act = ACTIVATIONS[c.activation]
    if c.gated:
      h = act(dense(c.d_ff, kernel_axes=('embed', 'mlp'), name='wi_0')(x)) * dense(
          c.d_ff, ('embed', 'mlp'), name='wi_1')(x)
    else:
      h = act(dense(c.d_ff, kernel_axes=('embed', 'mlp'), name='wi')(x))
    h = constrain(dropout(self, h, c.dropout_rate), ('batch', 'length', 'mlp'))
    return dense(c.d_model, kernel_axes=('mlp', 'embed'), name='wo')(h)


def _norm(c: T5Config):
  """The RMSNorm of a layer, for the config's epsilon and dtypes (name it when calling)."""
  return functools.partial(RMSNorm, epsilon=c.layer_norm_epsilon, dtype=c.dtype,
                           param_dtype=c.param_dtype)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + feed-forward."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    c = self.config
    norm = _norm(c)
    h = norm(name='pre_attention_layer_norm')(x)
    attn = Attention(c, name='attention')
    k, v = attn.project_kv(h)
    x = x + dropout(self, attn.attend(attn.project_q(h), k, v, bias), c.dropout_rate)
    x = x + dropout(self, MlpBlock(c, name='mlp')(norm(name='pre_mlp_layer_norm')(x)),
                    c.dropout_rate)
    return constrain(x, ('batch', 'length', 'embed')), None


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention and feed-forward.

  With `cache` (decoding) the new key/value is written at `decode_index` and cross-attention
  keys/values are read from the cache when present, otherwise computed from `encoded`.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None, encoded: jax.Array | None,
               self_bias: jax.Array, cross_bias: jax.Array,
               decode_index: jax.Array | None) -> tuple[jax.Array, Cache | None]:
    c = self.config
    norm = _norm(c)
    h = norm(name='pre_self_attention_layer_norm')(x)
    attn = Attention(c, name='self_attention')
    k, v = attn.project_kv(h)
    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache['self_k'], k.astype(cache['self_k'].dtype),
                                       (0, decode_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache['self_v'], v.astype(cache['self_v'].dtype),
                                       (0, decode_index, 0, 0))
      new_cache = {'self_k': k, 'self_v': v}
    x = x + dropout(self, attn.attend(attn.project_q(h), k, v, self_bias), c.dropout_rate)

    h = norm(name='pre_cross_attention_layer_norm')(x)
    cross = Attention(c, name='encoder_decoder_attention')
    if cache is not None and 'cross_k' in cache:
      ek, ev = cache['cross_k'], cache['cross_v']
    else:
      ek, ev = cross.project_kv(encoded)
    if new_cache is not None:
      new_cache.update(cross_k=ek, cross_v=ev)
    x = x + dropout(self, cross.attend(cross.project_q(h), ek, ev, cross_bias), c.dropout_rate)
    x = x + dropout(self, MlpBlock(c, name='mlp')(norm(name='pre_mlp_layer_norm')(x)),
                    c.dropout_rate)
    return constrain(x, ('batch', 'length', 'embed')), new_cache


class Encoder(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, embedded: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    pos = jnp.arange(embedded.shape[1])
    bias = RelativePositionBias(c, bidirectional=True, name='relpos_bias')(pos, pos)
    bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0, NEG_INF)
    x = dropout(self, embedded.astype(c.dtype), c.dropout_rate)
    x = constrain(x, ('batch', 'length', 'embed'))
    stack = layer_stack(c, EncoderLayer, c.num_encoder_layers, (nn.broadcast,))
    x, _ = stack(x, bias)
    x = _norm(c)(name='encoder_norm')(x)
    return constrain(dropout(self, x, c.dropout_rate), ('batch', 'length', 'embed'))


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, decoder_input_ids: jax.Array, encoded: jax.Array | None,
               encoder_mask: jax.Array, cache: Cache | None = None,
               decode_index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    c = self.config
    rel = RelativePositionBias(c, bidirectional=False, name='relpos_bias')
    if cache is None:
      t = decoder_input_ids.shape[1]
      pos = jnp.arange(t)
      self_bias = rel(pos, pos) + jnp.where(pos[None, :] <= pos[:, None], 0.0, NEG_INF)
    else:
      t_max = cache['self_k'].shape[2]
      k_pos = jnp.arange(t_max)
      q_pos = decode_index + jnp.arange(decoder_input_ids.shape[1])
      self_bias = rel(q_pos, k_pos) + jnp.where(k_pos[None, :] <= q_pos[:, None], 0.0, NEG_INF)
    cross_bias = jnp.where(encoder_mask[:, None, None, :] > 0, 0.0, NEG_INF)
    x = dropout(self, self.shared_embedding(decoder_input_ids), c.dropout_rate)
    x = constrain(x, ('batch', 'length', 'embed'))
    stack = layer_stack(c, DecoderLayer, c.num_decoder_layers,
                         (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))
    x, new_cache = stack(x, cache, encoded, self_bias, cross_bias, decode_index)
    x = _norm(c)(name='decoder_norm')(x)
    x = dropout(self, x, c.dropout_rate)
    if c.scale_decoder_outputs:
      x = x * (c.d_model**-0.5)
    if c.tie_word_embeddings:
      logits = self.shared_embedding.attend(x)
    else:
      logits = Dense(c.vocab_size, kernel_axes=('embed', 'vocab'), dtype=c.dtype,
                     param_dtype=c.param_dtype, name='logits_dense')(x)
    logits = logits.astype(jnp.float32)
    if c.vocab_limit:  # as after resize_token_embeddings(vocab_limit): those ids do not exist
      logits = jnp.where(jnp.arange(c.vocab_size) < c.vocab_limit, logits, NEG_INF)
    return constrain(logits, ('batch', 'length', 'vocab')), new_cache


class T5(nn.Module):
  """FlanT5: `embed`, `encode` (from embeddings), `decode` (full or cached) and `__call__`."""
  config: T5Config

  def setup(self):
    c = self.config
    self.token_embedder = Embed(c.vocab_size, c.d_model, dtype=c.dtype,
                                param_dtype=c.param_dtype)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c, shared_embedding=self.token_embedder)

  def embed(self, ids: jax.Array) -> jax.Array:
    """Token ids [B, S] -> input embeddings [B, S, d_model]."""
    return self.token_embedder(ids)

  def encode(self, embedded: jax.Array, mask: jax.Array) -> jax.Array:
    """Input embeddings [B, S, d] and mask [B, S] -> encoder states [B, S, d]."""
    return self.encoder(embedded, mask)

  def decode(self, decoder_input_ids: jax.Array, encoded: jax.Array | None,
             encoder_mask: jax.Array, cache: Cache | None = None,
             decode_index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    """Decoder logits (float32). With `cache`, writes this step's keys at `decode_index`."""
    return self.decoder(decoder_input_ids, encoded, encoder_mask, cache, decode_index)

  def __call__(self, embedded: jax.Array, mask: jax.Array,
               decoder_input_ids: jax.Array) -> jax.Array:
    """Full teacher-forced forward: logits [B, T, vocab]."""
    logits, _ = self.decode(decoder_input_ids, self.encode(embedded, mask), mask)
    return logits


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
  """Decoder inputs for teacher forcing: [start, y_0 .. y_{T-2}]."""
  start = jnp.full((targets.shape[0], 1), start_id, targets.dtype)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean negative log-likelihood over the real target tokens of the whole batch."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# The decode cache's keys that grow with the generated tokens (one row per beam); the others
# (the cross-attention keys/values) are filled once from the encoder and shared by the beams.
SELF_ATTENTION_CACHE = ('self_k', 'self_v')


def init_cache(config: T5Config, batch: int, max_length: int,
               dtype: Any | None = None) -> Cache:
  """Zero self-attention cache, stacked over layers: [L, B, T, H, D]."""
  shape = (config.num_decoder_layers, batch, max_length, config.num_heads, config.d_kv)
  dtype = dtype or config.dtype
  return {'self_k': jnp.zeros(shape, dtype), 'self_v': jnp.zeros(shape, dtype)}
