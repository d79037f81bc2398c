"""The one interface the system sees of its frozen LLM, whichever family it is.

- T5 (encoder-decoder): the input embeddings [I; P; Emb(x)] go to the encoder, the target is
  decoded against them.
- Decoder-only (Llama, Qwen2, Qwen3): the sequence is [I; P; Emb(prompt); Emb(target)], loss on
  the target tokens only; generation prefills [I; P; prompt] and returns only new tokens.

Everything above the models (system, generation, baselines, inference, export, the planner)
calls these functions and never a family's module directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from pplug_jax.models import decoder as decoder_lib
from pplug_jax.models import t5 as t5_lib
from pplug_jax.models.layers import NEG_INF

Model = t5_lib.T5 | decoder_lib.CausalLM
LlmConfig = t5_lib.T5Config | decoder_lib.DecoderConfig
FAMILIES = ('t5', *decoder_lib.SUPPORTED_MODEL_TYPES)


def family(model_or_config: Model | LlmConfig) -> str:
  """'t5', 'llama', 'qwen2' or 'qwen3'."""
  c = getattr(model_or_config, 'config', model_or_config)
  return 't5' if isinstance(c, t5_lib.T5Config) else c.model_type


def is_decoder_only(model_or_config: Model | LlmConfig) -> bool:
  return family(model_or_config) != 't5'


def make_model(config: LlmConfig) -> Model:
  """The Linen module of a backbone config."""
  return t5_lib.T5(config) if isinstance(config, t5_lib.T5Config) else \
      decoder_lib.CausalLM(config)


def embed(llm: Model, llm_params: dict, ids: jax.Array) -> jax.Array:
  """Token ids [B, S] -> the backbone's input embeddings [B, S, d]."""
  return llm.apply({'params': llm_params}, ids, method=type(llm).embed)


def embedding_table(llm_params: dict) -> jax.Array:
  """The [vocab, d] token-embedding table (the persona scale's source), for every family."""
  return llm_params['token_embedder']['embedding']


def target_nll(llm: Model, llm_params: dict, embedded: jax.Array, mask: jax.Array,
               target_ids: jax.Array, target_mask: jax.Array,
               rngs: dict | None = None) -> jax.Array:
  """Mean NLL of the target tokens after the input embeddings; rngs: the LLM's dropout."""
  v = {'params': llm_params}
  if isinstance(llm, t5_lib.T5):
    dec_in = t5_lib.shift_right(target_ids, llm.config.decoder_start_token_id)
    logits = llm.apply(v, embedded, mask, dec_in, rngs=rngs)
    return t5_lib.token_nll(logits, target_ids, target_mask)
  logits = llm.apply(v, embedded, mask, target_ids, target_mask, rngs=rngs,
                     method=decoder_lib.CausalLM.target_logits)
  return decoder_lib.token_nll(logits, target_ids, target_mask)


def eos_ids(config: LlmConfig) -> tuple[int, ...]:
  """Every id that ends generation."""
  return tuple(getattr(config, 'eos_token_ids', (config.eos_token_id,)))


def fill_id(config: LlmConfig) -> int:
  """The id that pads a generated row after its EOS."""
  return getattr(config, 'fill_token_id', getattr(config, 'pad_token_id', 0))


class DecodeCache(NamedTuple):
  """A search's cache: `per_row` [L, N, S, ...] follows its beam (reordered on axis 1, grown on
  axis 2); `shared` is per input and read by all its beams (T5's cross-attention K/V, a
  decoder's prefix K/V and mask)."""
  per_row: dict[str, jax.Array]
  shared: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Stepper:
  """What a backbone gives the searches in `decoding.py`.

  start(rows_per_input, cache_length) -> (logits [B * rows, vocab] for generated token 0,
  cache); step(tokens [N, 1], cache, i) feeds generated token i - 1 and returns the logits for
  token i and the cache.
  """
  start: Callable[[int, int], tuple[jax.Array, DecodeCache]]
  step: Callable[[jax.Array, DecodeCache, jax.Array], tuple[jax.Array, DecodeCache]]
  eos_ids: tuple[int, ...]
  fill_id: int


