"""BERT encoder (BGE-base-en-v1.5, all-MiniLM-L6-v2, Contriever) with CLS or mean pooling."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from pplug_jax.models.layers import (NEG_INF, Dense, Embed, constrain, dropout,
                                     multihead_attention, param)
from pplug_jax.models.numerics import ACTIVATIONS, as_dtype

POOLINGS = ('cls', 'mean')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder plus how its output is pooled."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  pooling: str = 'cls'
  dropout_rate: float = 0.0  # applied only when a 'dropout' rng is given (training)
  normalize: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> 'BertConfig':
    """Builds the config from a Hugging Face BERT `config.json` dict."""
    if hf.get('hidden_act', 'gelu') not in ACTIVATIONS:
      raise ValueError(f"Unsupported BERT hidden_act {hf['hidden_act']!r}.")
    kw = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
    kw.pop('dtype', None)
    kw.update(overrides)
    for key in ('dtype', 'param_dtype'):
      if key in kw:
        kw[key] = as_dtype(kw[key])
    if kw.get('pooling', 'cls') not in POOLINGS:
      raise ValueError(f"pooling={kw['pooling']!r} is not one of {POOLINGS}.")
    return cls(**kw)


class LayerNorm(nn.Module):
  """Standard LayerNorm with float32 statistics."""
  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = param(self, 'scale', nn.initializers.ones, (d,), self.param_dtype, ('embed',))
    bias = param(self, 'bias', nn.initializers.zeros, (d,), self.param_dtype, ('embed',))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class BertLayer(nn.Module):
  """Post-LN self-attention + feed-forward block."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    c = self.config
    h, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = functools.partial(Dense, use_bias=True, dtype=c.dtype, param_dtype=c.param_dtype)
    ln = functools.partial(LayerNorm, epsilon=c.layer_norm_eps, dtype=c.dtype,
                           param_dtype=c.param_dtype)
    heads = lambda t: t.reshape(*t.shape[:-1], h, d)
    q = heads(dense(c.hidden_size, kernel_axes=('embed', 'joined_kv'), name='query')(x))
    k = heads(dense(c.hidden_size, kernel_axes=('embed', 'joined_kv'), name='key')(x))
    v = heads(dense(c.hidden_size, kernel_axes=('embed', 'joined_kv'), name='value')(x))
    att = multihead_attention(q, k, v, bias, scale=d**-0.5,
                              weights_dropout=lambda w: dropout(self, w, c.dropout_rate))
    att = dense(c.hidden_size, kernel_axes=('joined_kv', 'embed'), name='attention_out')(
        att.reshape(*att.shape[:-2], -1))
    x = ln(name='attention_norm')(x + dropout(self, att, c.dropout_rate))
    m = dense(c.intermediate_size, kernel_axes=('embed', 'mlp'), name='wi')(x)
    m = ACTIVATIONS[c.hidden_act](m)
    m = dense(c.hidden_size, kernel_axes=('mlp', 'embed'), name='wo')(m)
    return constrain(ln(name='mlp_norm')(x + dropout(self, m, c.dropout_rate)),
                     ('batch', 'length', 'embed'))


class Bert(nn.Module):
  """BERT encoder: `__call__` gives hidden states, `embed_text` the pooled sentence vector."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    c = self.config
    emb = functools.partial(Embed, features=c.hidden_size, dtype=jnp.float32,
                            param_dtype=c.param_dtype, stddev=0.02)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    pos = jnp.arange(input_ids.shape[1])[None, :]
    x = (emb(c.vocab_size, name='word_embeddings')(input_ids) +
         emb(c.max_position_embeddings, axes=('abspos', 'embed'),
             name='position_embeddings')(pos) +
         emb(c.type_vocab_size, axes=('token_type', 'embed'),
             name='token_type_embeddings')(token_type_ids))
    x = LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                  name='embeddings_norm')(x)
    x = constrain(dropout(self, x, c.dropout_rate), ('batch', 'length', 'embed'))
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, NEG_INF)
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, name=f'layers_{i}')(x, bias)
    return x

  def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Pooled (and optionally L2-normalised) float32 sentence embeddings [B, hidden]."""
    return pool(self(input_ids, attention_mask), attention_mask, self.config.pooling,
                self.config.normalize)


def pool(hidden: jax.Array, mask: jax.Array, pooling: str, normalize: bool) -> jax.Array:
  """CLS or masked-mean pooling of [B, S, d] hidden states, in float32."""
  hidden = hidden.astype(jnp.float32)
  if pooling == 'cls':
    out = hidden[:, 0]
  elif pooling == 'mean':
    m = mask.astype(jnp.float32)[..., None]
    out = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  else:
    raise ValueError(f'pooling={pooling!r} is not one of {POOLINGS}.')
  if normalize:
    out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
  return out
