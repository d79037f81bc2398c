"""Every command that writes is guarded like train (issue 22, sections 2 and 4).

Subprocess rows run the real command and assert its exit status 2, its one-line message and that
nothing was written; in-process rows assert the `UserError` (which every command turns into one
line and exit status 2) and the files left as they were.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import lamp as lamp_config
from pplug_jax import checkpoints, export, precompute, training
from pplug_jax.baselines import utility
from pplug_jax.data import lamp, records, synthetic
from pplug_jax.errors import UserError, WorkdirError
from pplug_jax.workdir_lock import WorkdirLock, records_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ['--config', 'configs/lamp.py:demo', '--config.demo_model.pretrain_steps=0']


def _tree(folder) -> dict[str, str]:
  """Every file under `folder` by relative path: its SHA-256 and mode."""
  out = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(),
                                              stat.S_IMODE(os.stat(path).st_mode))
  return out


def _records(folder) -> dict[str, str]:
  """A records folder's files, less its lock file (who last held it is not data)."""
  return {k: v for k, v in _tree(folder).items() if k != '.lock'}


def _run(args, cwd=ROOT, timeout=240):
  start = time.time()
  proc = subprocess.run([sys.executable, '-m', *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)
  return proc, time.time() - start


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith('error: '), lines[-5:]
  return lines[-1]


@pytest.fixture(scope='module')
def small_lamp(tmp_path_factory):
  """A few synthetic LaMP-2 users (profiles with dates), made once."""
  root = tmp_path_factory.mktemp('guards_lamp')
  synthetic.generate(str(root), 'LaMP_2', users={'train': 6, 'dev': 3, 'test': 2}, seed=5,
                     empty_frac=0.0, long_frac=0.0, mean_items=4)
  return root


# ------------------------------------------------------------------ the workdir lock, every command

LOCKED = {
    'baselines': ['pplug_jax.baselines', *DEMO, '--method', 'bm25'],
    'baselines.utility': ['pplug_jax.baselines.utility', *DEMO],
    'baselines.ropg': ['pplug_jax.baselines.ropg', *DEMO, '--objective', 'kd'],
    'baselines.rspg': ['pplug_jax.baselines.rspg', *DEMO, "--config.rspg.retrievers=('none','bm25')"],
    'evaluate': ['pplug_jax.evaluate'],
    'export': ['pplug_jax.export', '--out={out}'],
    'precompute --verbose': ['pplug_jax.precompute', *DEMO, '--verbose'],
}


@pytest.mark.parametrize('name', list(LOCKED))
def test_a_command_beside_a_running_train_is_refused_naming_it(tmp_path, name):
  workdir, out = tmp_path / 'w', tmp_path / 'out'
  workdir.mkdir()
  args = [a.format(out=out) for a in LOCKED[name]] + [f'--workdir={workdir}']
  with WorkdirLock(str(workdir), 'train'):
    before = _tree(workdir)
    proc, seconds = _run(args)
  line = _one_error_line(proc)
  assert f'is in use by train (pid {os.getpid()} on ' in line, line
  assert 'Wait for it to finish or stop it' in line
  assert _tree(workdir) == before and sorted(os.listdir(workdir)) == ['.lock']
  assert not out.exists()
  assert seconds < 60
  # --verbose shows the traceback and still exits 2 (it exited 1)
  assert ('Traceback' in proc.stderr) == name.endswith('--verbose')


# ------------------------------------------------------------------ one-line errors for every flag

def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('mine')
  proc, _ = _run(['pplug_jax.train', *DEMO, f'--workdir={path}'])
  line = _one_error_line(proc)
  assert line == f'error: --workdir={path}: a file, not a folder. Give a folder (it is made if ' \
                 'missing).'
  assert 'Traceback' not in proc.stderr
  assert path.read_text() == 'mine' and os.listdir(tmp_path) == ['notes.txt']


def test_aot_mesh_that_is_not_numbers_is_one_line(tmp_path):
  proc, _ = _run(['pplug_jax.aot', '--config', 'configs/lamp.py:task=2,size=small',
                  '--topology', 'v5e:2x4', '--mesh', '1,x', f'--json={tmp_path / "plan.json"}'])
  line = _one_error_line(proc)
  assert line.startswith('error: --mesh=1,x: give two whole numbers, data,model'), line
  assert 'Traceback' not in proc.stderr and not os.listdir(tmp_path)


def test_config_path_outside_the_repository_root_says_what_to_do(tmp_path):
  proc, _ = _run(['pplug_jax.train', '--config', 'configs/lamp.py:demo',
                  f'--workdir={tmp_path / "w"}'], cwd=tmp_path)
  line = _one_error_line(proc)
  assert f'--config configs/lamp.py:demo: no file configs/lamp.py in {tmp_path}' in line, line
  assert 'Run from the repository root' in line and "give the config file's path" in line
  assert os.path.join(ROOT, 'configs', 'lamp.py') + ':demo' in line  # the path that works
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------------ every key before any work

def test_a_bad_optimised_baseline_key_is_refused_before_training(tmp_path):
  """It failed after PPlug's training, the four baselines and the utility scoring."""
  proc, seconds = _run(['pplug_jax.train', '--config', 'configs/lamp.py:demo',
                        '--config.demo_optimized=True', '--config.ropg.kd_form=kld',
                        f'--workdir={tmp_path}'], timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr == ("error: config.ropg.kd_form='kld': use one of "
                         "['kl', 'reference'].\n")
  assert not os.listdir(tmp_path) and seconds < 60


def test_a_bad_value_and_missing_inputs_are_listed_together(tmp_path):
  """One pass: precompute names the bad value and every input it cannot find, in one error."""
  proc, _ = _run(['pplug_jax.precompute', '--config', 'configs/lamp.py:task=2,size=small',
                  '--config.data.max_history=0', f'--workdir={tmp_path / "w"}'])
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert lines[:2] == ['error: invalid config:', '  config.data.max_history=0: must be > 0.']
  assert [line.split('=')[0] for line in lines[2:5]] == [
      '  config.encoder.path', '  config.data.lamp_dir', '  config.llm.path']
  assert lines[5:] == ['With nothing downloaded, run the demo: --config configs/lamp.py:demo '
                       '--workdir DIR']
  assert not os.listdir(tmp_path)


def test_evaluate_checks_the_config_it_is_given(tmp_path):
  proc, _ = _run(['pplug_jax.evaluate', *DEMO, '--config.eval.num_beams=0',
                  f'--workdir={tmp_path}'])
  assert _one_error_line(proc) == 'error: config.eval.num_beams=0: must be > 0.'
  assert sorted(os.listdir(tmp_path)) in ([], ['.lock'])  # the lock file, no output


def test_ropg_baseline_before_its_retriever_is_trained_is_one_line(tmp_path, small_lamp):
  workdir = tmp_path / 'w'
  proc, _ = _run(['pplug_jax.baselines', '--config', 'configs/lamp.py:task=2,size=small',
                  f'--config.data.lamp_dir={small_lamp}', '--method', 'ropg-kd',
                  f'--workdir={workdir}'])
  line = _one_error_line(proc)
  assert 'ropg/kd/retriever: no trained ropg-kd retriever. Train it first: python -m ' \
         'pplug_jax.baselines.ropg --objective kd' in line, line
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()  # refused before anything was written


# ------------------------------------------------------------------ precompute works as train does

@pytest.mark.slow
def test_precompute_of_the_demo_makes_the_records_train_uses(tmp_path):
  sizes = ['--config.demo_data.train_users=6', '--config.demo_data.dev_users=3',
           '--config.demo_data.test_users=2']
  proc, _ = _run(['pplug_jax.precompute', *DEMO, *sizes])  # no --workdir
  line = _one_error_line(proc)
  assert '--workdir is empty: the demo makes its data and models there, as train does' in \
      proc.stderr, line
  workdir = tmp_path / 'w'
  proc, _ = _run(['pplug_jax.precompute', *DEMO, *sizes, f'--workdir={workdir}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = records.read_metadata(str(workdir / 'records'))
  assert {s: meta['splits'][s]['examples'] for s in meta['splits']} == {
      'train': 6, 'dev': 3, 'test': 2}
  from pplug_jax import demo
  config = lamp_config.get_config('demo')
  config.demo_model.pretrain_steps = 0
  config.demo_data.update(train_users=6, dev_users=3, test_users=2)
  demo.prepare(config, str(workdir))
  assert precompute.verify_records(config, str(workdir / 'records'))  # train accepts them


# ------------------------------------------------------------------ the records folder

@pytest.fixture(scope='module')
def small_records(small_lamp, tmp_path_factory, minilm_path):
  """Records of `small_lamp`, made once; rows copy them."""
  config = _records_config(small_lamp, tmp_path_factory.mktemp('guards_records') / 'r',
                           minilm_path)
  precompute.run(config)
  return config


def _records_config(lamp_dir, records_dir, minilm_path, **data):
  c = lamp_config.get_config('demo')
  c.demo = False
  c.data.update(lamp_dir=str(lamp_dir), records_dir=str(records_dir), num_shards=1,
                max_history=4, **data)
  c.encoder.path = str(minilm_path)
  return c


def _copied(small_records, tmp_path, **data):
  dst = tmp_path / 'records'
  shutil.copytree(small_records.data.records_dir, dst)
  return _records_config(small_records.data.lamp_dir, dst, small_records.encoder.path, **data)


def test_two_precomputes_into_one_records_dir_never_run_at_once(small_lamp, tmp_path,
                                                                minilm_path):
  """Two trainings (other workdirs, max_history 64 and 4) sharing data.records_dir."""
  config = _records_config(small_lamp, tmp_path / 'shared', minilm_path)
  os.makedirs(config.data.records_dir)
  with records_lock(config.data.records_dir, str(tmp_path / 'a')):
    with pytest.raises(WorkdirError) as err:
      precompute.run(config, str(tmp_path / 'b'))
  text = str(err.value)
  assert f'{config.data.records_dir} is in use by ' in text and f'pid {os.getpid()} on ' in text
  assert f'records for --workdir {tmp_path / "a"}' in text and 'config.data.records_dir' in text
  assert os.listdir(config.data.records_dir) == ['.lock']  # not one record written


def test_rebuild_records_refuses_to_resume_on_new_records(small_records, tmp_path):
  config = _copied(small_records, tmp_path, max_input_length=100, rebuild_records=True)
  workdir = tmp_path / 'w'
  os.makedirs(workdir / 'checkpoints' / '10')
  before = _records(config.data.records_dir)
  with pytest.raises(WorkdirError) as err:
    training.prepare_records(config, str(workdir), config.data.records_dir)
  assert 'config.data.rebuild_records=True' in str(err.value)
  assert 'holds checkpoints trained on the records being replaced' in str(err.value)
  assert 'max_input_length: 128 -> 100' in str(err.value)
  assert _records(config.data.records_dir) == before


def test_rebuild_records_never_deletes_the_records_of_another_run(small_records, tmp_path):
  config = _copied(small_records, tmp_path)
  first = tmp_path / 'first'
  os.makedirs(first)
  training.prepare_records(config, str(first), config.data.records_dir)  # trains on these
  before = _records(config.data.records_dir)
  changed = _records_config(config.data.lamp_dir, config.data.records_dir, config.encoder.path,
                            max_input_length=100, rebuild_records=True)
  with pytest.raises(WorkdirError) as err:
    training.prepare_records(changed, str(tmp_path / 'second'), config.data.records_dir)
  assert f'the run in {first} trains and evaluates on' in str(err.value)
  assert 'Set a new config.data.records_dir' in str(err.value)
  assert _records(config.data.records_dir) == before


# ------------------------------------------------------------------ checkpoints being rotated

def _save_state(path, value):
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), {'params': {'plug': {'w': np.full(3, value, np.float32)}},
                                    'step': np.int32(value)})
  ckpt.wait_until_finished()


def test_a_checkpoint_rotated_away_while_read_is_not_called_broken(tmp_path, monkeypatch):
  """export/evaluate beside a rotating train: 4 of 6 tries were told to delete a valid one."""
  _save_state(tmp_path / 'checkpoints' / '5' / 'state', 5)
  real = checkpoints.restore_on_this_host
  calls = []

  def rotating(state_dir):  # train saves step 6 and deletes step 5 while we read it
    calls.append(state_dir)
    if len(calls) == 1:
      _save_state(tmp_path / 'checkpoints' / '6' / 'state', 6)
      shutil.rmtree(tmp_path / 'checkpoints' / '5')
      raise FileNotFoundError(f'{state_dir}/_METADATA')
    return real(state_dir)

  monkeypatch.setattr(checkpoints, 'restore_on_this_host', rotating)
  params, step = checkpoints.load_params(str(tmp_path), 'latest')
  assert step == 6 and params['plug']['w'].tolist() == [6.0, 6.0, 6.0]
  # a damaged one that stays in place is an error, and no advice to delete anything
  monkeypatch.setattr(checkpoints, 'restore_on_this_host', real)
  os.remove(tmp_path / 'checkpoints' / '6' / 'state' / '_METADATA')
  with pytest.raises(checkpoints.CheckpointNotFound) as err:
    checkpoints.load_params(str(tmp_path), 'latest')
  assert 'not a readable pplug_jax checkpoint' in str(err.value)
  assert 'If a training run is writing this workdir, wait for it' in str(err.value)
  assert 'Delete' not in str(err.value) and 'delete' not in str(err.value)
  assert os.path.isdir(tmp_path / 'checkpoints' / '6')


# ------------------------------------------------------------------ utility scores, each query once

class _FixedGenerator:
  """The frozen LLM's place: the same answer for every prompt."""

  def __init__(self):
    from transformers import ByT5Tokenizer
    from pplug_jax import tokenizers
    self.tokenizer = ByT5Tokenizer(extra_ids=0)
    self.encoding = tokenizers.LlmEncoding(self.tokenizer, decoder_only=False)

  def __call__(self, prompts):
    return ['comedy'] * len(prompts)


def test_utility_scores_never_append_a_query_that_is_already_there(small_lamp, tmp_path,
                                                                   monkeypatch):
  config = lamp_config.get_config('task=2,size=small')
  config.data.lamp_dir = str(small_lamp)
  config.llm.tokenizer = 'byte'
  config.ropg.update(candidates=2, initial_ranker='bm25')
  config.train.eval_batch_size = 2
  workdir = str(tmp_path)
  out_file = utility.paths(workdir, 'train')[0]
  real_candidates = utility.candidates
  seen: list[str] = []

  def racing_candidates(config, question, encoder=None):
    """A second scorer in the same workdir finishes every other query first."""
    if len(seen) % 2 == 0:
      with open(out_file, 'a') as f:
        f.write(json.dumps({'id': question['id'], 'candidates': [], 'item_ids': [],
                            'outputs': [], 'utility': []}) + '\n')
    seen.append(question['id'])
    return real_candidates(config, question, encoder)

  monkeypatch.setattr(utility, 'candidates', racing_candidates)
  utility.score(config, workdir, 'train', _FixedGenerator())
  ids = [json.loads(line)['id'] for line in open(out_file)]
  _, questions, _ = lamp.raw_questions(config, 'train')
  assert len(ids) == len(set(ids)) == len(questions), ids  # each once: none twice, none lost
  assert set(ids) == {q['id'] for q in questions}


# ------------------------------------------------------------------ export's --out folder

@pytest.fixture
def trained_workdir(tmp_path, tiny_t5):
  """The smallest workdir export reads: config.json, records metadata, one checkpoint."""
  workdir = tmp_path / 'work'
  config = lamp_config.get_config('demo')
  config.llm.path = tiny_t5['v1.1'][0]
  config.encoder.path = str(tmp_path / 'encoder')
  checkpoints.save_config(str(workdir.mkdir() or workdir), config)
  os.makedirs(workdir / 'records')
  records.write_metadata(str(workdir / 'records'), {'fingerprint': {
      'dim': 8, 'pooling': 'mean', 'normalize': True}, 'splits': {}})
  _save_state(workdir / 'checkpoints' / '3' / 'state', 3)
  return workdir


def _make_model_dir(folder, tiny_t5):
  shutil.copytree(tiny_t5['v1.1'][0], folder)


@pytest.mark.parametrize('case', ['workdir', 'model', 'other files', 'another run'])
def test_export_refuses_an_out_folder_it_would_damage(trained_workdir, tmp_path, tiny_t5, case):
  out = {'workdir': trained_workdir}.get(case, tmp_path / 'out')
  fragment = {'workdir': 'is the workdir itself; export to a folder of its own',
              'model': 'holds a model (config.json, model.safetensors); a plug written there '
                       'would break its loading',
              'other files': 'already holds other files (run.sh, secret.txt). Give a new or '
                             'empty folder, or pass --overwrite',
              'another run': 'holds an export of another run (/elsewhere/run)'}[case]
  if case == 'model':
    _make_model_dir(out, tiny_t5)
  elif case == 'other files':
    out.mkdir()
    (out / 'secret.txt').write_text('mine')
    os.chmod(out / 'secret.txt', 0o600)
    (out / 'run.sh').write_text('#!/bin/sh\n')
    os.chmod(out / 'run.sh', 0o755)
  elif case == 'another run':
    out.mkdir()
    (out / export.CONFIG_FILE).write_text(json.dumps({'source_workdir': '/elsewhere/run'}))
    (out / export.PLUG_FILE).write_bytes(b'theirs')
  before = _tree(out)
  with pytest.raises(UserError) as err:
    export.export(str(trained_workdir), str(out))
  assert fragment in str(err.value), str(err.value)
  assert _tree(out) == before  # contents and modes
  if case in ('workdir', 'model'):  # never, even when asked to overwrite
    with pytest.raises(UserError, match='workdir itself|holds a model'):
      export.export(str(trained_workdir), str(out), overwrite=True)
    assert _tree(out) == before


def test_export_overwrite_sets_modes_on_its_own_files_only(trained_workdir, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'secret.txt').write_text('mine')
  os.chmod(out / 'secret.txt', 0o600)
  (out / 'run.sh').write_text('#!/bin/sh\n')
  os.chmod(out / 'run.sh', 0o755)
  export.export(str(trained_workdir), str(out), which='latest', overwrite=True)
  modes = {n: stat.S_IMODE(os.stat(out / n).st_mode) for n in os.listdir(out)}
  assert modes == {'secret.txt': 0o600, 'run.sh': 0o755, export.PLUG_FILE: 0o644,
                   export.CONFIG_FILE: 0o644}
  assert (out / 'secret.txt').read_text() == 'mine'
  # the same run's export again, into its own folder: no --overwrite needed
  fresh = tmp_path / 'fresh'
  export.export(str(trained_workdir), str(fresh), which='latest')
  export.export(str(trained_workdir), str(fresh), which='latest')
  assert sorted(os.listdir(fresh)) == sorted([export.CONFIG_FILE, export.PLUG_FILE])


# ------------------------------------------------------------------ installs that stay reproducible

def _readme_commands() -> list[str]:
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  return [l for l in text.splitlines() if l.startswith('python3 -m venv .venv && ')]


def test_ci_runs_the_readme_test_command_with_the_constraints():
  demo_cmd, test_cmd = _readme_commands()[:2]
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = f.read()
  assert test_cmd.split('. .venv/bin/activate && ', 1)[1] in ci.splitlines()
  for cmd in (demo_cmd, test_cmd):
    assert cmd.count('pip install -c constraints.txt ') == 2, cmd
  # every direct dependency has an upper bound, and the constraints pin it exactly
  tomllib = pytest.importorskip('tomllib')
  from packaging.requirements import Requirement
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  deps = project['dependencies'] + [d for extra in project['optional-dependencies'].values()
                                    for d in extra]
  with open(os.path.join(ROOT, 'constraints.txt')) as f:
    pinned = {l.split('==')[0].lower().replace('_', '-') for l in f
              if '==' in l and not l.startswith('#')}
  for dep in deps:
    assert '<' in dep or '==' in dep, dep
    name = Requirement(dep).name.lower().replace('_', '-')  # PEP 508: extras, markers
    assert name in pinned, name
