"""The `reference` preset's rows against the official behaviour (transformers, HF Trainer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import lamp as lamp_config
from pplug_jax import decoding, system as system_lib, validation
from pplug_jax.data import lamp
from pplug_jax.models import hf_weights, t5

LIMIT = 90  # of the tiny model's 96 rows


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def test_preset_changes_exactly_the_fidelity_rows_to_the_official_values():
  """Against the official code's values (README "Fidelity to the official code"; rucliujn/PPlug),
  not the preset's own source: every key `reference` changes, and nothing else."""
  import json
  plain = lamp_config.get_config('task=2,size=xxl')
  ref = lamp_config.get_config('task=2,size=xxl,reference')
  a, b = _flat(json.loads(plain.to_json())), _flat(json.loads(ref.to_json()))
  changed = {k: b.get(k) for k in set(a) | set(b) if a.get(k) != b.get(k)}
  assert changed == {
      'plug.persona_scale': 539.9738,         # 1: FlanT5-XXL's norm, for every backbone
      'llm.vocab_limit': -1,                  # 2: len(tokenizer) + 2 rows
      'data.query_source': 'truncated_input',  # 3: the query from the cut LLM input,
      'data.query_max_length': 256 + 20,      #    BGE's limit at input + 20 (max input 256)
      'encoder.query_prefix': 'Represent this sentence for searching relevant passages:',
      'data.history_order': 'file',           # 4: his_id[-512:]
      'encoder.mode': 'finetune',             # 6: the query-side BGE trains
      'llm.dropout_rate': 0.1, 'encoder.dropout_rate': 0.1,  # 7
      'optim.decay_mask': 'hf',               # 8: HF Trainer's decay parameters
      'data.augment_fixed': True}             # 9: copies made once
  assert a['data.max_input_length'] == 256
  validation.check_config(ref, num_devices=1, process_count=1)


def test_vocab_limit_equals_transformers_after_resize_token_embeddings(tiny_t5):
  path, ref = tiny_t5['v1.1']
  config, params = hf_weights.load_t5(path, vocab_limit=LIMIT)
  model = t5.T5(config)
  import copy
  resized = copy.deepcopy(ref).eval()
  resized.resize_token_embeddings(LIMIT)
  # Under the official code's transformers 4 the untied head is cut to its first rows too;
  # transformers 5 re-ties it to the embedding instead, so the cut head is put back by hand.
  resized.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight[:LIMIT].detach().clone())
  assert resized.get_input_embeddings().weight.shape[0] == LIMIT
  rng = np.random.RandomState(0)
  ids = rng.randint(2, LIMIT, (2, 7))
  targets = rng.randint(2, LIMIT, (2, 5))
  with torch.no_grad():
    out = resized(input_ids=torch.tensor(ids), labels=torch.tensor(targets))
  assert out.logits.shape[-1] == LIMIT
  emb = model.apply({'params': params}, jnp.asarray(ids), method=t5.T5.embed)
  mask = jnp.ones(ids.shape, jnp.int32)
  logits = np.asarray(model.apply({'params': params}, emb, mask,
                                  t5.shift_right(jnp.asarray(targets), 0)))
  np.testing.assert_allclose(logits[..., :LIMIT], out.logits.numpy(), atol=1e-4)
  assert (logits[..., LIMIT:] <= -1e8).all()
  nll = float(t5.token_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.ones(targets.shape)))
  assert abs(nll - float(out.loss)) <= 1e-4
  # greedy decoding matches argmax decoding of the resized torch model (transformers 5's
  # generate fails on this model's unequal encoder/decoder depths, so the loop is written here)
  dec = torch.zeros((2, 1), dtype=torch.long)
  with torch.no_grad():
    for _ in range(6):
      step = resized(input_ids=torch.tensor(ids), decoder_input_ids=dec).logits[:, -1]
      dec = torch.cat([dec, step.argmax(-1, keepdim=True)], axis=1)
  want = dec.numpy()[:, 1:]
  got = np.asarray(decoding.greedy(model, params, emb, mask, 6))
  for row_want, row_got in zip(want, got):
    end = list(row_want).index(1) + 1 if 1 in row_want else len(row_want)  # up to </s>
    np.testing.assert_array_equal(row_got[:end], row_want[:end])
  beams, _ = decoding.beam_search(model, params, emb, mask, 6, 3)
  assert np.asarray(beams).max() < LIMIT


