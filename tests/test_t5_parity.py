"""Flax T5 vs transformers' PyTorch T5 on the same weights (fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pplug_jax.models import hf_weights, t5

TOL = 1e-4


def _batch(seed=0, vocab=96):
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, vocab, (3, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids = ids * mask  # padded with 0 like a tokenizer
  targets = rng.randint(2, vocab, (3, 6))
  tmask = np.ones_like(targets)
  tmask[2, 4:] = 0
  return ids, mask, targets, tmask


def _valid_rows(a, mask):
  return a[mask.astype(bool)]


@pytest.mark.parametrize('version', ['v1.1', 'v1.0'])
def test_encoder_logits_and_nll_match_transformers(tiny_t5, version):
  path, ref = tiny_t5[version]
  config, params = hf_weights.load_t5(path)
  assert config.gated == (version == 'v1.1')
  assert config.tie_word_embeddings == (version == 'v1.0')
  model = t5.T5(config)
  ids, mask, targets, tmask = _batch()
  labels = np.where(tmask > 0, targets, -100)
  with torch.no_grad():
    ref_enc = ref.encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ref_out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  labels=torch.tensor(labels))
  v = {'params': params}
  emb = model.apply(v, jnp.asarray(ids), method=t5.T5.embed)
  enc = model.apply(v, emb, jnp.asarray(mask), method=t5.T5.encode)
  diff_enc = np.abs(_valid_rows(np.asarray(enc), mask) -
                    _valid_rows(ref_enc.last_hidden_state.numpy(), mask)).max()
  assert diff_enc <= TOL, diff_enc
  logits = model.apply(v, emb, jnp.asarray(mask), t5.shift_right(jnp.asarray(targets), 0))
  diff_logits = np.abs(np.asarray(logits) - ref_out.logits.numpy())[tmask.astype(bool)].max()
  assert diff_logits <= TOL, diff_logits
  nll = float(t5.token_nll(logits, jnp.asarray(targets), jnp.asarray(tmask)))
  assert abs(nll - float(ref_out.loss)) <= TOL
  assert 0 < nll < 20


@pytest.mark.parametrize('version', ['v1.1', 'v1.0'])
def test_nll_from_given_input_embeddings(tiny_t5, version):
  """The plug's path: arbitrary input embeddings (not table rows) with a padding mask."""
  path, ref = tiny_t5[version]
  config, params = hf_weights.load_t5(path)
  ids, mask, targets, tmask = _batch(seed=1)
  embeds = np.random.RandomState(2).normal(size=(3, 9, config.d_model)).astype(np.float32) * 3
  labels = np.where(tmask > 0, targets, -100)
  with torch.no_grad():
    ref_out = ref(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask),
                  labels=torch.tensor(labels))
  logits = t5.T5(config).apply({'params': params}, jnp.asarray(embeds), jnp.asarray(mask),
                               t5.shift_right(jnp.asarray(targets), 0))
  diff = np.abs(np.asarray(logits) - ref_out.logits.numpy())[tmask.astype(bool)].max()
  assert diff <= TOL, diff
  nll = float(t5.token_nll(logits, jnp.asarray(targets), jnp.asarray(tmask)))
  assert abs(nll - float(ref_out.loss)) <= TOL


def test_bf16_compute_stays_close(tiny_t5):
  """bf16 weights and compute: logits within 0.1 absolute and NLL within 1% of fp32."""
  path, _ = tiny_t5['v1.1']
  ids, mask, targets, tmask = _batch(seed=3)
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    config, params = hf_weights.load_t5(path, dtype=dtype)
    assert params['encoder']['layers_0']['mlp']['wo']['kernel'].dtype == dtype
    config = dataclasses.replace(config, dtype=dtype)
    model = t5.T5(config)
    v = {'params': params}
    emb = model.apply(v, jnp.asarray(ids), method=t5.T5.embed)
    logits = model.apply(v, emb, jnp.asarray(mask), t5.shift_right(jnp.asarray(targets), 0))
    assert logits.dtype == jnp.float32
    results[dtype] = (np.asarray(logits), float(t5.token_nll(logits, jnp.asarray(targets),
                                                             jnp.asarray(tmask))))
  (l32, n32), (l16, n16) = results[jnp.float32], results[jnp.bfloat16]
  assert np.abs(l32 - l16).max() < 0.1
  assert abs(n32 - n16) / n32 < 0.01
  assert np.abs(l32 - l16).max() > 0  # bf16 really ran


@pytest.mark.parametrize('version', ['v1.1', 'v1.0'])
def test_cached_decoding_equals_full_decoder(tiny_t5, version):
  path, _ = tiny_t5[version]
  config, params = hf_weights.load_t5(path)
  model = t5.T5(config)
  v = {'params': params}
  ids, mask, targets, _ = _batch(seed=4)
  emb = model.apply(v, jnp.asarray(ids), method=t5.T5.embed)
  enc = model.apply(v, emb, jnp.asarray(mask), method=t5.T5.encode)
  dec_in = t5.shift_right(jnp.asarray(targets), 0)
  full, _ = model.apply(v, dec_in, enc, jnp.asarray(mask), method=t5.T5.decode)
  t_max = dec_in.shape[1] + 2
  cache = t5.init_cache(config, dec_in.shape[0], t_max)
  steps = []
  for i in range(dec_in.shape[1]):
    # step 0 has no cross keys in the cache yet; later steps read them from it
    logits, cache = model.apply(v, dec_in[:, i:i + 1], None if i else enc, jnp.asarray(mask),
                                cache, jnp.asarray(i), method=t5.T5.decode)
    steps.append(np.asarray(logits[:, 0]))
  assert 'cross_k' in cache and cache['cross_k'].shape[2] == ids.shape[1]
  diff = np.abs(np.stack(steps, 1) - np.asarray(full)).max()
  assert diff <= TOL, diff


@pytest.mark.parametrize('overrides', [dict(scan_layers=True),
                                       dict(remat_policy='full'),
                                       dict(scan_layers=True, remat_policy='dots_with_no_batch_dims')])
def test_scan_and_remat_give_same_logits_and_grads(tiny_t5, overrides):
  path, _ = tiny_t5['v1.1']
  base_cfg, base_params = hf_weights.load_t5(path)
  cfg, params = hf_weights.load_t5(path, **overrides)
  if cfg.scan_layers:
    assert params['encoder']['layers']['attention']['query']['kernel'].shape[0] == 2
    assert params['decoder']['layers']['mlp']['wo']['kernel'].shape[0] == 3
  ids, mask, targets, tmask = _batch(seed=5)
  out = []
  for c, p in ((base_cfg, base_params), (cfg, params)):
    model = t5.T5(c)
    emb = model.apply({'params': p}, jnp.asarray(ids), method=t5.T5.embed)

    def loss(e, p=p, model=model):
      lg = model.apply({'params': p}, e, jnp.asarray(mask), t5.shift_right(jnp.asarray(targets), 0))
      return t5.token_nll(lg, jnp.asarray(targets), jnp.asarray(tmask))

    out.append(jax.jit(jax.value_and_grad(loss))(emb))
  assert abs(float(out[0][0]) - float(out[1][0])) <= 1e-5
  np.testing.assert_allclose(np.asarray(out[0][1]), np.asarray(out[1][1]), atol=1e-5)
