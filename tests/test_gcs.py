"""gs:// paths against a real Cloud Storage emulator (fake-gcs-server on localhost).

TensorFlow's own GCS client (tf.io.gfile, tf.data) cannot be pointed anywhere but Google's
endpoint, so the package reads and writes gs:// through gcsfs, google-cloud-storage and
tensorstore, which all honour the emulator; these tests exercise exactly that code."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from pplug_jax import checkpoints, fileio, storage, workdir_lock
from pplug_jax.data import pipeline, records
from pplug_jax.errors import RecordsError, WorkdirError

from conftest import (ROOT, SIGKILL_FLAGS, max_abs_diff, restore_params, train_cmd)


def _serialized(n):
  return [tf.train.Example(features=tf.train.Features(feature={
      'x': tf.train.Feature(int64_list=tf.train.Int64List(value=list(range(i + 1)))),
      'b': tf.train.Feature(bytes_list=tf.train.BytesList(value=[os.urandom(i * 37)]))}))
          .SerializeToString() for i in range(n)]


def test_tfrecord_shards_on_gcs_are_byte_identical_to_tensorflows(gcs, tmp_path):
  bucket = gcs()
  rows = _serialized(25)
  local, remote = str(tmp_path / 'a.tfrecord'), f'{bucket}/r/a.tfrecord'
  records.write_shard(local, rows)
  records.write_shard(remote, rows)
  with open(local, 'rb') as f:
    assert storage.read_range(remote, 0, 1 << 30) == f.read()  # TF's own framing, byte for byte
  assert [r.numpy() for r in records.dataset([remote, remote])] == rows + rows
  # a flipped byte in the second shard: the error names that shard
  data = bytearray(storage.read_range(remote, 0, 1 << 30))
  data[len(data) // 2] ^= 0xFF
  bad = f'{bucket}/r/b.tfrecord'
  storage.write_bytes(bad, bytes(data))
  with pytest.raises(RecordsError, match='b.tfrecord: corrupt TFRecord shard'):
    list(pipeline._numpy(records.dataset([remote, bad]), [remote, bad]))


def test_json_and_write_once_identity_on_gcs(gcs):
  bucket = gcs()
  path = f'{bucket}/w/settings.json'
  fileio.record_or_check(path, {'a': 1, 'b': 'x'}, 'records', 'Use another folder.')
  assert fileio.read_json(path) == {'a': 1, 'b': 'x'}
  fileio.record_or_check(path, {'a': 1, 'b': 'x'}, 'records', 'Use another folder.')  # same: ok
  with pytest.raises(WorkdirError, match=r'settings.json: records were made with other settings '
                     r'or inputs \(changed: b\)'):
    fileio.record_or_check(path, {'a': 1, 'b': 'y'}, 'records', 'Use another folder.')
  # created once: a second creator loses the generation precondition
  assert storage.create_once(f'{bucket}/w/once', b'1') is not None
  assert storage.create_once(f'{bucket}/w/once', b'2') is None
  assert storage.read_generation(f'{bucket}/w/once')[0] == b'1'
  fileio.write_json(f'{bucket}/w/state.json', {'step': 1})
  fileio.write_json(f'{bucket}/w/state.json', {'step': 2})
  assert fileio.read_json(f'{bucket}/w/state.json') == {'step': 2}
  assert sorted(storage.listdir(f'{bucket}/w')) == ['once', 'settings.json', 'state.json']
  assert storage.glob(f'{bucket}/w/s*.json') == [f'{bucket}/w/settings.json',
                                                  f'{bucket}/w/state.json']


def test_missing_bucket_is_named(gcs):
  with pytest.raises(storage.StorageError, match=r'--workdir=gs://no-such-bucket/run: the bucket '
                     r'gs://no-such-bucket does not exist\. Create it'):
    storage.check_bucket('gs://no-such-bucket/run', '--workdir')
  storage.check_bucket(gcs() + '/run', '--workdir')  # an existing one passes


def test_object_lock_refuses_a_live_owner_and_takes_over_a_stale_one(gcs, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_S', 0.2)
  monkeypatch.setattr(workdir_lock, 'STALE_S', 3.0)
  folder = gcs() + '/run'
  lock_path = f'{folder}/.lock'
  with workdir_lock.WorkdirLock(folder, 'train'):
    first = json.loads(storage.read_generation(lock_path)[0])
    assert first['host'] == socket.gethostname() and first['pid'] == os.getpid()
    with pytest.raises(WorkdirError, match=r'run is in use by train \(pid \d+ on '):
      workdir_lock.WorkdirLock(folder, 'evaluate').acquire()
    time.sleep(1.0)
    beat = json.loads(storage.read_generation(lock_path)[0])['heartbeat']
    assert beat > first['heartbeat']  # the heartbeat renews the object
  assert not storage.exists(lock_path)  # released

  # another host's live lock (fresh heartbeat): refused, naming that host
  owner = {'command': 'train', 'pid': 4242, 'host': 'tpu-vm-7', 'started': '2026-12-03 10:00:00',
           'heartbeat': time.time()}
  storage.create_once(lock_path, json.dumps(owner).encode())
  with pytest.raises(WorkdirError, match=r'in use by train \(pid 4242 on tpu-vm-7, since '
                     r'2026-12-03 10:00:00\), last heartbeat \d+ s ago \(stale after 3 s\)'):
    workdir_lock.WorkdirLock(folder, 'train').acquire()
  # the same lock once its heartbeat is older than STALE_S: taken over
  data, gen = storage.read_generation(lock_path)
  storage.replace_if(lock_path, json.dumps(dict(owner, heartbeat=time.time() - 10)).encode(), gen)
  with workdir_lock.WorkdirLock(folder, 'train'):
    assert json.loads(storage.read_generation(lock_path)[0])['pid'] == os.getpid()
  # a lock of this host whose pid is gone (a SIGKILLed run) is stale at once
  dead = {**owner, 'host': socket.gethostname(), 'pid': _dead_pid()}
  storage.create_once(lock_path, json.dumps(dead).encode())
  with workdir_lock.WorkdirLock(folder, 'train'):
    assert json.loads(storage.read_generation(lock_path)[0])['pid'] == os.getpid()


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_safetensors_and_tokenizer_dirs_on_gcs(gcs, tiny_t5, minilm_path):
  from pplug_jax import tokenizers
  from pplug_jax.models import hf_weights
  bucket = gcs()
  local = tiny_t5['v1.1'][0]
  storage.copytree(local, f'{bucket}/t5')
  a, b = hf_weights.SafetensorsDir(local), hf_weights.SafetensorsDir(f'{bucket}/t5')
  assert sorted(a.keys()) == sorted(b.keys())
  for k in a.keys():
    np.testing.assert_array_equal(np.asarray(a.get(k)), np.asarray(b.get(k)))
  storage.copytree(minilm_path, f'{bucket}/minilm')
  tok_local = tokenizers.load_tokenizer(minilm_path)
  tok_remote = tokenizers.load_tokenizer(f'{bucket}/minilm')
  assert tok_remote.name_or_path == f'{bucket}/minilm'
  text = 'Persona tokens personalise a frozen model.'
  assert tok_remote(text)['input_ids'] == tok_local(text)['input_ids']


def _train(workdir, *extra):
  return subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def _error_line(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith('error: '), lines[-5:]
  return lines[-1]


def test_train_on_a_missing_bucket_or_beside_another_hosts_run_is_one_line(gcs):
  line = _error_line(_train('gs://no-such-bucket/demo'))
  assert ('--workdir=gs://no-such-bucket/demo: the bucket gs://no-such-bucket does not exist. '
          'Create it (gcloud storage buckets create gs://no-such-bucket)') in line, line
  folder = gcs() + '/demo'
  owner = {'command': 'train', 'pid': 4242, 'host': 'tpu-vm-7', 'started': '2026-12-03 10:00:00',
           'heartbeat': time.time() + 3600}  # alive for the whole test
  storage.create_once(f'{folder}/.lock', json.dumps(owner).encode())
  line = _error_line(_train(folder))
  assert (f'error: {folder} is in use by train (pid 4242 on tpu-vm-7, since 2026-12-03 '
          '10:00:00), last heartbeat') in line, line
  assert 'Wait for it to finish or stop it, or use another --workdir.' in line
  assert storage.listdir(folder) == ['.lock']  # nothing written beside the lock


def _env(**changes):
  env = dict(os.environ)
  for k, v in changes.items():
    if v is None:
      env.pop(k, None)
    else:
      env[k] = v
  return env


@pytest.mark.slow
def test_bucket_names_and_refusals_are_one_line_before_any_work(gcs, tmp_path):
  """A bucket name GCS refuses, missing credentials, refused credentials and a bucket these
  credentials may only read: each is one line, exit 2, and nothing is written. No request
  leaves the machine: the credential probes and token requests go to localhost traps."""
  import gcs_emulator
  # 'b0' passed the bucket check once, and tensorstore refused it inside orbax's save thread
  line = _error_line(_train('gs://b0/demo'))
  assert line == ("error: --workdir=gs://b0/demo: 'b0' is not a valid Cloud Storage bucket "
                  'name (3-63 lowercase letters, digits, -, _ and ., beginning and ending with a '
                  'letter or digit). Fix the path.'), line
  assert 'not a valid Cloud Storage bucket name' in _error_line(_train('gs://Bad_Bucket-/demo'))

  # no credentials: no emulator, no key file, no gcloud login; google-auth's probe of the GCE
  # metadata server goes to a localhost trap, so nothing leaves the machine
  trap = gcs_emulator.MetadataTrap()
  try:
    proc = subprocess.run(
        train_cmd('gs://pplug-no-creds/demo'), cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=_env(STORAGE_EMULATOR_HOST=None, TENSORSTORE_GCS_HTTP_URL=None,
                              GOOGLE_AUTH_TOKEN_FOR_TESTING=None,
                              GOOGLE_APPLICATION_CREDENTIALS=None, HOME=str(tmp_path),
                              CLOUDSDK_CONFIG=str(tmp_path / 'gcloud'), **trap.env))
  finally:
    trap.stop()
  line = _error_line(proc)
  assert line == ('error: --workdir=gs://pplug-no-creds/demo: no Google Cloud credentials found '
                  'to read it: run `gcloud auth application-default login` (a workstation), or '
                  'give the TPU/GCE VM a service account with access to the bucket (or set '
                  'GOOGLE_APPLICATION_CREDENTIALS to a key file).'), line
  assert trap.connections >= 1  # the probe reached the trap on localhost

  # refused credentials: a key file whose token endpoint (on localhost) refuses them
  token = gcs_emulator.MetadataTrap(400, json.dumps({
      'error': 'invalid_grant', 'error_description': 'Invalid JWT Signature.'}).encode())
  key = gcs_emulator.service_account_key(str(tmp_path / 'key.json'),
                                         f'http://{token.address}/token')
  try:
    proc = subprocess.run(
        train_cmd('gs://pplug-refused/demo'), cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=_env(STORAGE_EMULATOR_HOST=None, TENSORSTORE_GCS_HTTP_URL=None,
                              GOOGLE_AUTH_TOKEN_FOR_TESTING=None,
                              GOOGLE_APPLICATION_CREDENTIALS=key))
  finally:
    token.stop()
  line = _error_line(proc)
  assert line.startswith('error: --workdir=gs://pplug-refused/demo: Cloud Storage refused the '
                         "credentials (('invalid_grant: Invalid JWT Signature.'"), line
  assert line.endswith('run `gcloud auth application-default login` (a workstation), or give '
                       'the TPU/GCE VM a service account with access to the bucket (or set '
                       'GOOGLE_APPLICATION_CREDENTIALS to a key file).'), line
  assert token.connections >= 1  # the token request went to localhost, and no further

  bucket = gcs()
  proxy = gcs_emulator.FaultProxy(gcs.emulator.url)
  try:
    # read-only: reads pass, every write is refused as Cloud Storage refuses it (403); the
    # first write is the workdir's lock object, before any work
    proxy.add('forbid')
    line = _error_line(subprocess.run(train_cmd(f'{bucket}/demo'), cwd=ROOT, text=True,
                                      capture_output=True, timeout=300, env=_env(**proxy.env)))
    assert line.startswith(f'error: {bucket}/demo/.lock: permission denied to write it (403 '
                           'POST '), line
    assert line.endswith(f'The credentials in use need write access to {bucket} (e.g. '
                         'roles/storage.objectUser), or use another bucket.'), line
  finally:
    proxy.stop()
  assert storage.listdir(bucket) == []  # nothing was written
  assert gcs.metadata.connections == 0  # the emulator's clients never probed for credentials


@pytest.fixture(scope='module')
def gcs_run(gcs, demo_run, straight_run, tmp_path_factory):
  """The main job with --workdir gs://...: precompute, training, orbax checkpoints,
  TensorBoard and results all on the emulator (only the demo's prepared data and base T5 are
  copied in: the 4-minute fit). Its requests go through a proxy that holds the upload of
  checkpoint 20's commit_success.txt, so the run is SIGKILLed in the middle of that save, with
  checkpoint 10 finished. A second run started meanwhile must be refused by the live run's
  lock. Then the same command resumes and finishes. Returns what the tests check."""
  import gcs_emulator
  workdir = gcs() + '/demo'
  storage.copytree(str(demo_run[0] / 'demo'), f'{workdir}/demo')
  proxy = gcs_emulator.FaultProxy(gcs.emulator.url)
  proxy.add('stall', r'checkpoints/20/commit_success\.txt', seconds=600)
  log_start = gcs.emulator.log_size()
  victim_log = open(tmp_path_factory.mktemp('gcs_run') / 'victim.log', 'w')  # never a pipe
  victim = subprocess.Popen(train_cmd(workdir, *SIGKILL_FLAGS), cwd=ROOT, env=_env(**proxy.env),
                            stdout=victim_log, stderr=victim_log)
  try:
    assert proxy.stalled.wait(400), 'the run never reached the save of checkpoint 20'
    second = _train(workdir, *SIGKILL_FLAGS)
    killed = {'lock': json.loads(storage.read_generation(f'{workdir}/.lock')[0]),
              'finished': sorted(storage.listdir(f'{workdir}/checkpoints')),
              'partial': sorted(storage.listdir(f'{workdir}/checkpoints/20')),
              'latest': checkpoints.find(workdir, 'latest')}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
  finally:
    victim.kill()
    victim_log.close()
    proxy.stop()
  killed['result_before'] = storage.exists(f'{workdir}/train_result.json')
  resumed = _train(workdir, *SIGKILL_FLAGS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return {'workdir': workdir, 'victim': victim, 'second': second, 'killed': killed,
          'resumed': resumed, 'requests': gcs.emulator.requests(log_start),
          'straight': straight_run[0]}


def test_demo_on_gcs_killed_mid_save_resumes_bit_identical(gcs_run, gcs, tmp_path):
  r = gcs_run
  workdir, straight, killed = r['workdir'], r['straight'], r['killed']
  assert (f'error: {workdir} is in use by train (pid {r["victim"].pid} on '
          f'{socket.gethostname()}, since ') in _error_line(r['second'])
  # killed in the middle of saving checkpoint 20: its folder has objects but no
  # commit_success.txt, so it is not a checkpoint, for orbax or for evaluate/export
  assert killed['lock']['pid'] == r['victim'].pid
  assert killed['finished'] == ['10', '20'] and 'commit_success.txt' not in killed['partial']
  assert killed['partial'], 'the save of 20 had begun'
  assert killed['latest'] == (f'{workdir}/checkpoints/10', 10)
  assert not killed['result_before'], 'finished before the kill'
  log = r['resumed'].stderr
  # the killed run's lock object stays behind; its pid is gone, so it is stale at once
  assert 'taking over a stale lock' in log and f'pid {r["victim"].pid} on this host' in log
  assert f'Resumed from {workdir}/checkpoints at step 10' in log, log[-3000:]
  assert not storage.exists(f'{workdir}/.lock')  # released at the end
  # records made on gs:// give the local run's parameters exactly
  assert max_abs_diff(restore_params(straight, 40), restore_params(workdir, 40)) == 0.0
  local = fileio.read_json(os.path.join(straight, 'train_result.json'))
  remote = fileio.read_json(f'{workdir}/train_result.json')
  assert remote['dev'] == local['dev'] and remote['step'] == 40
  # the same files as the local run (less its profile trace, and its flock file)
  assert sorted(storage.listdir(workdir)) == sorted(
      set(os.listdir(straight)) - {'profile', '.lock'})
  assert sorted(storage.listdir(f'{workdir}/checkpoints')) == ['20', '30', '40']
  # TensorBoard: both runs' scalars, one event file each (the killed run's flushed at 10)
  events = storage.glob(f'{workdir}/tensorboard/events.*')
  assert len(events) == 2, events
  steps = set()
  for i, event_file in enumerate(events):
    copy = tmp_path / f'events{i}'
    copy.write_bytes(storage.read_range(event_file, 0, 1 << 30))
    for event in tf.compat.v1.train.summary_iterator(str(copy)):
      steps.update(event.step for v in event.summary.value if v.tag == 'train/loss')
  assert {10, 20, 30, 40} <= steps, steps
  # every request went to the emulator, none probed for credentials
  assert len(r['requests']) > 100 and gcs.metadata.connections == 0


def _job(module, *args):
  proc = subprocess.run([sys.executable, '-m', f'pplug_jax.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_evaluate_export_table_and_inference_on_gcs_equal_the_local_run(gcs_run, gcs, tmp_path):
  """evaluate, table and export on the gs:// workdir (export to gs://), then the inference API
  serving that gs:// export: the same metrics and predictions as the local run."""
  from pplug_jax.data import lamp
  from pplug_jax.inference import PersonaPlugGenerator
  import shutil
  workdir, straight = gcs_run['workdir'], str(tmp_path / 'local')
  shutil.copytree(gcs_run['straight'], straight)  # the shared run stays as it was
  for w in (workdir, straight):
    _job('evaluate', f'--workdir={w}', '--split=dev')
  def metrics(path):  # all but the machine's speed
    return {k: v for k, v in fileio.read_json(path).items() if k != 'examples_per_second'}
  local = metrics(os.path.join(straight, 'metrics_dev.json'))
  assert metrics(f'{workdir}/metrics_dev.json') == local and 'accuracy' in local
  predictions = fileio.read_json(f'{workdir}/predictions_dev.json')
  assert predictions == fileio.read_json(os.path.join(straight, 'predictions_dev.json'))
  table = _job('table', f'--workdir={workdir}')
  assert f'| {local["accuracy"]:.3f}' in table.stdout or f'**{local["accuracy"]:.3f}**' in \
      table.stdout, table.stdout
  assert storage.exists(f'{workdir}/table1.md')
  assert storage.read_range(f'{workdir}/table1.png', 0, 8) == b'\x89PNG\r\n\x1a\n'
  out = gcs() + '/exports/plug'
  _job('export', f'--workdir={workdir}', f'--out={out}')
  config = checkpoints.load_config(workdir)
  assert config.llm.path == f'{workdir}/demo/tiny_t5'  # the base model is read from gs:// too
  gen = PersonaPlugGenerator(config.llm.path, config.encoder.path, out)
  raw = fileio.read_json(lamp.split_files(lamp.task_dir(config.data.lamp_dir, 'LaMP_2'),
                                          'dev')[0])[:16]
  served = gen.generate([q['input'] for q in raw], profiles=[q['profile'] for q in raw])
  expected = {g['id']: g['output'] for g in predictions['golds']}
  assert served == [expected[q['id']] for q in raw]
  assert gcs.metadata.connections == 0


