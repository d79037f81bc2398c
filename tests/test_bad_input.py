"""Bad input and real mistakes: one row per case, with its exact error fragment and exit status.

In-process rows assert the exception (every `UserError` exits with status 2 from the command
line); subprocess rows run the real command and assert the exit status, the one-line message and
that nothing was touched.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from configs import lamp as lamp_config
from pplug_jax import checkpoints, cli, precompute, tokenizers, training, validation
from pplug_jax.data import lamp, pipeline, records, synthetic
from pplug_jax.errors import ConfigError, RecordsError, UserError, WorkdirError
from pplug_jax.models import hf_weights
from pplug_jax.workdir_lock import WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS = {'train': 10, 'dev': 5, 'test': 3}


def _tree_hashes(folder) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _config(lamp_dir, records_dir, minilm_path, **overrides):
  c = lamp_config.get_config('demo')
  c.data.lamp_dir = str(lamp_dir)
  c.data.records_dir = str(records_dir)
  c.encoder.path = str(minilm_path)
  c.data.num_shards = 1
  c.data.max_history = 16
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


@pytest.fixture(scope='module')
def small(tmp_path_factory, minilm_path):
  """Synthetic LaMP-2 and its records, made once; rows copy what they change."""
  tmp = tmp_path_factory.mktemp('bad_input')
  synthetic.generate(str(tmp / 'lamp'), 'LaMP_2', users=USERS, seed=3, empty_frac=0.0,
                     long_frac=0.0, mean_items=5)
  config = _config(tmp / 'lamp', tmp / 'records', minilm_path)
  precompute.run(config)
  return tmp, config


def _copy(small, tmp_path):
  """A private copy of the small LaMP files and records, and a config pointing at it."""
  src, config = small
  shutil.copytree(src / 'lamp', tmp_path / 'lamp')
  shutil.copytree(src / 'records', tmp_path / 'records')
  c = _config(tmp_path / 'lamp', tmp_path / 'records', config.encoder.path)
  return c


# ------------------------------------------------------------------ config values, in one pass

@dataclasses.dataclass
class ConfigRow:
  name: str
  overrides: dict
  fragment: str
  devices: int = 1
  processes: int = 1


CONFIG_ROWS = [
    ConfigRow('eval batch 0', {'train.eval_batch_size': 0},
              'config.train.eval_batch_size=0: must be > 0'),
    ConfigRow('no shards', {'data.num_shards': 0}, 'config.data.num_shards=0: must be > 0'),
    ConfigRow('negative lr', {'optim.lr': -1e-4}, 'config.optim.lr=-0.0001: must be > 0'),
    ConfigRow('encoder mode typo', {'encoder.mode': 'frozn'},
              "config.encoder.mode='frozn': use one of ['finetune', 'frozen']"),
    ConfigRow('dtype typo', {'llm.dtype': 'bf16'}, "config.llm.dtype='bf16': use one of"),
    ConfigRow('remat typo', {'llm.remat_policy': 'dots_no_batch'},
              "config.llm.remat_policy='dots_no_batch': use one of"),
    ConfigRow('epochs 0', {'optim.epochs': 0}, 'config.optim.epochs=0: must be > 0'),
    ConfigRow('batch vs devices', {'optim.batch_size': 12},
              'config.optim.batch_size=12: must be a multiple of the data-parallel size 8',
              devices=8),
    ConfigRow('mesh vs devices', {'mesh_shape': (3, 1)},
              'config.mesh_shape=(3, 1) needs 3 devices; 8 are visible', devices=8),
    ConfigRow('bucketing typo', {'data.bucketing': 'pad'},
              "config.data.bucketing='pad': use one of ['auto', 'off']"),
    ConfigRow('bucket bound 0', {'data.input_buckets': (0, 64)},
              'config.data.input_buckets=(0, 64): must be lengths in 1..128'),
    ConfigRow('bucket bound past the maximum', {'data.target_buckets': (200,)},
              'config.data.target_buckets=(200,): must be lengths in 1..16'),
    ConfigRow('model axis over the processes', {'mesh_shape': (1, -1)},
              'config.mesh_shape=(1, -1): its data axis (1 on 8 devices) must be a multiple of '
              'the 2 processes', devices=8, processes=2),
    ConfigRow('encoder dtype typo', {'encoder.dtype': 'bf16'},
              "config.encoder.dtype='bf16': use one of ['auto', 'bfloat16', 'float16', "
              "'float32']"),
    ConfigRow('profile steps backwards', {'train.profile_steps': (5, 2)},
              'config.train.profile_steps=(5, 2): use () (off) or (start, stop) with 0 <= start '
              '< stop'),
    ConfigRow('profile steps one number', {'train.profile_steps': (5,)},
              'config.train.profile_steps=(5,): use () (off) or (start, stop)'),
]


# configs/lamp.py arguments that name no runnable system: each refused, naming what to give
CONFIG_ARG_ROWS = [
    ('task=2,llm=decoder', "llm=decoder is the demo's tiny decoder-only model; use "
                           'configs/lamp.py:demo,llm=decoder'),
    ('demo,llm=llama2-7b', 'the demo makes its own tiny model (T5, or llm=decoder); '
                           'llm=llama2-7b needs a real config, e.g. configs/lamp.py:task=2,llm=llama2-7b'),
    ('task=2,size=xl,llm=llama2-7b', 'size=xl and llm=llama2-7b name two backbones; give one'),
    ('demo,task=4', 'the demo is synthetic LaMP-2; task=4 needs a real config'),
    ('task=2,llm=gpt2', "llm='gpt2' must be one of"),
    ('task=2,encoder=e5', "encoder='e5' must be one of"),
]


@pytest.mark.parametrize('arg,fragment', CONFIG_ARG_ROWS, ids=[a for a, _ in CONFIG_ARG_ROWS])
def test_config_argument_rows(arg, fragment):
  with pytest.raises(ValueError) as err:
    lamp_config.get_config(arg)
  assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize('row', CONFIG_ROWS, ids=lambda r: r.name)
def test_config_value_rows(row):
  config = lamp_config.get_config('demo')
  validation.check_config(config, num_devices=row.devices,
                          process_count=row.processes)  # valid as made
  for key, value in row.overrides.items():
    node = config
    *parents, name = key.split('.')
    for p in parents:
      node = node[p]
    node[name] = value
  with pytest.raises(ConfigError) as err:
    validation.check_config(config, num_devices=row.devices, process_count=row.processes)
  assert row.fragment in str(err.value), str(err.value)
  assert 'lower the batch size' not in str(err.value)


def test_every_config_problem_is_listed_at_once():
  config = lamp_config.get_config('demo')
  config.optim.lr = 0.0
  config.encoder.mode = 'x'
  config.train.eval_batch_size = -2
  with pytest.raises(ConfigError) as err:
    validation.check_config(config, num_devices=1, process_count=1)
  text = str(err.value)
  for key in ('config.optim.lr', 'config.encoder.mode', 'config.train.eval_batch_size'):
    assert key in text


# ------------------------------------------------------------------ splits

def test_missing_dev_split_is_named_before_any_work(small, tmp_path):
  config = _copy(small, tmp_path)
  root = lamp.task_dir(config.data.lamp_dir, config.task)
  os.remove(os.path.join(root, 'dev_questions.json'))
  with pytest.raises(UserError, match='no dev_questions.json'):
    validation.check_splits(config, str(tmp_path / 'fresh_records'))


def test_empty_dev_split_is_named(small, tmp_path):
  config = _copy(small, tmp_path)
  root = lamp.task_dir(config.data.lamp_dir, config.task)
  lamp.write_split(root, 'dev', 'LaMP_2', [], {})
  with pytest.raises(UserError, match='the dev split is empty'):
    validation.check_splits(config, str(tmp_path / 'fresh_records'))


# ------------------------------------------------------------------ records bound to their inputs

def test_train_refuses_records_made_from_other_input_files(small, tmp_path):
  config = _copy(small, tmp_path)
  root = lamp.task_dir(config.data.lamp_dir, config.task)
  outputs = os.path.join(root, 'train_outputs.json')
  with open(outputs) as f:
    data = json.load(f)
  data['golds'][0]['output'] = 'comedy' if data['golds'][0]['output'] != 'comedy' else 'action'
  with open(outputs, 'w') as f:
    json.dump(data, f)
  before = _tree_hashes(tmp_path / 'records')
  with pytest.raises(RecordsError) as err:
    training.prepare_records(config, str(tmp_path), config.data.records_dir)
  assert 'train records were made from other input files' in str(err.value)
  assert 'rebuild_records' in str(err.value)
  assert _tree_hashes(tmp_path / 'records') == before  # nothing touched


def test_train_refuses_records_made_with_other_settings_then_rebuilds_on_request(small,
                                                                                 tmp_path):
  config = _copy(small, tmp_path)
  config.data.max_input_length = 100
  before = _tree_hashes(tmp_path / 'records')
  with pytest.raises(RecordsError, match='max_input_length: 128 -> 100'):
    training.prepare_records(config, str(tmp_path), config.data.records_dir)
  assert _tree_hashes(tmp_path / 'records') == before
  config.data.rebuild_records = True
  meta = training.prepare_records(config, str(tmp_path), config.data.records_dir)
  assert meta['fingerprint']['max_input_length'] == 100
  assert precompute.verify_records(config, config.data.records_dir)  # now they match


def test_resume_refuses_a_changed_config_but_allows_harmless_keys(tmp_path):
  config = lamp_config.get_config('demo')
  checkpoints.save_config(str(tmp_path), config)
  os.makedirs(tmp_path / 'checkpoints' / '10')
  harmless = lamp_config.get_config('demo')
  harmless.train.log_every = 7
  harmless.train.eval_every = 3
  harmless.optim.max_steps = 500  # was -1: training longer
  checkpoints.check_resume_config(str(tmp_path), harmless)
  changed = lamp_config.get_config('demo')
  changed.optim.lr = 5e-4
  changed.data.max_history = 8
  with pytest.raises(WorkdirError) as err:
    checkpoints.check_resume_config(str(tmp_path), changed)
  assert 'config.optim.lr: 0.003 -> 0.0005' in str(err.value)
  assert 'config.data.max_history: 64 -> 8' in str(err.value)


def test_the_keys_a_resume_may_change_are_the_ones_marked_at_declaration(tmp_path):
  """configs/lamp.py marks them; each marked key (or section) may change, nothing else."""
  config = lamp_config.get_config('demo')
  assert set(config.resumable_keys) == {
      'demo_ablations', 'data.rebuild_records', 'data.prefetch', 'encoder.batch_size',
      'encoder.dtype', 'train', 'eval', 'ropg', 'rspg', 'mesh_shape', 'logical_axis_rules',
      'demo_compare', 'demo_optimized'}
  old = json.loads(config.to_json())
  new = lamp_config.get_config('demo')
  new.train.keep_checkpoints, new.eval.num_beams, new.mesh_shape = 9, 2, (1, -1)
  new.ropg.lr, new.data.prefetch = 1.0, 0
  assert checkpoints.config_changes(old, json.loads(new.to_json())) == []
  new.data.shuffle_buffer, new.rag.k = 5, 2  # unmarked: data order, and the RAG prompt
  assert checkpoints.config_changes(old, json.loads(new.to_json())) == [
      'config.data.shuffle_buffer: 10000 -> 5', 'config.rag.k: 4 -> 2']
  unmarked = json.loads(new.to_json())
  del unmarked['resumable_keys']  # a config file of one's own, without the marks
  assert 'config.train.keep_checkpoints: 3 -> 9' in checkpoints.config_changes(old, unmarked)
  typo = lamp_config.get_config('demo')
  typo.resumable_keys = ('train.log_evry',)
  with pytest.raises(ConfigError) as e:
    validation.check_config(typo)
  assert str(e.value) == ("config.resumable_keys=('train.log_evry',): marks "
                          "'train.log_evry', which this config does not have (configs/lamp.py "
                          'sets this list).')


def test_resume_of_a_run_from_before_the_variant_keys_existed(tmp_path):
  old = json.loads(lamp_config.get_config('demo').to_json())
  for section, key in (('plug', 'pooling'), ('plug', 'instruction'), ('plug', 'num_persona_tokens'),
                       ('plug', 'time_decay'), ('plug', 'time_decay_init'),
                       ('data', 'history_cap'), ('demo_data', 'scenario'),
                       ('train', 'eval_persona_zeroed')):
    del old[section][key]
  del old['demo_ablations']
  os.makedirs(tmp_path / 'checkpoints' / '10')
  with open(tmp_path / checkpoints.CONFIG_FILE, 'w') as f:
    json.dump(old, f)
  checkpoints.check_resume_config(str(tmp_path), lamp_config.get_config('demo'))  # its defaults
  variant = lamp_config.get_config('demo')
  variant.plug.pooling = 'mean'
  variant.demo_data.scenario = 'drift'
  with pytest.raises(WorkdirError) as err:
    checkpoints.check_resume_config(str(tmp_path), variant)
  assert "config.plug.pooling: 'attention' -> 'mean'" in str(err.value)
  assert "config.demo_data.scenario: 'stable' -> 'drift'" in str(err.value)


def test_demo_ablations_outside_the_demo_is_refused():
  config = lamp_config.get_config('task=2')
  config.demo_ablations = True
  with pytest.raises(ConfigError) as err:
    validation.check_config(config)
  assert ("config.demo_ablations=True: is the demo's study (configs/lamp.py:demo); on your own "
          'data run python -m pplug_jax.ablate --study variants') in str(err.value)


# ------------------------------------------------------------------ item identity

def test_item_ids_unique_only_within_a_user_keep_their_own_embeddings(small, tmp_path,
                                                                      minilm_path):
  """Other datasets number items per user (item0, item1, ...): no user gets another's history."""
  config = _copy(small, tmp_path)
  root = lamp.task_dir(config.data.lamp_dir, config.task)
  for split in ('train', 'dev', 'test'):
    path = os.path.join(root, f'{split}_questions.json')
    with open(path) as f:
      questions = json.load(f)
    for q in questions:
      for k, item in enumerate(q['profile']):
        item['id'] = f'item{k}'
    with open(path, 'w') as f:
      json.dump(questions, f)
  config.data.records_dir = str(tmp_path / 'per_user_records')
  precompute.run(config)
  meta = records.read_metadata(config.data.records_dir)
  parse = records.parse_fn(meta['fingerprint']['dim'], meta['fingerprint']['embedding_dtype'])
  recs = {r['id'].decode(): r for r in tf.data.TFRecordDataset(
      records.split_shards(config.data.records_dir, 'dev')).map(parse).as_numpy_iterator()}
  # the oracle: the same records made from globally unique ids (the module's originals)
  src_config = small[1]
  src = {r['id'].decode(): r for r in tf.data.TFRecordDataset(
      records.split_shards(src_config.data.records_dir, 'dev')).map(parse).as_numpy_iterator()}
  assert set(recs) == set(src)
  distinct = 0
  for eid in recs:
    np.testing.assert_array_equal(recs[eid]['history_embeddings'], src[eid]['history_embeddings'])
    distinct += len(recs[eid]['history_embeddings']) > 0
  assert distinct >= 3
  firsts = [recs[e]['history_embeddings'][0] for e in recs if recs[e]['history_length']]
  assert not np.allclose(firsts[0], firsts[1])  # 'item0' of two users: two embeddings