def grow(cache: DecodeCache, length: int) -> DecodeCache:
  """The cache with its per-row keys/values zero-padded to `length` positions."""
  def pad(x):
    if x.shape[2] >= length:
      return x
    return jnp.pad(x, [(0, 0), (0, 0), (0, length - x.shape[2])] + [(0, 0)] * (x.ndim - 3))
  return DecodeCache({k: pad(x) for k, x in cache.per_row.items()}, cache.shared)


def reorder(cache: DecodeCache, rows: jax.Array) -> DecodeCache:
  """The per-row part taken from rows `rows` [N] (beam search's parents)."""
  return DecodeCache({k: jnp.take(x, rows, axis=1) for k, x in cache.per_row.items()},
                     cache.shared)


def _t5_stepper(llm: t5_lib.T5, llm_params: dict, embedded: jax.Array,
                mask: jax.Array) -> Stepper:
  v = {'params': llm_params}
  c = llm.config

  def start(rows, length):
    b = embedded.shape[0]
    encoded = llm.apply(v, embedded, mask, method=t5_lib.T5.encode)
    cache = t5_lib.init_cache(c, b * rows, length)
    first = jnp.full((b * rows, 1), c.decoder_start_token_id, jnp.int32)
    # step 0 fills the cross-attention keys/values, which every later step (and beam) reuses
    logits, cache = llm.apply(v, first, encoded, mask, cache, jnp.int32(0),
                              method=t5_lib.T5.decode)
    return logits[:, -1], _split_t5(cache)

  def step(tokens, cache, i):
    logits, new = llm.apply(v, tokens, None, mask, {**cache.per_row, **cache.shared}, i,
                            method=t5_lib.T5.decode)
    return logits[:, -1], DecodeCache({k: new[k] for k in t5_lib.SELF_ATTENTION_CACHE},
                                      cache.shared)

  return Stepper(start, step, (c.eos_token_id,), c.pad_token_id)


def _split_t5(cache: dict) -> DecodeCache:
  per_row = t5_lib.SELF_ATTENTION_CACHE
  return DecodeCache({k: x for k, x in cache.items() if k in per_row},
                     {k: x for k, x in cache.items() if k not in per_row})


def _decoder_stepper(llm: decoder_lib.CausalLM, llm_params: dict, embedded: jax.Array,
                     mask: jax.Array) -> Stepper:
  v = {'params': llm_params}
  c = llm.config

  def start(rows, length):
    b = embedded.shape[0]
    logits, kv = llm.apply(v, embedded, mask, method=decoder_lib.CausalLM.prefill)
    shape = (c.num_layers, b * rows, length, c.num_kv_heads, c.head_dim)
    per_row = {'k': jnp.zeros(shape, kv['k'].dtype), 'v': jnp.zeros(shape, kv['v'].dtype)}
    shared = {'prefix_k': kv['k'], 'prefix_v': kv['v'],
              'prefix_bias': jnp.where(mask > 0, 0.0, NEG_INF)[:, None, :],
              'length': jnp.sum(mask > 0, axis=1).astype(jnp.int32)}
    return jnp.repeat(logits, rows, axis=0), DecodeCache(per_row, shared)

  def step(tokens, cache, i):
    n, s = tokens.shape[0], cache.per_row['k'].shape[2]
    lengths = cache.shared['length']
    positions = jnp.repeat(lengths, n // lengths.shape[0])[:, None] + (i - 1)
    step_bias = jnp.where(jnp.arange(s) <= i - 1, 0.0, NEG_INF)[None, None, :]
    layer_cache = {'prefix_k': cache.shared['prefix_k'], 'prefix_v': cache.shared['prefix_v'],
                   **cache.per_row}
    logits, kv = llm.apply(v, tokens, positions, layer_cache, cache.shared['prefix_bias'],
                           step_bias, i - 1, method=decoder_lib.CausalLM.decode_step)
    return logits, DecodeCache(kv, cache.shared)

  return Stepper(start, step, c.eos_token_ids, c.fill_token_id)


def stepper(llm: Model, llm_params: dict, embedded: jax.Array, mask: jax.Array) -> Stepper:
  """The search interface of a backbone for one batch of input embeddings [B, S, d] + mask."""
  if isinstance(llm, t5_lib.T5):
    return _t5_stepper(llm, llm_params, embedded, mask)
  return _decoder_stepper(llm, llm_params, embedded, mask)
