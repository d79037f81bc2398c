"""Small Linen building blocks shared by the T5 and BERT encoders, all with logical axis names."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
NEG_INF = -1e9  # additive mask value; kept in float32 so it never overflows bf16 logits


def param(module: nn.Module, name: str, init, shape: Sequence[int], dtype: Dtype,
          axes: Sequence[str | None]) -> jax.Array:
  """Declares a parameter annotated with logical axis names (DESIGN decision 1)."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation; a no-op outside a mesh."""
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """x @ kernel (+ bias), kernel stored (in, out) as in T5X."""
  features: int
  kernel_axes: tuple[str | None, str | None]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.variance_scaling(self.init_scale, 'fan_in', 'truncated_normal')
    kernel = param(self, 'kernel', init, (x.shape[-1], self.features), self.param_dtype,
                   self.kernel_axes)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = param(self, 'bias', nn.initializers.zeros, (self.features,), self.param_dtype,
                   (self.kernel_axes[1],))
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """Token embedding table (vocab, embed); `attend` gives tied output logits."""
  num_embeddings: int
  features: int
  axes: tuple[str, str] = ('vocab', 'embed')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  stddev: float = 1.0

  def setup(self):
    self.embedding = param(self, 'embedding', nn.initializers.normal(self.stddev),
                           (self.num_embeddings, self.features), self.param_dtype, self.axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


def dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout (T5X/HF semantics) while training, the identity otherwise.

  Training is when the module was applied with a 'dropout' rng (rngs={'dropout': key}); without
  one (evaluation, generation) this is exactly the deterministic model.
  """
  if rate <= 0.0 or not module.has_rng('dropout'):
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                        scale: float = 1.0,
                        weights_dropout: Callable[[jax.Array], jax.Array] | None = None
                        ) -> jax.Array:
  """Softmax attention in float32.

  q: [Bq, Tq, H, D]; k, v: [Bk, Tk, H, D] with Bq a multiple g of Bk, so several query rows
  (beams) share one set of keys and values without copying them. bias broadcasts to
  [Bk, H, Tq, Tk] (leading dim Bk or 1) when g > 1, or to [Bq, H, Tq, Tk] when g == 1.
  Returns [Bq, Tq, H, D].
  """
  bq, tq, h, d = q.shape
  bk = k.shape[0]
  g = bq // bk
  qg = q.reshape(bk, g, tq, h, d)
  logits = jnp.einsum('bgqhd,bkhd->bghqk', qg, k, preferred_element_type=jnp.float32)
  logits = logits * scale if scale != 1.0 else logits
  if bias is not None:
    if g > 1 or bias.shape[0] == 1:
      logits = logits + bias[:, None]
    else:
      logits = logits + bias.reshape(bk, g, *bias.shape[1:])
  weights = jax.nn.softmax(logits, axis=-1)
  if weights_dropout is not None:
    weights = weights_dropout(weights)
  out = jnp.einsum('bghqk,bkhd->bgqhd', weights.astype(v.dtype), v)
  return out.reshape(bq, tq, h, d)
