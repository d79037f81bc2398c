"""The persona plug: attention-pooled user history -> persona token, plus an instruction token.

    w_k = softmax_k(q . h_k) over real items      (q, h_k: normalised encoder embeddings)
    P   = persona_scale * sum_k w_k Proj(h_k)     Proj: Linear(de->dl) -> GELU -> Linear(dl->dl)
    I   = persona_scale / inst_divisor * MLP_I(v) v: a learned vector in encoder space
    X   = [I; P; Emb(x)]                          the frozen LLM's input embeddings (T5's
                                                  encoder; a decoder-only LM's prefix)

A user with no history gets P = 0 (the reference returns NaN there).

Variants (README "Ablations and variants"; each default is the paper's PPlug, bit for bit):
  pooling='mean'           w_k = 1/n over the real items (the paper's ablation)
  instruction=False        no I: one soft token per persona
  num_persona_tokens=K     q_j = q + o_j (o_j learned, zero at init), each attends over the
                           history: K personas P_1..P_K, prepended after I
  time_decay='learned'     scores q . h_k - lambda * age_k; age_k = the newest item's date minus
                           item k's, in days; lambda = softplus(raw) >= 0, starting at
                           time_decay_init
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

NUM_SOFT_TOKENS = 2  # the default plug's [I; P]
POOLINGS = ('attention', 'mean')
TIME_DECAYS = ('none', 'learned')
# The plug settings of config.plug that shape the module, and their defaults (today's PPlug);
# an export records them, and one made before them holds none: it gets these.
VARIANT_DEFAULTS = {'pooling': 'attention', 'instruction': True, 'num_persona_tokens': 1,
                    'time_decay': 'none', 'time_decay_init': 1e-3}


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
  """Maps (query embedding, history embeddings[, item ages]) to the soft tokens [I; P_1..P_K]."""
  encoder_dim: int
  llm_dim: int
  persona_scale: float
  instruction_scale: float
  dtype: Any = jnp.float32
  pooling: str = 'attention'
  instruction: bool = True
  num_persona_tokens: int = 1
  time_decay: str = 'none'
  time_decay_init: float = 1e-3

  @property
  def num_soft_tokens(self) -> int:
    """Soft tokens prepended to the input: the instruction token (if any) and K personas."""
    return int(self.instruction) + self.num_persona_tokens

  @property
  def uses_dates(self) -> bool:
    """Whether the plug needs `history_age` (time-aware pooling)."""
    return self.time_decay == 'learned'

  @nn.compact
  def __call__(self, query: jax.Array, history: jax.Array, history_mask: jax.Array,
               history_age: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """query [B, de], history [B, H, de], mask [B, H], age [B, H] (days; time decay only)
    -> (soft tokens [B, num_soft_tokens, dl], weights [B, H], averaged over the K personas)."""
    if self.pooling not in POOLINGS or self.time_decay not in TIME_DECAYS or \
        self.num_persona_tokens < 1 or (self.pooling == 'mean' and self.num_persona_tokens > 1):
      raise ValueError(f'PersonaPlug: pooling={self.pooling!r} (use {POOLINGS}), time_decay='
                       f'{self.time_decay!r} (use {TIME_DECAYS}), num_persona_tokens='
                       f'{self.num_persona_tokens} (>= 1; 1 with mean pooling).')
    query = query.astype(jnp.float32)
    history = history.astype(jnp.float32)
    mask = history_mask > 0
    k = self.num_persona_tokens
    # inst_token first: the module's own params draw init keys in order, so every variant's
    # inst_token (and the default's whole tree) starts as today's.
    v = param(self, 'inst_token', nn.initializers.normal(self.encoder_dim**-0.5),
              (self.encoder_dim,), jnp.float32, ('plug_in',)) if self.instruction else None
    if self.pooling == 'mean':  # the query does not matter: softmax of equal scores
      scores = jnp.zeros(mask.shape, jnp.float32)
    elif k == 1:
      scores = jnp.einsum('bd,bhd->bh', query, history)
    else:  # [B, K, H]: one input-conditioned query per persona token
      offsets = param(self, 'persona_offsets', nn.initializers.zeros, (k, self.encoder_dim),
                      jnp.float32, (None, 'plug_in'))
      scores = jnp.einsum('bkd,bhd->bkh', query[:, None] + offsets[None], history)
    if self.uses_dates:
      if history_age is None:
        raise ValueError("PersonaPlug(time_decay='learned') needs history_age [B, H].")
      raw = param(self, 'time_decay_raw', nn.initializers.constant(
          _softplus_inverse(self.time_decay_init)), (), jnp.float32, ())
      decay = jax.nn.softplus(raw) * history_age.astype(jnp.float32)
      scores = scores - (decay[:, None] if scores.ndim == 3 else decay)
    bmask = mask[:, None] if scores.ndim == 3 else mask
    weights = jax.nn.softmax(jnp.where(bmask, scores, NEG_INF), axis=-1) * bmask
    projected = ProjectionMLP(self.llm_dim, self.dtype, name='align_mlp')(history)
    if scores.ndim == 3:
      personas = jnp.einsum('bkh,bhd->bkd', weights, projected.astype(jnp.float32))
      weights = weights.mean(axis=1)
    else:
      personas = jnp.einsum('bh,bhd->bd', weights, projected.astype(jnp.float32))[:, None]
    tokens = [personas * self.persona_scale]
    if self.instruction:
      inst = ProjectionMLP(self.llm_dim, self.dtype, name='align_mlp_inst')(v[None])
      inst = jnp.broadcast_to(inst.astype(jnp.float32), personas[:, 0].shape)
      tokens.insert(0, (inst * self.instruction_scale)[:, None])
    if k == 1 and self.instruction:  # today's [I; P], built as it always was (bit-exact)
      soft = jnp.stack([tokens[0][:, 0], tokens[1][:, 0]], axis=1)
    else:
      soft = jnp.concatenate(tokens, axis=1)
    return soft, weights


def _softplus_inverse(y: float) -> float:
  """raw with softplus(raw) = y (y > 0); y = 0 gives a raw far below 0 (lambda ~ 1e-30)."""
  if y <= 0:
    return -69.0
  return float(y + np.log(-np.expm1(-y)))


def variant_settings(plug_config: Any) -> dict[str, Any]:
  """The module-shaping plug settings of config.plug (or an export's record), with defaults
  for the keys a config or export made before them lacks."""
  get = plug_config.get if hasattr(plug_config, 'get') else lambda k, d: getattr(plug_config, k, d)
  out = {k: get(k, d) for k, d in VARIANT_DEFAULTS.items()}
  out['instruction'] = bool(out['instruction'])
  out['num_persona_tokens'] = int(out['num_persona_tokens'])
  out['time_decay_init'] = float(out['time_decay_init'])
  return out


def num_soft_tokens(plug_config: Any) -> int:
  """Soft tokens the plug of `plug_config` (config.plug or an export's record) prepends."""
  s = variant_settings(plug_config)
  return int(s['instruction']) + s['num_persona_tokens']


def build_plug(plug_config: Any, encoder_dim: int, llm_dim: int, persona_scale_: float,
               instruction_scale: float, dtype: Any = jnp.float32) -> PersonaPlug:
  """The plug of config.plug or of an export's recorded settings: the one constructor that
  training, planning and inference share."""
  return PersonaPlug(encoder_dim, llm_dim, float(persona_scale_), float(instruction_scale),
                     dtype, **variant_settings(plug_config))


def persona_scale(config, embedding: Any) -> float:
  """config.plug.persona_scale if set, else the mean L2 norm of the backbone's token-embedding
  rows (about 540 for FlanT5-XXL, the reference's constant).

  `embedding` is the [vocab, d] table: the loaded (possibly sharded) params' or one read from
  disk; either way it is taken in `config.llm.param_dtype`, as training holds it, then summed
  in float32, so training and export agree.
  """
  if config.plug.persona_scale is not None and config.plug.persona_scale > 0:
    return float(config.plug.persona_scale)
  if isinstance(embedding, jax.ShapeDtypeStruct):  # the planner's abstract weights: no values
    return 1.0
  dtype = numerics.as_dtype(config.llm.param_dtype)
  norms = jax.jit(lambda t: jnp.linalg.norm(t.astype(dtype).astype(jnp.float32), axis=-1).mean())
  return float(norms(embedding))


def make_plug(config, encoder_dim: int, llm_config: backbone.LlmConfig,
              embedding: Any) -> PersonaPlug:
  """The plug for a backbone (any family), with `persona_scale(config, embedding)`."""
  scale = persona_scale(config, embedding)
  return build_plug(config.plug, encoder_dim, llm_config.d_model, float(scale),
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