# ------------------------------------------------------------------ weights and tokenizers

def test_llm_directory_without_tokenizer_files_is_refused(tiny_t5, minilm_path):
  with pytest.raises(UserError, match='tokenizer files are missing'):
    tokenizers.load_tokenizer(tiny_t5['v1.1'][0])  # config.json + model.safetensors only
  tokenizers.load_tokenizer(str(minilm_path))  # a real one passes
  from transformers import ByT5Tokenizer
  tokenizers.check_tokenizer(ByT5Tokenizer(extra_ids=0), 'byte')


def _without_lm_head(src, dst, **config_updates):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  del tensors['lm_head.weight']
  save_file(tensors, os.path.join(dst, 'model.safetensors'))
  with open(os.path.join(dst, 'config.json')) as f:
    hf = json.load(f)
  hf.update(config_updates)
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(hf, f)


def test_missing_lm_head_of_an_untied_model_is_an_error(tiny_t5, tmp_path):
  _without_lm_head(tiny_t5['v1.1'][0], tmp_path / 'a')  # config.json: tie_word_embeddings=false
  with pytest.raises(hf_weights.CheckpointError) as err:
    hf_weights.load_t5(str(tmp_path / 'a'))
  text = str(err.value)
  assert 'no lm_head.weight' in text and 'tie_word_embeddings=false' in text
  assert 'T5ForConditionalGeneration' in text and 'needs torch' in text
  # AutoModel conversions save a T5Model, without a head, whatever the tie flag says
  _without_lm_head(tiny_t5['v1.1'][0], tmp_path / 'b', tie_word_embeddings=True,
                   architectures=['T5Model'])
  with pytest.raises(hf_weights.CheckpointError, match='saved as T5Model, without an LM head'):
    hf_weights.load_t5(str(tmp_path / 'b'))


