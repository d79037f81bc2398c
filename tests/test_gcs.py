"""gs:// paths against a real Cloud Storage emulator (fake-gcs-server on localhost).

TensorFlow's own GCS client (tf.io.gfile, tf.data) cannot be pointed anywhere but Google's
endpoint, so the package reads and writes gs:// through gcsfs, google-cloud-storage and
tensorstore, which all honour the emulator; these tests exercise exactly that code."""

import json
import os
import socket
import time

import numpy as np
import pytest
import tensorflow as tf

from pplug_jax import fileio, storage, workdir_lock
from pplug_jax.data import pipeline, records
from pplug_jax.errors import RecordsError, WorkdirError


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
  import subprocess
  import sys
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
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, '-m', 'pplug_jax.train', '--config',
                         'configs/lamp.py:demo', f'--workdir={workdir}', *extra], cwd=root,
                        capture_output=True, text=True, timeout=300)


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