def test_vocab_limit_minus_one_is_the_tokenizer_plus_two_placeholders():
  c = lamp_config.get_config('demo')
  c.llm.vocab_limit = -1
  from pplug_jax import tokenizers
  assert system_lib.vocab_limit(c) == len(tokenizers.llm_tokenizer(c)) + 2
  c.llm.vocab_limit = 0
  assert system_lib.vocab_limit(c) == 0


def test_hf_decay_mask_matches_the_trainers_decay_parameters(tiny_bert):
  """Row 8: the same parameters decay as under HF Trainer (no biases, no LayerNorm weights)."""
  from flax import traverse_util
  from transformers import Trainer
  path, torch_model = tiny_bert
  bconf, params = hf_weights.load_bert(path)
  decayed_hf = set(Trainer.get_decay_parameter_names(None, torch_model))
  mapping = hf_weights._bert_mapping(bconf, '')
  mask = traverse_util.flatten_dict(system_lib.hf_decay_mask(params))
  ours = {mapping[k][0] for k, decays in mask.items() if decays and k in mapping}
  theirs = {n for n in decayed_hf if n in {v[0] for v in mapping.values()}}
  assert ours == theirs and len(ours) > 5
  plug = {'inst_token': 0, 'align_mlp': {'fc1': {'kernel': 0, 'bias': 0}}}
  assert system_lib.hf_decay_mask(plug) == {'inst_token': True,
                                            'align_mlp': {'fc1': {'kernel': True, 'bias': False}}}


