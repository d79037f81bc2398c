"""The main job end to end: the demo learns, and a SIGKILLed run resumes to the same result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cmd(workdir, *overrides):
  return [sys.executable, '-m', 'pplug_jax.train', '--config', 'configs/lamp.py:demo',
          f'--workdir={workdir}', *overrides]


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('demo')
  proc = subprocess.run(_train_cmd(workdir), cwd=ROOT, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(workdir / 'train_result.json') as f:
    return workdir, json.load(f), proc.stdout


def test_demo_learns_and_beats_the_non_personalised_model(demo_run):
  workdir, result, stdout = demo_run
  pplug, plain = result['dev'], result['dev_no_persona']
  bound = result['best_non_personalised_accuracy']
  assert pplug['accuracy'] >= bound + 0.3, result
  assert plain['accuracy'] <= bound + 0.15, result  # the frozen model alone cannot know the user
  assert pplug['nll'] < plain['nll'] - 0.02
  assert result['dev_plug_persona_zeroed']['accuracy'] < pplug['accuracy'] - 0.3
  assert 'PPlug (instruction + persona)' in stdout
  assert os.path.isdir(workdir / 'best') and os.path.isdir(workdir / 'tensorboard')


def _restore_params(workdir, step):
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step),
                                                          'state'))
  import jax
  return jax.tree.map(np.asarray, state['params'])


def _prepared_copy(src, dst):
  os.makedirs(dst)
  for sub in ('demo', 'records'):
    shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))


def test_sigkill_then_resume_equals_uninterrupted(demo_run, tmp_path):
  src = demo_run[0]
  flags = ['--config.optim.max_steps=40', '--config.train.checkpoint_every=10',
           '--config.train.eval_every=1000', '--config.train.log_every=10']
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  _prepared_copy(src, straight)
  _prepared_copy(src, killed)
  proc = subprocess.run(_train_cmd(straight, *flags), cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  victim = subprocess.Popen(_train_cmd(killed, *flags), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  first = os.path.join(killed, 'checkpoints', '10')
  deadline = time.time() + 300
  while not os.path.isdir(first) and time.time() < deadline and victim.poll() is None:
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert os.path.isdir(first)
  assert not os.path.exists(os.path.join(killed, 'train_result.json')), 'finished before the kill'
  proc = subprocess.run(_train_cmd(killed, *flags), cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resumed from' in proc.stderr
  a, b = _restore_params(straight, 40), _restore_params(killed, 40)
  import jax
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b))
  assert max(diffs) == 0.0, max(diffs)
