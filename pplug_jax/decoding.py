"""Jitted greedy and beam search over any backbone's cached decode: the loop runs on device.

The backbone supplies a `backbone.Stepper` (start: the first logits and the cache; step: one
token per row), so T5 and the decoder-only families share one search, with Hugging Face's
semantics. The per-row cache grows in stages (`cache_stages`): a step attends over, and beam
search reorders, a cache only as long as the current stage, so short outputs do not pay for
`max_new_tokens` of cache on every step. Each stage is its own `while_loop` with static shapes;
the loop stops as soon as every row is finished.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pplug_jax.models import backbone

FIRST_STAGE, STAGE_GROWTH = 32, 4


def cache_stages(max_new_tokens: int) -> list[int]:
  """Cache lengths of the decoding stages: 32, 128, 512, ... capped by max_new_tokens."""
  sizes, size = [], FIRST_STAGE
  while size < max_new_tokens:
    sizes.append(size)
    size *= STAGE_GROWTH
  return sizes + [max_new_tokens]


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def greedy(llm: backbone.Model, llm_params: dict, embedded: jax.Array, mask: jax.Array,
           max_new_tokens: int) -> jax.Array:
  """Greedy tokens [B, max_new_tokens] after the input embeddings; after EOS, the fill id."""
  return greedy_search(backbone.stepper(llm, llm_params, embedded, mask), max_new_tokens)


def greedy_search(s: backbone.Stepper, max_new_tokens: int) -> jax.Array:
  """Greedy decoding of one Stepper."""
  stages = cache_stages(max_new_tokens)
  logits, cache = s.start(1, stages[0])
  b = logits.shape[0]
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  tokens = jnp.full((b, max_new_tokens), s.fill_id, jnp.int32).at[:, 0].set(first)
  done = _is_eos(first, s.eos_ids)

  def body(carry):
    i, tokens, cache, done = carry
    prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
    logits, cache = s.step(prev, cache, i)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, s.fill_id, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
    return i + 1, tokens, cache, done | _is_eos(nxt, s.eos_ids)

  carry = (jnp.int32(1), tokens, cache, done)
  for size in stages:
    cond = lambda carry, size=size: (carry[0] < size) & ~jnp.all(carry[3])
    carry = jax.lax.while_loop(cond, body,
                               carry[:2] + (backbone.grow(carry[2], size),) + carry[3:])
  return carry[1]


def _gather_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, N, ...], idx [B, M] -> [B, M, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(llm: backbone.Model, llm_params: dict, embedded: jax.Array, mask: jax.Array,
                max_new_tokens: int, num_beams: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> tuple[jax.Array, jax.Array]:
  """Beam search with Hugging Face's semantics; see `beam_search_steps`."""
  return beam_search_steps(backbone.stepper(llm, llm_params, embedded, mask), max_new_tokens,
                           num_beams, length_penalty, early_stopping)


def beam_search_steps(s: backbone.Stepper, max_new_tokens: int, num_beams: int,
                      length_penalty: float = 1.0,
                      early_stopping: bool | str = False) -> tuple[jax.Array, jax.Array]:
  """Beam search with Hugging Face's semantics (vectorised `generate`, num_return_sequences=1).

  Keeps 2*num_beams candidates a step; a candidate ending in EOS (or at the length limit) among
  the top num_beams is finished with score logp / generated_len**length_penalty; stopping
  follows HF's early-stopping heuristic. Cross-attention (T5) or prefix (decoder-only)
  keys/values are computed once per input and shared by its beams. Returns (tokens [B, max_new_tokens] padded after EOS, scores [B]).
  """
  nb, t = num_beams, max_new_tokens
  k = 2 * nb
  neg = jnp.float32(-1.0e9)
  stages = cache_stages(t)
  logits, cache = s.start(nb, stages[0])
  b = logits.shape[0] // nb

  def select(i, logits, st):
    """One HF beam step given the logits for generated position i."""
    running, run_scores, fin, fin_scores, fin_flag, heur, _ = st
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    logp = logp.reshape(b, nb, vocab) + run_scores[:, :, None]
    top_lp, top_idx = jax.lax.top_k(logp.reshape(b, nb * vocab), k)
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seq = _gather_beams(running, parent)
    top_seq = jax.lax.dynamic_update_slice_in_dim(top_seq, token[:, :, None], i, axis=2)
    hits = _is_eos(token, s.eos_ids) | (i + 1 >= t)
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

  pad = jnp.full((b, nb, t), s.fill_id, jnp.int32)
  init = (pad, jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(neg), pad,
          jnp.full((b, nb), neg), jnp.zeros((b, nb), bool), jnp.ones((b, 1), bool), True)

  def reorder(cache, parent):
    return backbone.reorder(cache, (jnp.arange(b)[:, None] * nb + parent).reshape(-1))

  st, parent = select(jnp.int32(0), logits, init)
  cache = reorder(cache, parent)

  def body(carry):
    i, st, cache = carry
    prev = jax.lax.dynamic_slice_in_dim(st[0], i - 1, 1, axis=2).reshape(b * nb, 1)
    logits, cache = s.step(prev, cache, i)
    st, parent = select(i, logits, st)
    return i + 1, st, reorder(cache, parent)

  i = jnp.int32(1)
  for size in stages:
    cond = lambda carry, size=size: (carry[0] < size) & carry[1][-1]
    i, st, cache = jax.lax.while_loop(cond, body, (i, st, backbone.grow(cache, size)))
  tokens, scores = st[2][:, 0], st[3][:, 0]
  # after the first EOS, pad (HF fills the tail with its own filler)
  eos = _is_eos(tokens, s.eos_ids)
  after_eos = jnp.cumsum(eos, axis=1) - eos > 0
  return jnp.where(after_eos, s.fill_id, tokens), scores