def test_decay_mask_changes_the_update_of_biases_only(tiny_t5):
  c = lamp_config.get_config('demo')
  c.optim.weight_decay = 0.5
  params = {'w': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  out = {}
  for mask in ('all', 'hf'):
    c.optim.decay_mask = mask
    tx, _ = system_lib.build_optimizer(c, 10)
    state = tx.init(params)
    for _ in range(2):  # the schedule's first learning rate is 0
      updates, state = tx.update(zero, state, params)
    out[mask] = updates
  assert float(out['all']['w']['bias'][0]) < 0 and float(out['hf']['w']['bias'][0]) == 0.0
  assert float(out['hf']['w']['kernel'][0, 0]) == float(out['all']['w']['kernel'][0, 0]) < 0


def test_history_order_file_keeps_the_last_items_of_the_file():
  items = [lamp.ProfileItem(str(i), f't{i}', d) for i, d in
           enumerate(['2020-05-01', '2019-01-01', '2021-01-01', '2018-01-01'])]
  assert [i.id for i in lamp.recent_history(items, 2, 'file')] == ['2', '3']
  assert [i.id for i in lamp.recent_history(items, 2, 'date')] == ['0', '2']


def test_fixed_augmentation_repeats_its_copies_and_each_drops_an_item(tmp_path, minilm_path):
  """Row 9: copies made once (the same every epoch), each with at least one item dropped."""
  import collections
  import itertools
  from pplug_jax import precompute
  from pplug_jax.data import pipeline, synthetic
  synthetic.generate(str(tmp_path / 'lamp'), 'LaMP_2', users={'train': 8, 'dev': 2, 'test': 1},
                     seed=2, empty_frac=0.0, long_frac=0.0, mean_items=6)
  c = lamp_config.get_config('demo')
  c.data.lamp_dir, c.data.records_dir = str(tmp_path / 'lamp'), str(tmp_path / 'rec')
  c.encoder.path, c.data.num_shards = str(minilm_path), 1
  c.data.augment_copies, c.data.shuffle_buffer = 4, 1  # no shuffling: clean epoch boundaries
  precompute.run(c)

  def epochs(fixed):
    c.data.augment_fixed = fixed
    n = pipeline.num_train_examples(c, c.data.records_dir)
    rows = list(itertools.islice(pipeline.train_batches(c, c.data.records_dir, 1), 2 * n))
    out = []
    for part in (rows[:n], rows[n:]):
      seen = collections.defaultdict(list)
      for b in part:
        seen[b['id'][0].decode()].append((int(b['history_mask'].sum()),
                                          round(float(b['history'].sum()), 4)))
      out.append({k: sorted(v) for k, v in seen.items()})
    return out

  first, second = epochs(True)
  assert first == second  # the same copies come back
  for copies in first.values():
    full = max(length for length, _ in copies)
    if len(copies) > 1:  # histories with > 2 items: the original and 4 copies
      assert len(copies) == 5
      assert sum(length < full for length, _ in copies) == 4  # every copy dropped >= 1 item
  first, second = epochs(False)
  assert first != second  # redrawn every pass


def test_query_from_the_truncated_input_as_the_official_code(tmp_path, minilm_path):
  """Row 3: decode(encode(input)[:max_input_len][:-1]), the official marker rule, no space after
  the prefix's colon, and the encoder's limit at max_input_len + 20."""
  import json
  import tensorflow as tf
  from pplug_jax import precompute, tokenizers
  from pplug_jax.data import records, synthetic
  synthetic.generate(str(tmp_path / 'lamp'), 'LaMP_2', users={'train': 3, 'dev': 4, 'test': 1},
                     seed=4, empty_frac=0.0, long_frac=0.0, mean_items=3)
  c = lamp_config.get_config('demo,reference')
  c.data.lamp_dir, c.data.records_dir = str(tmp_path / 'lamp'), str(tmp_path / 'rec')
  c.encoder.path, c.data.num_shards = str(minilm_path), 1
  c.encoder.mode = 'frozen'
  c.encoder.query_prefix = 'Represent this sentence for searching relevant passages:'
  c.data.max_input_length = 200  # ByT5: 199 bytes of the ~200-byte prompts survive
  c.data.query_max_length = 220
  meta = precompute.run(c)
  assert meta['fingerprint']['query_source'] == 'truncated_input'
  parse = records.parse_fn(meta['fingerprint']['dim'], meta['fingerprint']['embedding_dtype'])
  recs = {r['id'].decode(): r for r in tf.data.TFRecordDataset(
      records.split_shards(c.data.records_dir, 'dev')).map(parse).as_numpy_iterator()}
  bert_tok = tokenizers.load_tokenizer(str(minilm_path))
  with open(tmp_path / 'lamp' / 'LaMP_2' / 'dev_questions.json') as f:
    questions = json.load(f)
  cut_some = False
  for q in questions:
    text = q['input'].encode()[:199].decode()  # 200 byte tokens, minus the last one
    cut_some |= text != q['input']
    marker = 'description: '
    query = text[text.find(marker) + len(marker):]
    want = bert_tok([c.encoder.query_prefix + query], truncation=True,
                    max_length=220)['input_ids'][0]
    assert list(recs[q['id']]['query_encoder_ids']) == want
  assert cut_some
  assert lamp.official_query('LaMP_3', 'no marker at all') == 'er at all'  # find() == -1: [7:]
  assert lamp.official_query('LaMP_1', 'the title "Deep nets", which ref') == 'Deep nets'


# ------------------------------------------------------------------ row 7: dropout

def test_dropout_layer_drops_the_rate_and_rescales():
  from flax import linen as nn
  from pplug_jax.models.layers import dropout

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x):
      return dropout(self, x, 0.1)

  x = jnp.ones((200_000,))
  y = np.asarray(Drop().apply({}, x, rngs={'dropout': jax.random.PRNGKey(3)}))
  assert abs((y == 0).mean() - 0.1) < 0.005
  np.testing.assert_allclose(y[y != 0], 1 / 0.9, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(Drop().apply({}, x)), np.asarray(x))  # no rng


def test_t5_dropout_off_without_rng_and_with_rate_zero(tiny_t5):
  path, _ = tiny_t5['v1.1']
  config, params = hf_weights.load_t5(path)
  rng = np.random.RandomState(1)
  emb = jnp.asarray(rng.normal(size=(2, 6, config.d_model)).astype(np.float32))
  mask = jnp.ones((2, 6), jnp.int32)
  dec = jnp.asarray(rng.randint(2, 90, (2, 4)))
  plain = np.asarray(t5.T5(config).apply({'params': params}, emb, mask, dec))
  drop = t5.T5(dataclasses.replace(config, dropout_rate=0.1))
  key = {'dropout': jax.random.PRNGKey(0)}
  np.testing.assert_array_equal(np.asarray(drop.apply({'params': params}, emb, mask, dec)), plain)
  np.testing.assert_array_equal(
      np.asarray(t5.T5(config).apply({'params': params}, emb, mask, dec, rngs=key)), plain)
  a = np.asarray(drop.apply({'params': params}, emb, mask, dec, rngs=key))
  b = np.asarray(drop.apply({'params': params}, emb, mask, dec, rngs=key))
  np.testing.assert_array_equal(a, b)  # a fixed key, a fixed result
  assert np.abs(a - plain).max() > 1e-3  # and it does drop
  scanned = dataclasses.replace(config, dropout_rate=0.1, scan_layers=True, remat_policy='full')
  _, sparams = hf_weights.load_t5(path, scan_layers=True)
  s = np.asarray(t5.T5(scanned).apply({'params': sparams}, emb, mask, dec, rngs=key))
  assert np.isfinite(s).all() and np.abs(s - plain).max() > 1e-3


