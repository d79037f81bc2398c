"""The persona plug: attention-pooled user history -> persona token, plus an instruction token.

    w_k = softmax_k(q . h_k) over real items      (q, h_k: normalised encoder embeddings)
    P   = persona_scale * sum_k w_k Proj(h_k)     Proj: Linear(de->dl) -> GELU -> Linear(dl->dl)
    I   = persona_scale / inst_divisor * MLP_I(v) v: a learned vector in encoder space
    X   = [I; P; Emb(x)]                          the frozen LLM's input embeddings (T5's
                                                  encoder; a decoder-only LM's prefix)

A user with no history gets P = 0 (the reference returns NaN there).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pplug_jax.models.layers import NEG_INF, Dense, param
from pplug_jax.models import backbone, numerics

NUM_SOFT_TOKENS = 2


class ProjectionMLP(nn.Module):
  """Linear -> GELU (exact) -> Linear, with biases (the reference's `align_mlp`)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(Dense, use_bias=True, dtype=self.dtype, param_dtype=jnp.float32)
    h = dense(self.features, kernel_axes=('plug_in', 'embed'), name='fc1')(x)
    h = jax.nn.gelu(h, approximate=False)
    return dense(self.features, kernel_axes=('embed', 'embed_out'), name='fc2')(h)


class PersonaPlug(nn.Module):
  """Maps (query embedding, history embeddings) to the two soft tokens [I; P]."""
  encoder_dim: int
  llm_dim: int
  persona_scale: float
  instruction_scale: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, history: jax.Array,
               history_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """query [B, de], history [B, H, de], mask [B, H] -> (soft tokens [B, 2, dl], weights [B, H])."""
    query = query.astype(jnp.float32)
    history = history.astype(jnp.float32)
    mask = history_mask > 0
    scores = jnp.einsum('bd,bhd->bh', query, history)
    weights = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1) * mask
    projected = ProjectionMLP(self.llm_dim, self.dtype, name='align_mlp')(history)
    persona = jnp.einsum('bh,bhd->bd', weights, projected.astype(jnp.float32))
    v = param(self, 'inst_token', nn.initializers.normal(self.encoder_dim**-0.5),
              (self.encoder_dim,), jnp.float32, ('plug_in',))
    inst = ProjectionMLP(self.llm_dim, self.dtype, name='align_mlp_inst')(v[None])
    inst = jnp.broadcast_to(inst.astype(jnp.float32), persona.shape)
    soft = jnp.stack([inst * self.instruction_scale, persona * self.persona_scale], axis=1)
    return soft, weights


def persona_scale(config, embedding: Any) -> float:
  """config.plug.persona_scale if set, else the mean L2 norm of the backbone's token-embedding
  rows (about 540 for FlanT5-XXL, the reference's constant).

  `embedding` is the [vocab, d] table: the loaded (possibly sharded) params' or one read from
  disk; either way it is taken in `config.llm.param_dtype`, as training holds it, then summed
  in float32, so training and export agree.
  """
  if config.plug.persona_scale is not None and config.plug.persona_scale > 0:
    return float(config.plug.persona_scale)
  dtype = numerics.as_dtype(config.llm.param_dtype)
  norms = jax.jit(lambda t: jnp.linalg.norm(t.astype(dtype).astype(jnp.float32), axis=-1).mean())
  return float(norms(embedding))


def make_plug(config, encoder_dim: int, llm_config: backbone.LlmConfig,
              embedding: Any) -> PersonaPlug:
  """The plug for a backbone (any family), with `persona_scale(config, embedding)`."""
  scale = persona_scale(config, embedding)
  return PersonaPlug(encoder_dim, llm_config.d_model, float(scale),
                     float(scale) / config.plug.instruction_scale_divisor,
                     numerics.as_dtype(config.plug.dtype))


def personalised_inputs(llm: backbone.Model, llm_params: dict, soft: jax.Array | None,
                        input_ids: jax.Array, input_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[soft; Emb(x)] and its mask, which covers the soft tokens; soft=None gives Emb(x) alone."""
  embedded = backbone.embed(llm, llm_params, input_ids)
  if soft is None:
    return embedded, input_mask
  b = input_ids.shape[0]
  embedded = jnp.concatenate([soft.astype(embedded.dtype), embedded], axis=1)
  mask = jnp.concatenate([jnp.ones((b, soft.shape[1]), input_mask.dtype), input_mask], axis=1)
  return embedded, mask


def sequence_nll(llm: backbone.Model, llm_params: dict, embedded: jax.Array, mask: jax.Array,
                 target_ids: jax.Array, target_mask: jax.Array,
                 rngs: dict | None = None) -> jax.Array:
  """Mean token NLL of the targets after the input embeddings under the frozen backbone."""
  return backbone.target_nll(llm, llm_params, embedded, mask, target_ids, target_mask, rngs)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
