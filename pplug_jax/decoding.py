"""Jitted generation over the T5 decode cache: the whole loop runs on device.

The self-attention cache grows in stages (`cache_stages`): a step attends over, and beam search
reorders, a cache only as long as the current stage, so short outputs do not pay for
`max_new_tokens` of cache on every step. Each stage is its own `while_loop` with static shapes;
the loop stops as soon as every row is finished.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pplug_jax.models import t5 as t5_lib

FIRST_STAGE, STAGE_GROWTH = 32, 4


def cache_stages(max_new_tokens: int) -> list[int]:
  """Cache lengths of the decoding stages: 32, 128, 512, ... capped by max_new_tokens."""
  sizes, size = [], FIRST_STAGE
  while size < max_new_tokens:
    sizes.append(size)
    size *= STAGE_GROWTH
  return sizes + [max_new_tokens]


def _grow(cache: dict, length: int) -> dict:
  """The cache with its self-attention keys/values zero-padded to `length` positions."""
  out = {}
  for key, value in cache.items():
    if key.startswith('self') and value.shape[2] < length:
      value = jnp.pad(value, [(0, 0), (0, 0), (0, length - value.shape[2]), (0, 0), (0, 0)])
    out[key] = value
  return out


def greedy(llm: t5_lib.T5, llm_params: dict, embedded: jax.Array, mask: jax.Array,
           max_new_tokens: int) -> jax.Array:
  """Greedy tokens [B, max_new_tokens]; after EOS a row is padded with pad_token_id."""
  c = llm.config
  v = {'params': llm_params}
  b = embedded.shape[0]
  encoded = llm.apply(v, embedded, mask, method=t5_lib.T5.encode)
  stages = cache_stages(max_new_tokens)
  cache = t5_lib.init_cache(c, b, stages[0])
  start = jnp.full((b, 1), c.decoder_start_token_id, jnp.int32)
  # step 0 fills the cross-attention keys/values into the cache; later steps reuse them
  logits, cache = llm.apply(v, start, encoded, mask, cache, jnp.int32(0), method=t5_lib.T5.decode)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  tokens = jnp.full((b, max_new_tokens), c.pad_token_id, jnp.int32).at[:, 0].set(first)
  done = first == c.eos_token_id

  def body(carry):
    i, tokens, cache, done = carry
    prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
    logits, cache = llm.apply(v, prev, None, mask, cache, i, method=t5_lib.T5.decode)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, c.pad_token_id, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
    return i + 1, tokens, cache, done | (nxt == c.eos_token_id)

  carry = (jnp.int32(1), tokens, cache, done)
  for size in stages:
    cond = lambda carry, size=size: (carry[0] < size) & ~jnp.all(carry[3])
    carry = jax.lax.while_loop(cond, body, carry[:2] + (_grow(carry[2], size),) + carry[3:])
  return carry[1]


def _gather_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, N, ...], idx [B, M] -> [B, M, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(llm: t5_lib.T5, llm_params: dict, embedded: jax.Array, mask: jax.Array,
                max_new_tokens: int, num_beams: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> tuple[jax.Array, jax.Array]:
  """Beam search with Hugging Face's semantics (vectorised `generate`, num_return_sequences=1).

  Keeps 2*num_beams candidates a step; a candidate ending in EOS (or at the length limit) among
  the top num_beams is finished with score logp / generated_len**length_penalty; stopping
  follows HF's early-stopping heuristic. Cross-attention keys/values are computed once per
  input and shared by its beams. Returns (tokens [B, max_new_tokens] padded after EOS, scores [B]).
  """
  c = llm.config
  v = {'params': llm_params}
  b, nb, t = embedded.shape[0], num_beams, max_new_tokens
  k = 2 * nb
  neg = jnp.float32(-1.0e9)
  encoded = llm.apply(v, embedded, mask, method=t5_lib.T5.encode)
  stages = cache_stages(t)
  cache = t5_lib.init_cache(c, b * nb, stages[0])
  start = jnp.full((b * nb, 1), c.decoder_start_token_id, jnp.int32)
  logits, cache = llm.apply(v, start, encoded, mask, cache, jnp.int32(0), method=t5_lib.T5.decode)

  def select(i, logits, st):
    """One HF beam step given the logits for generated position i."""
    running, run_scores, fin, fin_scores, fin_flag, heur, _ = st
    logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    logp = logp.reshape(b, nb, vocab) + run_scores[:, :, None]
    top_lp, top_idx = jax.lax.top_k(logp.reshape(b, nb * vocab), k)
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seq = _gather_beams(running, parent)
    top_seq = jax.lax.dynamic_update_slice_in_dim(top_seq, token[:, :, None], i, axis=2)
    hits = (token == c.eos_token_id) | (i + 1 >= t)
    # the best unfinished candidates keep running
    run_lp = top_lp + hits.astype(jnp.float32) * neg
    _, keep = jax.lax.top_k(run_lp, nb)
    new_running = _gather_beams(top_seq, keep)
    new_run_scores = _gather_beams(run_lp, keep)
    new_parent = _gather_beams(parent, keep)
    # the top-num_beams candidates that just ended join the finished set
    just = hits & (jnp.arange(k) < nb)[None, :]
    score = top_lp / ((i + 1).astype(jnp.float32) ** length_penalty)
    full = jnp.all(fin_flag, axis=-1, keepdims=True) & (early_stopping is True)
    score = score + full * neg + (~heur) * neg + (~just) * neg
    merged = jnp.concatenate([fin_scores, score], axis=1)
    _, best = jax.lax.top_k(merged, nb)
    fin = _gather_beams(jnp.concatenate([fin, top_seq], axis=1), best)
    fin_scores = _gather_beams(merged, best)
    fin_flag = _gather_beams(jnp.concatenate([fin_flag, just], axis=1), best)
    # can a running beam still beat the worst finished one?
    best_len = jnp.float32(t) if (early_stopping == 'never' and length_penalty > 0) else \
        (i + 1).astype(jnp.float32)
    best_possible = new_run_scores[:, :1] / best_len**length_penalty
    worst = jnp.where(fin_flag, jnp.min(fin_scores, axis=1, keepdims=True), neg)
    heur = heur & jnp.any(best_possible > worst, axis=-1, keepdims=True)
    go = jnp.any(heur) & ~(jnp.all(fin_flag) & (early_stopping is True)) & ~jnp.all(hits)
    return (new_running, new_run_scores, fin, fin_scores, fin_flag, heur, go), new_parent

  pad = jnp.full((b, nb, t), c.pad_token_id, jnp.int32)
  init = (pad, jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(neg), pad,
          jnp.full((b, nb), neg), jnp.zeros((b, nb), bool), jnp.ones((b, 1), bool), True)

  def reorder(cache, parent):
    flat = (jnp.arange(b)[:, None] * nb + parent).reshape(-1)
    return {key: (jnp.take(val, flat, axis=1) if key.startswith('self') else val)
            for key, val in cache.items()}

  st, parent = select(jnp.int32(0), logits, init)
  cache = reorder(cache, parent)

  def body(carry):
    i, st, cache = carry
    prev = jax.lax.dynamic_slice_in_dim(st[0], i - 1, 1, axis=2).reshape(b * nb, 1)
    logits, cache = llm.apply(v, prev, None, mask, cache, i, method=t5_lib.T5.decode)
    st, parent = select(i, logits, st)
    return i + 1, st, reorder(cache, parent)

  i = jnp.int32(1)
  for size in stages:
    cond = lambda carry, size=size: (carry[0] < size) & carry[1][-1]
    i, st, cache = jax.lax.while_loop(cond, body, (i, st, _grow(cache, size)))
  tokens, scores = st[2][:, 0], st[3][:, 0]
  # after the first EOS, pad (HF fills the tail with its own filler)
  after_eos = jnp.cumsum(tokens == c.eos_token_id, axis=1) - (tokens == c.eos_token_id) > 0
  return jnp.where(after_eos, c.pad_token_id, tokens), scores
