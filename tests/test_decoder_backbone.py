"""A decoder-only backbone through the system: records, train and evaluate end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import lamp as lamp_config
from hf_fixtures import CHAT_TEMPLATE, save_byte_bpe_tokenizer, save_tiny_decoder
from pplug_jax import evaluate, tokenizers, train
from pplug_jax.data import lamp, synthetic
from pplug_jax.errors import UserError
from pplug_jax.models import backbone
from pplug_jax import system as system_lib

USERS = {'train': 24, 'dev': 8, 'test': 4}


@pytest.fixture(scope='module')
def lamp_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('declamp')
  synthetic.generate(str(tmp / 'lamp'), 'LaMP_2', users=USERS, seed=3, empty_frac=0.1,
                     long_frac=0.0, mean_items=6)
  return str(tmp / 'lamp')


def _corpus(lamp_dir):
  texts = []
  for split in ('train', 'dev'):
    for ex in lamp.load_split(lamp_dir, 'LaMP_2', split):
      texts += [ex.input, ex.output or '']
  return texts


@pytest.fixture(scope='module')
def tiny_llama(tmp_path_factory, lamp_dir):
  path = str(tmp_path_factory.mktemp('llama'))
  ref = save_tiny_decoder(path, 'llama', vocab_size=320, eos_token_id=2)
  save_byte_bpe_tokenizer(path, _corpus(lamp_dir), chat_template=CHAT_TEMPLATE)
  return path, ref


def _config(tmp, lamp_dir, llm_path, minilm_path):
  c = lamp_config.get_config('demo')
  c.demo = False
  c.demo_compare = False
  c.data.lamp_dir = lamp_dir
  c.encoder.path = str(minilm_path)
  c.llm.path = llm_path
  c.llm.tokenizer = ''
  c.llm.name = 'tiny-llama'
  c.data.max_input_length = 96
  c.data.max_target_length = 8
  c.data.max_history = 16
  c.optim.max_steps = 6
  c.optim.batch_size = 8
  c.train.eval_every = 6
  c.train.checkpoint_every = 6
  c.train.eval_batch_size = 8
  return c


def test_prompt_and_target_encoding_follow_the_decoder_only_format(tiny_llama):
  path, _ = tiny_llama
  tok = tokenizers.load_tokenizer(path)
  enc = tokenizers.LlmEncoding(tok, decoder_only=True)
  prompt = enc.input_ids('Which tag fits this movie?', 64)
  assert prompt[0] == tok.bos_token_id == 1 and tok.eos_token_id not in prompt
  target = enc.target_ids('comedy', 8)
  assert target == tok('comedy', add_special_tokens=False)['input_ids'] + [2]
  assert len(enc.target_ids('comedy ' * 20, 8)) == 8 and enc.target_ids('comedy ' * 20, 8)[-1] == 2
  chat = tokenizers.LlmEncoding(tok, decoder_only=True, chat_template=True)
  text = tok.decode(chat.input_ids('Which tag?', 64))
  assert text == '<|user|>Which tag?\n<|assistant|>'
  long = chat.input_ids('comedy ' * 200, 40)
  assert len(long) <= 40 and tok.decode(long).endswith('\n<|assistant|>')


def test_bad_tokenizers_are_refused_with_one_line(tiny_llama, tmp_path):
  path, _ = tiny_llama
  tok = tokenizers.load_tokenizer(path)
  tok.chat_template = None
  with pytest.raises(UserError, match='no chat template'):
    tokenizers.LlmEncoding(tok, decoder_only=True, chat_template=True, source=path)
  save_byte_bpe_tokenizer(str(tmp_path), ['some text here'], eos=False)
  with pytest.raises(UserError, match='no EOS token'):
    tokenizers.LlmEncoding(tokenizers.load_tokenizer(str(tmp_path)), decoder_only=True)


def test_the_loss_is_hf_on_soft_prompt_target_with_labels_only_on_the_target(tiny_llama):
  """system's loss path (personalised_inputs + sequence_nll) vs HF on one row."""
  from pplug_jax.models import plug as plug_lib
  path, ref = tiny_llama
  from pplug_jax.models import hf_weights
  config, params = hf_weights.load_decoder(path)
  llm = backbone.make_model(config)
  rng = np.random.RandomState(0)
  soft = rng.normal(size=(1, 2, 32)).astype(np.float32)
  prompt, target = [1, 40, 41, 42], [50, 51, 2]
  emb, mask = plug_lib.personalised_inputs(llm, params, jnp.asarray(soft),
                                           jnp.asarray([prompt + [0, 0]]),
                                           jnp.asarray([[1] * 4 + [0, 0]]))
  got = plug_lib.sequence_nll(llm, params, emb, mask, jnp.asarray([target + [0]]),
                              jnp.asarray([[1, 1, 1, 0]]))
  with torch.no_grad():
    table = ref.get_input_embeddings()
    e = torch.cat([torch.tensor(soft[0]), table(torch.tensor(prompt + target))])[None]
    labels = torch.tensor([[-100] * 6 + target])
    want = ref(inputs_embeds=e, labels=labels).loss.item()
  assert abs(float(got) - want) < 1e-5