def test_transformers5_save_of_an_untied_t5_loads_its_own_head(tmp_path):
  """transformers 5 writes tie_word_embeddings=true even for FlanT5: the head must still load."""
  import jax.numpy as jnp
  import torch
  from transformers import T5Config, T5ForConditionalGeneration
  from pplug_jax.models import t5
  torch.manual_seed(0)
  cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                 feed_forward_proj='gated-gelu', tie_word_embeddings=False, dropout_rate=0.0,
                 decoder_start_token_id=0)
  model = T5ForConditionalGeneration(cfg).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 16) * 0.3)  # its own head
  model.save_pretrained(str(tmp_path / 'm'))
  with open(tmp_path / 'm' / 'config.json') as f:
    saved = json.load(f)
  saved['tie_word_embeddings'] = True  # what transformers 5 writes; pinned, whatever it does next
  with open(tmp_path / 'm' / 'config.json', 'w') as f:
    json.dump(saved, f)
  config, params = hf_weights.load_t5(str(tmp_path / 'm'))
  assert not config.tie_word_embeddings
  ids = np.array([[5, 9, 13, 1]])
  targets = np.array([[7, 3, 1]])
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), labels=torch.tensor(targets)).logits.numpy()
  m = t5.T5(config)
  emb = m.apply({'params': params}, jnp.asarray(ids), method=t5.T5.embed)
  ours = m.apply({'params': params}, emb, jnp.ones_like(jnp.asarray(ids)),
                 t5.shift_right(jnp.asarray(targets), 0))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