def test_train_step_dropout_is_seeded_by_step_so_a_resume_repeats_it(tiny_t5):
  from pplug_jax import partitioning
  c = lamp_config.get_config('demo')
  c.llm.path = tiny_t5['v1.1'][0]
  c.llm.dropout_rate = 0.1
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  system = system_lib.load_system(c, 12, mesh)
  assert system.uses_dropout
  rng = np.random.RandomState(0)
  batch = {'query_embedding': rng.normal(size=(1, 2, 12)), 'history': rng.normal(size=(1, 2, 3, 12)),
           'history_mask': np.ones((1, 2, 3)), 'input_ids': rng.randint(2, 90, (1, 2, 5)),
           'input_mask': np.ones((1, 2, 5)), 'target_ids': rng.randint(2, 90, (1, 2, 3)),
           'target_mask': np.ones((1, 2, 3))}
  batch = {k: jnp.asarray(v, jnp.float32 if k in ('query_embedding', 'history') else jnp.int32)
           for k, v in batch.items()}
  tx, _ = system_lib.build_optimizer(c, 10)
  params = system.init_trainable(0)
  state0 = {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params)}
  step = jax.jit(system_lib.make_train_step(system, tx, seed=0))
  s1, m1 = step(state0, system.llm_params, batch)
  straight, m2 = step(s1, system.llm_params, batch)
  again = jax.jit(system_lib.make_train_step(system, tx, seed=0))  # a resumed process
  resumed, m2b = again(jax.tree.map(jnp.array, s1), system.llm_params, batch)
  assert float(m2['loss']) == float(m2b['loss'])
  jax.tree.map(np.testing.assert_array_equal, straight['params'], resumed['params'])
  assert float(m1['loss']) != float(m2['loss'])  # steps draw different masks
  other, m_other = jax.jit(system_lib.make_train_step(system, tx, seed=1))(s1, system.llm_params,
                                                                            batch)
  assert float(m_other['loss']) != float(m2['loss'])  # the seed decides them


def test_fine_tuned_encoder_exports_as_a_transformers_directory(minilm_path, tmp_path):
  """Row 6's export: transformers loads the trained BERT and computes what ours computes."""
  from transformers import AutoModel, AutoTokenizer
  from pplug_jax.models import bert
  config, params = hf_weights.load_bert(str(minilm_path))
  noise = jax.random.split(jax.random.PRNGKey(0), len(jax.tree.leaves(params)))
  trained = jax.tree.unflatten(jax.tree.structure(params), [
      np.asarray(p) + 0.01 * np.asarray(jax.random.normal(k, p.shape))
      for p, k in zip(jax.tree.leaves(params), noise)])
  out = tmp_path / 'query_encoder'
  hf_weights.save_bert(str(out), str(minilm_path), config, trained)
  tok = AutoTokenizer.from_pretrained(str(out))
  enc = tok(['a robot crew on a starship', 'love letters'], padding=True, return_tensors='pt')
  with torch.no_grad():
    want = AutoModel.from_pretrained(str(out)).eval()(**enc).last_hidden_state.numpy()
  got = np.asarray(bert.Bert(config).apply({'params': trained}, jnp.asarray(enc['input_ids']),
                                           jnp.asarray(enc['attention_mask'])))
  m = enc['attention_mask'].numpy().astype(bool)
  np.testing.assert_allclose(got[m], want[m], atol=2e-4)
  original = AutoModel.from_pretrained(str(minilm_path))
  assert not np.allclose(original.embeddings.word_embeddings.weight.detach().numpy(),
                         np.asarray(trained['word_embeddings']['embedding']))