def test_train_and_evaluate_end_to_end_on_a_tiny_llama(tiny_llama, lamp_dir, minilm_path,
                                                       tmp_path):
  path, _ = tiny_llama
  config = _config(tmp_path, lamp_dir, path, minilm_path)
  assert system_lib.llm_family(path) == 'llama'
  result = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert result['step'] == 6 and np.isfinite(result['dev']['nll'])
  metrics = evaluate.evaluate(config, str(tmp_path / 'work'), 'dev', 'best')
  assert metrics['count'] == sum(1 for _ in lamp.load_split(lamp_dir, 'LaMP_2', 'dev'))
  dev_ids = {e.id for e in lamp.load_split(lamp_dir, 'LaMP_2', 'dev')}
  with open(tmp_path / 'work' / 'predictions_dev.json') as f:
    preds = json.load(f)
  assert {g['id'] for g in preds['golds']} == dev_ids
  # the records hold [BOS] + prompt and target + [EOS], as the decoder-only format says
  import tensorflow as tf
  from pplug_jax.data import records
  rec = str(tmp_path / 'work' / 'records')
  parse = records.parse_fn(384, 'float32')
  tok = tokenizers.load_tokenizer(path)
  examples = {e.id: e for e in lamp.load_split(lamp_dir, 'LaMP_2', 'train')}
  for raw in tf.data.TFRecordDataset(records.split_shards(rec, 'train')[:1]).take(3):
    ex = parse(raw)
    inp, tgt = ex['input_ids'].numpy().tolist(), ex['target_ids'].numpy().tolist()
    src = examples[ex['id'].numpy().decode()]
    assert inp == tok(src.input, truncation=True, max_length=96)['input_ids'] and inp[0] == 1
    assert tgt == tok(src.output, add_special_tokens=False)['input_ids'][:7] + [2]
  # served as trained: the exported plug through the inference API gives evaluate's outputs
  from pplug_jax import export
  from pplug_jax.inference import PersonaPlugGenerator
  export.export(str(tmp_path / 'work'), str(tmp_path / 'plug'), config=config)
  gen = PersonaPlugGenerator(path, str(minilm_path), str(tmp_path / 'plug'))
  root = lamp.task_dir(lamp_dir, 'LaMP_2')
  with open(lamp.split_files(root, 'dev')[0]) as f:
    questions = json.load(f)
  served = gen.generate([q['input'] for q in questions], profiles=[q['profile'] for q in questions])
  expected = {g['id']: g['output'] for g in preds['golds']}
  assert served == [expected[q['id']] for q in questions]
  # a user's LaMP items given in two parts serve as the whole profile; kinds do not mix
  q = next(q for q in questions if len(q['profile']) > 1)
  assert gen.add_history('u', q['profile'][:1]) == 1
  assert gen.add_history('u', q['profile'][1:]) == len(q['profile'])
  assert gen.generate([q['input']], user_ids=['u']) == [expected[q['id']]]
  with pytest.raises(TypeError, match="user 'u' has dict items; add the same kind"):
    gen.add_history('u', ['a text'])


def test_a_plug_is_refused_with_a_base_model_of_another_family(tiny_llama, tiny_t5, lamp_dir,
                                                              minilm_path, tmp_path):
  from pplug_jax import export
  from pplug_jax.inference import PersonaPlugGenerator
  path, _ = tiny_llama
  config = _config(tmp_path, lamp_dir, path, minilm_path)
  config.optim.max_steps = 1
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1
  train.train_and_evaluate(config, str(tmp_path / 'work'))
  export.export(str(tmp_path / 'work'), str(tmp_path / 'plug'), which='latest', config=config)
  with pytest.raises(UserError, match='trained for a llama backbone .*is a t5 model'):
    PersonaPlugGenerator(tiny_t5['v1.1'][0], str(minilm_path), str(tmp_path / 'plug'))
