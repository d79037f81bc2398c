"""Decoder-only greedy and beam search vs transformers' generate(inputs_embeds=...), row by row.

Our batch holds prefixes of different lengths (right-padded); each row must give the tokens HF
gives for that row alone, so padding never shifts positions and never leaks into attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import LLAMA3_ROPE, save_tiny_decoder
from pplug_jax import decoding
from pplug_jax.models import decoder, hf_weights

MAX_NEW = 10
LENGTHS = (6, 3, 9, 1)
EOS = 2


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  out = []
  for seed, kw in enumerate([dict(model_type='llama', rope=LLAMA3_ROPE),
                             dict(model_type='qwen2', tied=True),
                             dict(model_type='qwen3', kv_heads=1)]):
    path = str(tmp_path_factory.mktemp(f'dec{seed}'))
    ref = save_tiny_decoder(path, seed=seed, eos_boost=3.0, eos_token_id=EOS, **kw)
    config, params = hf_weights.load_decoder(path)
    out.append((ref, decoder.CausalLM(config), params))
  return out


def _inputs(seed, d=32):
  rng = np.random.RandomState(seed)
  emb = rng.normal(size=(len(LENGTHS), max(LENGTHS), d)).astype(np.float32)
  mask = np.zeros(emb.shape[:2], np.int32)
  for i, n in enumerate(LENGTHS):
    mask[i, :n] = 1
    emb[i, n:] = 100.0  # garbage under the padding must not matter
  return emb, mask


def _until_eos(row):
  row = list(row)
  return row[:row.index(EOS) + 1] if EOS in row else row


def _hf_rows(ref, emb, **kw):
  """HF generate on each row alone (no padding at all); only new tokens come back."""
  out = []
  for i, n in enumerate(LENGTHS):
    with torch.no_grad():
      seq = ref.generate(inputs_embeds=torch.tensor(emb[i:i + 1, :n]),
                         attention_mask=torch.ones((1, n), dtype=torch.long),
                         max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0, **kw)
    out.append(_until_eos(seq[0].numpy()))
  return out


def test_greedy_matches_transformers_row_by_row(models):
  ended_early = 0
  for i, (ref, model, params) in enumerate(models):
    emb, mask = _inputs(i)
    tokens = jax.jit(lambda p, e, m: decoding.greedy(model, p, e, m, MAX_NEW))(
        params, jnp.asarray(emb), jnp.asarray(mask))
    ours = [_until_eos(r) for r in np.asarray(tokens)]
    assert ours == _hf_rows(ref, emb, num_beams=1), i
    ended_early += sum(len(r) < MAX_NEW for r in ours)
  assert ended_early > 0  # EOS inside the horizon was exercised


@pytest.mark.parametrize('num_beams,length_penalty,early_stopping',
                         [(4, 1.0, False), (3, 0.6, True)])
def test_beam_search_matches_transformers_row_by_row(models, num_beams, length_penalty,
                                                     early_stopping):
  ended_early = 0
  for i, (ref, model, params) in enumerate(models):
    emb, mask = _inputs(10 + i)
    tokens, scores = jax.jit(lambda p, e, m: decoding.beam_search(
        model, p, e, m, MAX_NEW, num_beams, length_penalty, early_stopping))(
            params, jnp.asarray(emb), jnp.asarray(mask))
    ours = [_until_eos(r) for r in np.asarray(tokens)]
    want = _hf_rows(ref, emb, num_beams=num_beams, length_penalty=length_penalty,
                    early_stopping=early_stopping)
    assert ours == want, (i, ours, want)
    assert np.isfinite(np.asarray(scores)).all()
    ended_early += sum(len(r) < MAX_NEW for r in ours)
  assert ended_early > 0


def test_a_cache_grown_in_stages_decodes_the_same(models, monkeypatch):
  monkeypatch.setattr(decoding, 'FIRST_STAGE', 3)
  monkeypatch.setattr(decoding, 'STAGE_GROWTH', 2)
  assert decoding.cache_stages(MAX_NEW) == [3, 6, MAX_NEW]
  ref, model, params = models[0]
  emb, mask = _inputs(20)
  greedy = jax.jit(lambda p, e, m: decoding.greedy(model, p, e, m, MAX_NEW))(
      params, jnp.asarray(emb), jnp.asarray(mask))
  ours = [_until_eos(r) for r in np.asarray(greedy)]
  assert ours == _hf_rows(ref, emb, num_beams=1)
  assert max(len(r) for r in ours) > 6  # the last stage was reached
  tokens, _ = jax.jit(lambda p, e, m: decoding.beam_search(model, p, e, m, MAX_NEW, 4))(
      params, jnp.asarray(emb), jnp.asarray(mask))
  assert [_until_eos(r) for r in np.asarray(tokens)] == _hf_rows(ref, emb, num_beams=4)
