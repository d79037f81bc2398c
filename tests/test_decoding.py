"""Greedy and beam search vs transformers' generate, token for token, from input embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import save_tiny_t5
from pplug_jax import decoding
from pplug_jax.models import hf_weights, t5

MAX_NEW = 12


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  out = []
  for seed in (0, 1, 2):
    path = str(tmp_path_factory.mktemp(f'gen{seed}'))
    # transformers' generate cache assumes as many decoder as encoder layers
    ref = save_tiny_t5(path, 'v1.1', seed=seed, eos_boost=4.0, num_decoder_layers=2)
    config, params = hf_weights.load_t5(path)
    out.append((ref, t5.T5(config), params))
  return out


def _inputs(seed, d_model=32):
  rng = np.random.RandomState(seed)
  emb = rng.normal(size=(5, 10, d_model)).astype(np.float32)
  mask = np.ones((5, 10), np.int64)
  mask[1, 6:] = 0
  mask[3, 2:] = 0
  return emb, mask


def _until_eos(rows, eos=1):
  """Token lists up to and including the first EOS (HF and we pad the tail differently)."""
  out = []
  for r in rows:
    r = list(r)
    out.append(r[:r.index(eos) + 1] if eos in r else r)
  return out


def _hf(ref, emb, mask, **kw):
  with torch.no_grad():
    seq = ref.generate(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(mask),
                       max_new_tokens=MAX_NEW, do_sample=False, **kw)
  return _until_eos(seq[:, 1:].numpy())  # drop the decoder start token


def test_greedy_matches_transformers(models):
  ended_early = 0
  for i, (ref, model, params) in enumerate(models):
    emb, mask = _inputs(i)
    ours = jax.jit(lambda p, e, m: decoding.greedy(model, p, e, m, MAX_NEW))(
        params, jnp.asarray(emb), jnp.asarray(mask))
    ours = _until_eos(np.asarray(ours))
    assert ours == _hf(ref, emb, mask, num_beams=1)
    ended_early += sum(len(r) < MAX_NEW for r in ours)
  assert ended_early > 0  # EOS inside the horizon was exercised


@pytest.mark.parametrize('num_beams,length_penalty,early_stopping',
                         [(4, 1.0, False), (3, 0.6, True), (4, 2.0, 'never')])
def test_beam_search_matches_transformers(models, num_beams, length_penalty, early_stopping):
  ended_early = 0
  for i, (ref, model, params) in enumerate(models):
    emb, mask = _inputs(10 + i)
    fn = jax.jit(lambda p, e, m: decoding.beam_search(model, p, e, m, MAX_NEW, num_beams,
                                                      length_penalty, early_stopping))
    tokens, scores = fn(params, jnp.asarray(emb), jnp.asarray(mask))
    ours = _until_eos(np.asarray(tokens))
    want = _hf(ref, emb, mask, num_beams=num_beams, length_penalty=length_penalty,
               early_stopping=early_stopping)
    assert ours == want, (ours, want)
    ended_early += sum(len(r) < MAX_NEW for r in ours)
    assert np.isfinite(np.asarray(scores)).all()
  assert ended_early > 0


def test_a_cache_grown_in_stages_decodes_the_same(models, monkeypatch):
  """Stages of 4, 8, 12 cache positions (instead of 32, 128, ...) give HF's tokens too, with
  rows that run past the first stages."""
  monkeypatch.setattr(decoding, 'FIRST_STAGE', 4)
  monkeypatch.setattr(decoding, 'STAGE_GROWTH', 2)
  assert decoding.cache_stages(MAX_NEW) == [4, 8, 12]
  longest = 0
  for i, (ref, model, params) in enumerate(models):
    emb, mask = _inputs(20 + i)
    greedy = jax.jit(lambda p, e, m: decoding.greedy(model, p, e, m, MAX_NEW))(
        params, jnp.asarray(emb), jnp.asarray(mask))
    assert _until_eos(np.asarray(greedy)) == _hf(ref, emb, mask, num_beams=1)
    tokens, _ = jax.jit(lambda p, e, m: decoding.beam_search(model, p, e, m, MAX_NEW, 4))(
        params, jnp.asarray(emb), jnp.asarray(mask))
    ours = _until_eos(np.asarray(tokens))
    assert ours == _hf(ref, emb, mask, num_beams=4, length_penalty=1.0, early_stopping=False)
    longest = max(longest, max(len(r) for r in ours))
  assert longest > 8  # the last stage was reached


def test_over_host_rows_runs_every_row_once_in_one_shape_and_keeps_the_order():
  from pplug_jax import generation, partitioning
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  rules = (('batch', 'data'),)
  seen_shapes = []

  def fn(a, b):
    seen_shapes.append(a.shape)
    return a * 10 + b[:, :1]

  a = np.arange(13 * 2).reshape(13, 2)
  b = np.arange(13 * 3).reshape(13, 3) + 1000
  got = generation.over_host_rows(fn, (a, b), 4, mesh, rules)
  np.testing.assert_array_equal(got, a * 10 + b[:, :1])  # 13 rows in order, the top-up cut
  assert seen_shapes == [(4, 2)] * 4  # ceil(13 / 4) calls, all of one shape
  with pytest.raises(ValueError, match='no rows'):
    generation.over_host_rows(fn, (a[:0], b[:0]), 4, mesh, rules)
