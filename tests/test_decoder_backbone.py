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
from multidevice_util import with_devices
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
  # prompt_budget is exact: a prompt of that many tokens (counted as LaMP's RAG prompts count
  # them, BOS included) stays whole inside the template, one token more is cut
  budget = chat.prompt_budget(80)
  for n_tokens in (budget, budget + 1):
    prompt = '?' * (n_tokens - 1)  # '?' has no merges here: one token per character, plus BOS
    assert len(tok(prompt)['input_ids']) == n_tokens
    whole = tok.decode(chat.input_ids(prompt, 80)) == f'<|user|>{prompt}\n<|assistant|>'
    assert whole == (n_tokens == budget)
  assert enc.prompt_budget(80) == 80  # without the template, the budget is the length


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


@pytest.mark.slow
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


def _hf_greedy(ref, ids: list[int], new_tokens: int, tok) -> str:
  """transformers' greedy search on one unpadded prompt: the oracle for a baseline's output."""
  with torch.no_grad():
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                       max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                       eos_token_id=tok.eos_token_id, pad_token_id=0)
  return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_the_table1_baselines_run_on_a_decoder_with_its_tokenizer(tiny_llama, lamp_dir,
                                                                  minilm_path, tmp_path):
  """RAG prompts are cut with the Llama tokenizer, encoded as a PPlug input is (BOS + prompt),
  and generated in right-padded batches as HF generates each prompt alone; utility feedback
  (ROPG's input) runs on the same generator; table rows name the backbone."""
  from pplug_jax import table
  from pplug_jax.baselines import runner, utility
  path, ref = tiny_llama
  config = _config(tmp_path, lamp_dir, path, minilm_path)
  config.rag.max_length = 256  # the long LaMP-2 input (~130 tokens) leaves ~126 to the items
  config.ropg.candidates = 2
  config.ropg.initial_ranker = 'bm25'
  tok = tokenizers.load_tokenizer(path)
  work = str(tmp_path / 'work')
  generator = runner.BaselineGenerator(config)
  runner.run(config, work, 'bm25', 2, 'dev', generator)
  runner.run(config, work, 'none', 4, 'dev', generator)
  bm25 = runner.load_run(work, 'bm25', 2, 'dev')
  lengths = [len(tok(p)['input_ids']) for p in bm25['prompts'].values()]
  assert 240 <= max(lengths) <= 256  # the budget is counted in Llama tokens
  for qid, prompt in bm25['prompts'].items():
    ids = tok(prompt, truncation=True, max_length=256)['input_ids']
    assert ids[0] == tok.bos_token_id
    assert bm25['predictions'][qid] == _hf_greedy(ref, ids, config.eval.max_new_tokens, tok), qid
  scores = utility.score(config, work, 'dev', generator)
  with open(scores) as f:
    line = next(json.loads(x) for x in f if json.loads(x)['candidates'])
  q = next(q for q in lamp.raw_questions(config, 'dev')[1] if q['id'] == line['id'])
  from pplug_jax.baselines.prompts import rag_prompt
  for i, text in zip(line['candidates'], line['outputs']):
    prompt = rag_prompt('LaMP_2', q['input'], [q['profile'][i]], tok, 256)
    ids = tok(prompt, truncation=True, max_length=256)['input_ids']
    assert text == _hf_greedy(ref, ids, config.eval.max_new_tokens, tok)
  with open(os.path.join(work, 'config.json'), 'w') as f:  # as train writes it
    json.dump(json.loads(config.to_json()), f)
  text = table.write([work], str(tmp_path / 'table'))
  assert '| LaMP-2 | tiny-llama | Accuracy ↑ |' in text and '| Dataset | Backbone | Metric |' in text