def test_a_refused_checkpoint_write_on_gcs_stops_the_run_at_once(gcs, demo_run):
  """tensorstore's writes of checkpoint 10 are refused (403, as a bucket that loses write
  access would): the run stops at the next step, one line naming the step folder and the
  cause, instead of training on with nothing saved."""
  import gcs_emulator
  workdir = gcs() + '/refused'
  for sub in ('demo', 'records'):
    storage.copytree(str(demo_run[0] / sub), f'{workdir}/{sub}')
  storage.remove(f'{workdir}/records/.lock')  # the local flock file
  proxy = gcs_emulator.FaultProxy(gcs.emulator.url)
  proxy.add('forbid', r'checkpoints/10\.orbax-checkpoint-tmp/|checkpoints/10/')
  try:
    proc = subprocess.run(train_cmd(workdir, '--config.optim.max_steps=200',
                                    '--config.train.checkpoint_every=10',
                                    '--config.train.eval_every=1000',
                                    '--config.demo_compare=False'),
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=_env(**proxy.env))
  finally:
    proxy.stop()
  line = _error_line(proc)
  assert line.startswith(f'error: saving the checkpoint {workdir}/checkpoints/10 failed ('), line
  # the cause as the client that failed first words it: tensorstore (PERMISSION_DENIED, 403)
  # or gcsfs (Forbidden, and the reason)
  assert re.search(r'PERMISSION_DENIED|403|Forbidden: .* does not have storage\.objects\.create '
                   'access', line), line
  stopped = int(re.search(r'Training stopped at step (\d+)\. ', line)[1])
  assert 10 <= stopped <= 15, line
  assert proxy.faults >= 1 and not storage.exists(f'{workdir}/train_result.json')
