"""Flax BERT vs transformers' PyTorch BertModel with the same pooling."""

import jax.numpy as jnp
import numpy as np
import torch

from pplug_jax.models import bert, hf_weights


def _torch_pool(hidden, mask, pooling, normalize):
  if pooling == 'cls':
    out = hidden[:, 0]
  else:
    m = mask.unsqueeze(-1).float()
    out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _cosines(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return (a * b).sum(-1)


def test_tiny_bert_hidden_states_and_pooling(tiny_bert):
  path, ref = tiny_bert
  rng = np.random.RandomState(0)
  ids = rng.randint(1, 120, (3, 11))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 2:] = 0
  with torch.no_grad():
    hidden_ref = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  for pooling in ('cls', 'mean'):
    config, params = hf_weights.load_bert(path, pooling=pooling, normalize=True)
    model = bert.Bert(config)
    hidden = model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask))
    diff = np.abs(np.asarray(hidden) - hidden_ref.numpy())[mask.astype(bool)].max()
    assert diff <= 1e-4, diff
    pooled = model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask),
                         method=bert.Bert.embed_text)
    pooled_ref = _torch_pool(hidden_ref, torch.tensor(mask), pooling, True).numpy()
    assert _cosines(np.asarray(pooled), pooled_ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pooled), axis=-1), 1.0, atol=1e-5)


def test_real_minilm_on_real_sentences(minilm_path):
  from transformers import AutoTokenizer, BertModel
  sentences = [
      'A man is eating food.',
      'The new movie is awesome, everyone in the theatre laughed.',
      'Represent this sentence for searching relevant passages: quantum error correction',
      'Persona embeddings summarise a user history into one vector.',
      'ok',
  ]
  tok = AutoTokenizer.from_pretrained(minilm_path)
  enc = tok(sentences, padding=True, return_tensors='np')
  config, params = hf_weights.load_bert(minilm_path)
  assert config.pooling == 'mean' and config.normalize  # from the sentence-transformers files
  ours = bert.Bert(config).apply({'params': params}, jnp.asarray(enc['input_ids']),
                                 jnp.asarray(enc['attention_mask']), method=bert.Bert.embed_text)
  ref = BertModel.from_pretrained(minilm_path).eval()
  with torch.no_grad():
    hidden = ref(input_ids=torch.tensor(enc['input_ids']),
                 attention_mask=torch.tensor(enc['attention_mask'])).last_hidden_state
  ref_emb = _torch_pool(hidden, torch.tensor(enc['attention_mask']), 'mean', True).numpy()
  cos = _cosines(np.asarray(ours), ref_emb)
  assert cos.min() >= 0.9999, cos
  # the model is real: paraphrase-free sentences are not collapsed onto one vector
  sims = np.asarray(ours) @ np.asarray(ours).T
  assert sims[0, 1] < 0.5