def test_table_rows_name_each_backbone_of_several_workdirs(tmp_path):
  from pplug_jax import table
  for name, acc in (('flan-t5-xxl', 0.5), ('llama2-7b', 0.25)):
    work = tmp_path / name
    os.makedirs(work / 'baselines' / 'bm25_k4')
    json.dump({'task': 'LaMP_2', 'llm': {'name': name, 'path': f'/models/{name}'}},
              open(work / 'config.json', 'w'))
    json.dump({'accuracy': acc + 0.1, 'f1': acc}, open(work / 'metrics_dev.json', 'w'))
    json.dump({'accuracy': acc, 'f1': acc / 2},
              open(work / 'baselines' / 'bm25_k4' / 'metrics_dev.json', 'w'))
    json.dump({'llm_name': name, 'llm_path': f'/models/{name}'},
              open(work / 'baselines' / 'bm25_k4' / 'run_dev.json', 'w'))
  found = table.collect([str(tmp_path / 'flan-t5-xxl'), str(tmp_path / 'llama2-7b')])
  assert found == {
      ('LaMP_2', 'flan-t5-xxl'): {'PPlug': {'accuracy': 0.6, 'f1': 0.5},
                                  'BM25': {'accuracy': 0.5, 'f1': 0.25}},
      ('LaMP_2', 'llama2-7b'): {'PPlug': {'accuracy': 0.35, 'f1': 0.25},
                                'BM25': {'accuracy': 0.25, 'f1': 0.125}}}
  lines = table.markdown(found).splitlines()
  assert lines[2] == '| LaMP-2 | flan-t5-xxl | Accuracy ↑ | 0.500 | **0.600** |'
  assert lines[5] == '| LaMP-2 | llama2-7b | F1 ↑ | 0.125 | **0.250** |'


def test_train_step_on_8_devices_equals_single_device_on_a_tiny_llama(tiny_llama):
  """Meshes (2, 4) (MLP and query heads over the model axis, 2 KV heads replicated) and (8, 1)
  give the 1-device step's loss within 1e-5 and its updated plug within 1e-6."""
  from multidevice_util import run_on_8_devices
  out = run_on_8_devices('sharded_train_step.py', tiny_llama[0])
  assert set(out) == {'(2, 4)', '(8, 1)'}


@pytest.mark.slow
def test_the_decoder_demo_on_two_processes_equals_one_process_on_8_devices(tmp_path):
  """configs/lamp.py:demo,llm=decoder (smaller data, a short fit of the tiny Llama): 2 real
  processes x 4 devices (scripts/local_multihost.sh) take the 1 x 8 run's steps and dev."""
  import shutil
  import subprocess
  import sys
  from conftest import ROOT
  flags = ['--config.demo_data.train_users=64', '--config.demo_data.dev_users=16',
           '--config.demo_data.test_users=8', '--config.demo_model.pretrain_steps=30',
           '--config.demo_compare=False', '--config.data.num_streams=2',
           '--config.optim.max_steps=8', '--config.train.checkpoint_every=4',
           '--config.train.eval_every=1000', '--config.train.log_every=4']
  cmd = lambda w: ['-m', 'pplug_jax.train', '--config', 'configs/lamp.py:demo,llm=decoder',
                   f'--workdir={w}', *flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  single, two = str(tmp_path / 'single'), str(tmp_path / 'two')
  proc = subprocess.run([sys.executable, *cmd(single)], cwd=ROOT, capture_output=True, text=True,
                        timeout=900, env=dict(env, XLA_FLAGS=with_devices(8)))
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(single, 'demo', 'tiny_decoder', 'config.json')) as f:
    assert json.load(f)['model_type'] == 'llama'
  os.makedirs(two)
  # the same data and base model; the records are made again by the two processes, as the
  # tokenizer they name lives in each workdir
  shutil.copytree(os.path.join(single, 'demo'), os.path.join(two, 'demo'))
  proc = subprocess.run([os.path.join(ROOT, 'scripts', 'local_multihost.sh'), '2', 'python',
                         *cmd(two)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env=env)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert '[p1]' in proc.stdout
  results = []
  for w in (single, two):
    with open(os.path.join(w, 'train_result.json')) as f:
      results.append(json.load(f))
  assert results[0]['step'] == results[1]['step'] == 8
  assert abs(results[0]['dev']['nll'] - results[1]['dev']['nll']) <= 1e-5
  assert results[0]['dev']['accuracy'] == results[1]['dev']['accuracy']
  assert results[0]['dev']['count'] == results[1]['dev']['count'] == 16
  from pplug_jax import checkpoints
  params = [jax.tree.map(np.asarray, checkpoints.restore_on_this_host(
      os.path.join(w, 'checkpoints', '4', 'state'))['params']) for w in (single, two)]
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), *params))
  assert max(diffs) <= 1e-6
