"""Jitted generation over the T5 decode cache: the whole loop runs on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pplug_jax.models import t5 as t5_lib


def greedy(llm: t5_lib.T5, llm_params: dict, embedded: jax.Array, mask: jax.Array,
           max_new_tokens: int) -> jax.Array:
  """Greedy tokens [B, max_new_tokens]; after EOS a row is padded with pad_token_id."""
  c = llm.config
  v = {'params': llm_params}
  b = embedded.shape[0]
  encoded = llm.apply(v, embedded, mask, method=t5_lib.T5.encode)
  cache = t5_lib.init_cache(c, b, max_new_tokens)
  start = jnp.full((b, 1), c.decoder_start_token_id, jnp.int32)
  # step 0 fills the cross-attention keys/values into the cache; later steps reuse them
  logits, cache = llm.apply(v, start, encoded, mask, cache, jnp.int32(0), method=t5_lib.T5.decode)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  tokens = jnp.full((b, max_new_tokens), c.pad_token_id, jnp.int32).at[:, 0].set(first)
  done = first == c.eos_token_id

  def cond(carry):
    i, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tokens, cache, done = carry
    prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
    logits, cache = llm.apply(v, prev, None, mask, cache, i, method=t5_lib.T5.decode)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, c.pad_token_id, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
    return i + 1, tokens, cache, done | (nxt == c.eos_token_id)

  _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, done))
  return tokens
