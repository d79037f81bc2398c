"""Decoder-only LMs (Llama, Qwen2, Qwen3) against transformers' PyTorch models, same weights."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import LLAMA3_ROPE, save_tiny_decoder
from pplug_jax.models import decoder, hf_weights

VARIANTS = {
    'llama_gqa': dict(model_type='llama'),
    'llama3_tied': dict(model_type='llama', tied=True, rope=LLAMA3_ROPE),
    'qwen2': dict(model_type='qwen2'),
    'qwen3': dict(model_type='qwen3', kv_heads=1),
}


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  out = {}
  for i, (name, kw) in enumerate(VARIANTS.items()):
    path = str(tmp_path_factory.mktemp(name))
    ref = save_tiny_decoder(path, seed=i, **kw)
    config, params = hf_weights.load_decoder(path)
    out[name] = (path, ref, config, params)
  return out


def _hf_logits(ref, emb):
  with torch.no_grad():
    return ref(inputs_embeds=torch.tensor(emb)).logits.numpy()


@pytest.mark.parametrize('name', list(VARIANTS))
def test_logits_match_transformers(models, name):
  path, ref, config, params = models[name]
  emb = np.random.RandomState(0).normal(size=(3, 40, config.hidden_size)).astype(np.float32)
  ours = decoder.CausalLM(config).apply({'params': params}, jnp.asarray(emb),
                                        jnp.ones((3, 40), jnp.int32))
  diff = np.abs(np.asarray(ours) - _hf_logits(ref, emb)).max()
  assert diff < 1e-4, diff


def test_the_family_features_come_from_config_json(models):
  assert models['llama_gqa'][2].num_kv_heads == 2 and not models['llama_gqa'][2].qkv_bias
  assert models['llama3_tied'][2].tie_word_embeddings
  assert 'logits_dense' not in models['llama3_tied'][3]
  assert models['qwen2'][2].qkv_bias and 'bias' in models['qwen2'][3]['layers']['layers_0'][
      'attention']['key']
  assert models['qwen3'][2].qk_norm and not models['qwen3'][2].qkv_bias
  # Llama 3 frequency scaling equals transformers' own inverse frequencies (and is not default)
  _, ref, config, _ = models['llama3_tied']
  want = ref.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(decoder.rope_frequencies(config), want, rtol=1e-6)
  plain = decoder.rope_frequencies(dataclasses.replace(config, rope_type='default'))
  assert np.abs(plain - want).max() > 1e-3


def test_scanned_and_rematerialised_layers_give_the_same_logits(models):
  path, ref, config, params = models['qwen2']
  emb = np.random.RandomState(1).normal(size=(2, 9, config.hidden_size)).astype(np.float32)
  mask = jnp.ones((2, 9), jnp.int32)
  want = decoder.CausalLM(config).apply({'params': params}, jnp.asarray(emb), mask)
  sconf, sparams = hf_weights.load_decoder(path, scan_layers=True, remat_policy='full')
  assert sparams['layers']['layers']['attention']['query']['kernel'].shape[0] == 2
  got = decoder.CausalLM(sconf).apply({'params': sparams}, jnp.asarray(emb), mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _prompts(seed, config, lengths=(5, 2, 7), targets=(3, 6, 1)):
  rng = np.random.RandomState(seed)
  soft = rng.normal(size=(len(lengths), 2, config.hidden_size)).astype(np.float32)
  prompts = [rng.randint(3, config.vocab_size, size=n) for n in lengths]
  outs = [rng.randint(3, config.vocab_size, size=n) for n in targets]
  return soft, prompts, outs


def _padded(rows, length):
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


@pytest.mark.parametrize('name', list(VARIANTS))
def test_target_loss_matches_transformers_labels(models, name):
  """[soft; prompt; target] with labels -100 on soft and prompt: HF's loss, row by row (each
  row alone, no padding) summed, equals ours over the padded batch."""
  path, ref, config, params = models[name]
  soft, prompts, outs = _prompts(3, config)
  model = decoder.CausalLM(config)
  table = ref.get_input_embeddings()
  nll_sum, count = 0.0, 0
  for s, p, t in zip(soft, prompts, outs):
    with torch.no_grad():
      emb = torch.cat([torch.tensor(s), table(torch.tensor(p)), table(torch.tensor(t))])[None]
      labels = torch.tensor([-100] * (2 + len(p)) + list(t))[None]
      loss = ref(inputs_embeds=emb, labels=labels).loss.item()
    nll_sum, count = nll_sum + loss * len(t), count + len(t)
  pid, pmask = _padded(prompts, 9)
  tid, tmask = _padded(outs, 8)

  def ours(params, soft, pid, pmask, tid, tmask):
    emb = model.apply({'params': params}, pid, method=decoder.CausalLM.embed)
    prefix = jnp.concatenate([soft, emb], axis=1)
    pm = jnp.concatenate([jnp.ones((soft.shape[0], 2), jnp.int32), pmask], axis=1)
    logits = model.apply({'params': params}, prefix, pm, tid, tmask,
                         method=decoder.CausalLM.target_logits)
    return decoder.token_nll(logits, tid, tmask)

  got = float(jax.jit(ours)(params, soft, pid, pmask, tid, tmask))
  assert abs(got - nll_sum / count) < 1e-5, (got, nll_sum / count)


def test_padding_never_shifts_a_row(models):
  """Each row of a padded batch has the logits it has alone."""
  path, ref, config, params = models['llama_gqa']
  model = decoder.CausalLM(config)
  soft, prompts, outs = _prompts(4, config)
  pid, pmask = _padded(prompts, 9)
  tid, tmask = _padded(outs, 8)
  fn = jax.jit(lambda p, s, a, b, c, d: model.apply(
      {'params': p}, jnp.concatenate([s, model.apply({'params': p}, a, method=model.embed)], 1),
      jnp.concatenate([jnp.ones((s.shape[0], 2), jnp.int32), b], 1), c, d,
      method=decoder.CausalLM.target_logits))
  batch = np.asarray(fn(params, soft, pid, pmask, tid, tmask))
  for i, (p, t) in enumerate(zip(prompts, outs)):
    alone = np.asarray(fn(params, soft[i:i + 1], p[None].astype(np.int32),
                          np.ones((1, len(p)), np.int32), t[None].astype(np.int32),
                          np.ones((1, len(t)), np.int32)))
    np.testing.assert_allclose(batch[i, :len(t)], alone[0], atol=2e-5)


def test_a_sharded_index_directory_loads(models, tmp_path):
  path, ref, config, params = models['llama_gqa']
  ref.save_pretrained(str(tmp_path), max_shard_size='20KB')
  files = os.listdir(tmp_path)
  assert 'model.safetensors.index.json' in files
  assert sum(f.endswith('.safetensors') for f in files) > 1
  _, sharded = hf_weights.load_decoder(str(tmp_path))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_unsupported_model_type_is_refused_naming_the_supported_ones(models, tmp_path):
  path = models['llama_gqa'][0]
  hf = json.load(open(os.path.join(path, 'config.json')))
  hf['model_type'] = 'mistral'
  with pytest.raises(decoder.UnsupportedModelError, match='llama, qwen2, qwen3'):
    decoder.DecoderConfig.from_hf(hf, source='x/config.json')
  hf.update(model_type='llama', rope_parameters={'rope_type': 'yarn', 'factor': 4.0})
  with pytest.raises(decoder.UnsupportedModelError, match="rope type 'yarn'"):
    decoder.DecoderConfig.from_hf(hf)


@pytest.mark.parametrize('name', ['llama_gqa', 'qwen2', 'qwen3'])
def test_save_decoder_writes_a_directory_transformers_loads_with_the_same_logits(models, name,
                                                                                tmp_path):
  """hf_weights.save_decoder (the demo's writer, no torch) -> transformers' *ForCausalLM."""
  import transformers
  _, _, config, params = models[name]
  perturbed = jax.tree.map(lambda x: x + 0.01, params)  # not the fixture's own weights
  hf_weights.save_decoder(str(tmp_path), config, perturbed)
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(ref).__name__ == {'llama_gqa': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                                'qwen3': 'Qwen3ForCausalLM'}[name]
  emb = np.random.RandomState(1).normal(size=(2, 24, config.hidden_size)).astype(np.float32)
  ours = decoder.CausalLM(config).apply({'params': perturbed}, jnp.asarray(emb),
                                        jnp.ones((2, 24), jnp.int32))
  assert np.abs(np.asarray(ours) - _hf_logits(ref, emb)).max() < 1e-4
  again, loaded = hf_weights.load_decoder(str(tmp_path))
  assert again == config
  jax.tree.map(np.testing.assert_array_equal, loaded, perturbed)