def test_truncated_and_broken_safetensors_are_named(tiny_t5, tmp_path):
  src = tiny_t5['v1.1'][0]
  shutil.copytree(src, tmp_path / 'cut')
  file = tmp_path / 'cut' / 'model.safetensors'
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  with pytest.raises(hf_weights.CheckpointError, match=r'model.safetensors: truncated .*Re-down'):
    hf_weights.load_t5(str(tmp_path / 'cut'))
  file.write_bytes(data[:8] + b'{not json' + data[17:])
  with pytest.raises(hf_weights.CheckpointError, match='broken header.*Re-download'):
    hf_weights.load_t5(str(tmp_path / 'cut'))


def test_corrupt_tfrecord_shard_is_named(small, tmp_path):
  config = _copy(small, tmp_path)
  shard = records.split_shards(config.data.records_dir, 'train')[0]
  data = bytearray(open(shard, 'rb').read())
  data[len(data) // 2: len(data) // 2 + 64] = b'\x00' * 64
  with open(shard, 'wb') as f:
    f.write(bytes(data))
  with pytest.raises(RecordsError) as err:
    list(pipeline.train_batches(config, config.data.records_dir, 2))
  assert shard in str(err.value) and 'corrupt TFRecord shard' in str(err.value)
  assert 'Delete this file' in str(err.value)


# ------------------------------------------------------------------ one run per workdir

def test_workdir_lock_refuses_a_second_run_and_detects_stale_locks(tmp_path):
  with WorkdirLock(str(tmp_path), 'train'):
    with pytest.raises(WorkdirError, match=rf'in use by train \(pid {os.getpid()} on '):
      WorkdirLock(str(tmp_path), 'train').acquire()
  # a run killed with SIGKILL leaves the file but not the lock
  holder = subprocess.Popen([sys.executable, '-c', (
      'import sys, time; from pplug_jax.workdir_lock import WorkdirLock; '
      f'WorkdirLock({str(tmp_path)!r}).acquire(); print("held", flush=True); time.sleep(60)')],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  with pytest.raises(WorkdirError, match=f'pid {holder.pid}'):
    WorkdirLock(str(tmp_path)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert os.path.exists(tmp_path / '.lock')
  WorkdirLock(str(tmp_path)).acquire().release()


# ------------------------------------------------------------------ config keys

def test_unknown_config_key_names_the_closest_valid_one():
  config = lamp_config.get_config('demo')
  msg = cli.unknown_key_message(config, 'config.optim.learning_rate')
  assert msg.startswith('unknown config key config.optim.learning_rate; the closest valid key '
                        'is config.optim.lr')
  assert cli.unknown_key_message(config, 'config.optim.lr') is None
  assert 'config.llm.remat_policy' in cli.unknown_key_message(config, 'config.model.remat_policy')


# ------------------------------------------------------------------ the real commands

def _run(*args, timeout=180):
  start = time.time()
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  return proc, time.time() - start


def test_demo_refuses_a_real_lamp_dir_and_leaves_it_untouched(small, tmp_path):
  lamp_dir = small[0] / 'lamp'
  before = _tree_hashes(lamp_dir)
  proc, _ = _run('pplug_jax.train', '--config', 'configs/lamp.py:demo',
                 f'--config.data.lamp_dir={lamp_dir}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith('error: the demo (configs/lamp.py:demo) makes its own data'), lines
  assert f'refuses config.data.lamp_dir={str(lamp_dir)!r}' in lines[-1]
  assert 'Traceback' not in proc.stderr
  assert _tree_hashes(lamp_dir) == before
  assert not (tmp_path / 'w' / 'demo').exists()


def test_command_line_errors_are_one_line_exit_2_quiet_and_fast(tmp_path):
  proc, seconds = _run('pplug_jax.train', '--config', 'configs/lamp.py:demo',
                       '--config.optim.learning_rate=3e-5', f'--workdir={tmp_path}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip() == ('error: unknown config key config.optim.learning_rate; the '
                                 'closest valid key is config.optim.lr. See the README\'s '
                                 '"Config keys".')
  proc, seconds = _run('pplug_jax.train', '--config', 'configs/lamp.py:demo',
                       '--config.optim.lr=-1.0', '--config.train.eval_batch_size=0',
                       f'--workdir={tmp_path}')
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert 'config.optim.lr=-1.0: must be > 0' in proc.stderr
  assert 'config.train.eval_batch_size=0: must be > 0' in proc.stderr
  for noise in ('oneDNN', "Unable to initialize backend 'tpu'", 'PyTorch was not found'):
    assert noise not in proc.stderr, noise
  assert not os.listdir(tmp_path)  # refused before writing anything
  assert seconds < 60


@pytest.mark.parametrize('command', ['pplug_jax.train', 'pplug_jax.precompute'])
def test_a_command_without_config_is_one_line(command, tmp_path):
  """--config is one flag definition for every command (precompute used to crash here)."""
  proc, _ = _run(command, f'--workdir={tmp_path}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip() == ('error: flag --config=None: Flag --config must have a value '
                                 'other than None.')
  assert not os.listdir(tmp_path)


def test_a_second_train_in_a_busy_workdir_exits_2(tmp_path):
  with WorkdirLock(str(tmp_path), 'train'):
    proc, _ = _run('pplug_jax.train', '--config', 'configs/lamp.py:demo', f'--workdir={tmp_path}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f'is in use by train (pid {os.getpid()}' in proc.stderr
  assert not (tmp_path / 'demo').exists()


@pytest.mark.parametrize('key', ['llm.path', 'encoder.path', 'data.lamp_dir'])
def test_demo_refuses_every_path_it_did_not_make(tmp_path, key):
  from pplug_jax import demo
  config = lamp_config.get_config('demo')
  section, name = key.split('.')
  config[section][name] = str(tmp_path / 'users_own')
  with pytest.raises(ConfigError, match=f"refuses config.{key}="):
    demo.prepare(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_bad_demo_model_fitting_values_are_listed_before_any_work():
  from pplug_jax import validation
  config = lamp_config.get_config('demo')
  config.demo_model.pretrain_batch_size = 0
  config.demo_model.pretrain_steps = -1
  problems = validation.config_problems(config, num_devices=1, process_count=1)
  assert 'config.demo_model.pretrain_batch_size=0: must be > 0.' in problems
  assert ('config.demo_model.pretrain_steps=-1: must be >= 0 (0 keeps the random '
          'initialisation).') in problems
