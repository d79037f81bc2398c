"""The main job end to end: the demo learns, and a SIGKILLed run resumes to the same result."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pplug_jax.errors import UserError

from conftest import (ROOT, SIGKILL_FLAGS, max_abs_diff, prepared_copy, restore_params,
                      train_cmd as _train_cmd)


def test_demo_learns_and_beats_the_non_personalised_model(demo_run):
  workdir, result, stdout = demo_run
  pplug, plain = result['dev'], result['dev_no_persona']
  bound = result['best_non_personalised_accuracy']
  assert pplug['accuracy'] >= bound + 0.3, result
  assert plain['accuracy'] <= bound + 0.15, result  # the frozen model alone cannot know the user
  assert pplug['nll'] < plain['nll'] - 0.02
  assert result['dev_plug_persona_zeroed']['accuracy'] < pplug['accuracy'] - 0.3
  assert os.path.isdir(workdir / 'best') and os.path.isdir(workdir / 'tensorboard')


def test_demo_is_the_table1_comparison(demo_run, tmp_path):
  """Ad-hoc, BM25, Recency, Contriever (MiniLM) and PPlug on one dev split and one frozen model."""
  workdir, result, stdout = demo_run
  from pplug_jax.data import lamp
  base = result['baselines']
  assert set(base) == {'none', 'bm25', 'recency', 'contriever'}
  dev = lamp.load_split(str(workdir / 'demo' / 'lamp'), 'LaMP_2', 'dev')
  for m in base.values():  # users with no history get the plain input, and are counted
    assert m['count'] == 100 and m['empty_profiles'] == sum(not e.profile for e in dev) >= 1
  adhoc = base['none']['accuracy']
  rag = [base[m]['accuracy'] for m in ('bm25', 'recency', 'contriever')]
  assert adhoc <= result['best_non_personalised_accuracy'] + 0.15
  assert min(rag) >= adhoc + 0.2  # the base model reads the retrieved tags
  assert result['dev']['accuracy'] >= max(rag) + 0.1  # the whole history beats 4 noisy items
  assert '| Dataset | Backbone | Metric | Ad-hoc | BM25 | Recency | Contriever | PPlug |' in stdout
  assert '| LaMP-2 | demo-tiny-t5-byte | Accuracy ↑ |' in stdout  # rows name the backbone
  for m, name in (('none', 'none'), ('bm25', 'bm25_k4')):
    with open(workdir / 'baselines' / name / 'predictions_dev.json') as f:
      assert len(json.load(f)['golds']) == 100
  proc = subprocess.run([sys.executable, '-m', 'pplug_jax.table', f'--workdir={workdir}',
                         f'--out={tmp_path}/table'], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'**{result["dev"]["accuracy"]:.3f}**' in proc.stdout
  assert (tmp_path / 'table' / 'table1.png').stat().st_size > 1000


def test_sigkill_then_resume_equals_uninterrupted(demo_run, straight_run, tmp_path):
  straight, straight_log = straight_run
  _check_profile_and_throughput(straight, straight_log)
  killed = str(tmp_path / 'killed')
  prepared_copy(str(demo_run[0]), killed)
  victim = subprocess.Popen(_train_cmd(killed, *SIGKILL_FLAGS), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(killed, 'checkpoints', '10')
  deadline = time.time() + 300
  while not os.path.isdir(first) and time.time() < deadline and victim.poll() is None:
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert os.path.isdir(first)
  assert not os.path.exists(os.path.join(killed, 'train_result.json')), 'finished before the kill'
  proc = subprocess.run(_train_cmd(killed, *SIGKILL_FLAGS), cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resumed from' in proc.stderr
  assert max_abs_diff(restore_params(straight, 40), restore_params(killed, 40)) == 0.0


def _limit_file_size():
  """In the child: files may not grow past 200 kB (a write past that fails with EFBIG, as one
  fails on a full disk); the demo's plug checkpoint is larger, its other files are not."""
  import resource
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_failed_checkpoint_save_stops_the_run_at_once(demo_run, tmp_path):
  """orbax writes a checkpoint in a background thread, and a failure there used to surface
  only at the end of training. Now the run stops at the next step with one line naming the
  step folder and the cause, and trains no further."""
  workdir = str(tmp_path / 'w')
  prepared_copy(str(demo_run[0]), workdir)
  proc = subprocess.run(_train_cmd(workdir, '--config.optim.max_steps=200',
                                   '--config.train.checkpoint_every=10', '--config.train.log_every=1',
                                   '--config.train.eval_every=1000', '--config.demo_compare=False'),
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        preexec_fn=_limit_file_size)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = [l for l in proc.stderr.splitlines() if l.strip()][-1]
  assert line.startswith(f'error: saving the checkpoint {workdir}/checkpoints/10 failed '
                         '(ValueError: '), line
  assert 'File too large' in line, line
  stopped = int(re.search(r'Training stopped at step (\d+)\. ', line)[1])
  assert line.endswith('Fix the cause (space, permissions) and run the same command again: no '
                       'checkpoint is finished yet, so it starts again.'), line
  logged = [int(m) for m in re.findall(r'step (\d+)/200 loss', proc.stderr)]
  assert 10 <= stopped <= 15 and max(logged) == stopped, (stopped, logged[-3:])
  assert not os.path.exists(os.path.join(workdir, 'train_result.json'))


def _check_profile_and_throughput(workdir, log):
  """A jax.profiler trace in <workdir>/profile; model TFLOP/s per device, MFU (against the
  measured CPU matmul peak) and tokens/s in the log and in TensorBoard."""
  traces = glob.glob(os.path.join(workdir, 'profile', '**', '*.xplane.pb'), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  assert 'Profiling steps 4 to 5' in log
  assert 'MFU is against' in log and 'measured float32 matmul' in log
  lines = re.findall(r'step (\d+)/40 .* ([\d.]+) tokens/s ([\d.]+) TFLOP/s/device MFU ([\d.]+)%',
                     log)
  assert [int(l[0]) for l in lines] == [10, 20, 30, 40], lines
  for _, tokens, tflops, mfu in lines:
    assert float(tokens) > 0 and float(tflops) > 0 and 0 < float(mfu) < 100
  import tensorflow as tf
  tags = set()
  for event_file in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      tags.update(v.tag for v in event.summary.value)
  assert {'train/mfu', 'train/model_tflops_per_device', 'train/tokens_per_second'} <= tags, tags


def _demo_config(workdir):
  from pplug_jax import checkpoints
  return checkpoints.load_config(str(workdir))


def _evaluated_copy(demo_run, tmp_path):
  """A copy of the demo run (the shared one stays as it is) with its dev predictions, made
  with a ragged last batch; returns (workdir, config, metrics)."""
  import shutil
  from pplug_jax import evaluate
  workdir = tmp_path / 'demo_copy'
  shutil.copytree(demo_run[0], workdir)
  config = _demo_config(workdir)
  config.train.eval_batch_size = 7  # 100 dev users: 14 full batches and a ragged one
  return workdir, config, evaluate.evaluate(config, str(workdir), 'dev', 'best')


def test_evaluate_writes_every_id_once_with_a_ragged_last_batch(demo_run, tmp_path):
  from pplug_jax import evaluate
  from pplug_jax.data import lamp
  workdir, config, metrics = _evaluated_copy(demo_run, tmp_path)
  with open(workdir / 'predictions_dev.json') as f:
    preds = json.load(f)
  ids = [g['id'] for g in preds['golds']]
  dev = lamp.load_split(config.data.lamp_dir, config.task, 'dev')
  assert preds['task'] == 'LaMP_2'
  assert len(ids) == len(set(ids)) == len(dev) == metrics['count']
  assert set(ids) == {e.id for e in dev}
  # the metrics file is the official metric of those predictions against the gold outputs
  from pplug_jax.metrics import lamp_metrics
  gold = {e.id: e.output for e in dev}
  by_id = {g['id']: g['output'] for g in preds['golds']}
  want = lamp_metrics('LaMP_2', [by_id[i] for i in sorted(gold)], [gold[i] for i in sorted(gold)])
  assert metrics['accuracy'] == want['accuracy'] and metrics['f1'] == want['f1']
  with open(workdir / 'explanations_dev.json') as f:
    explain = json.load(f)
  some = next(v for v in explain.values() if v)
  assert 0 < sum(e['weight'] for e in some) <= 1.0 + 1e-6 and some[0]['item_id']
  assert [e['weight'] for e in some] == sorted((e['weight'] for e in some), reverse=True)
  # test split: leaderboard-format predictions and no metrics (no outputs)
  test = evaluate.evaluate(config, str(workdir), 'test', 'best')
  assert 'accuracy' not in test
  with open(workdir / 'predictions_test.json') as f:
    assert len(json.load(f)['golds']) == len(lamp.load_split(config.data.lamp_dir, 'LaMP_2',
                                                             'test'))


def test_export_then_inference_api_reproduces_the_checkpoint(demo_run, tmp_path):
  from safetensors.numpy import load_file
  from pplug_jax import checkpoints
  from pplug_jax.data import lamp
  from pplug_jax.inference import PersonaPlugGenerator
  workdir, _, _ = demo_run
  config = _demo_config(workdir)
  out = tmp_path / 'plug'
  proc = subprocess.run([sys.executable, '-m', 'pplug_jax.export', f'--workdir={workdir}',
                         f'--out={out}', '--reference_names'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  params, _ = checkpoints.load_params(str(workdir), 'best')
  ref = load_file(str(out / 'pplug_reference.safetensors'))
  np.testing.assert_array_equal(ref['align_mlp.0.weight'],
                                params['plug']['align_mlp']['fc1']['kernel'].T)
  np.testing.assert_array_equal(ref['align_mlp_inst.2.bias'],
                                params['plug']['align_mlp_inst']['fc2']['bias'])
  np.testing.assert_array_equal(ref['inst_token'], params['plug']['inst_token'])
  assert sorted(ref) == sorted(['inst_token'] + [f'{m}.{i}.{p}' for m in ('align_mlp',
                                                                          'align_mlp_inst')
                                                 for i in (0, 2) for p in ('weight', 'bias')])

  gen = PersonaPlugGenerator(config.llm.path, config.encoder.path, str(out))
  evaluated, _, _ = _evaluated_copy(demo_run, tmp_path)  # this test's own predictions
  with open(evaluated / 'predictions_dev.json') as f:
    from_checkpoint = {g['id']: g['output'] for g in json.load(f)['golds']}
  dev = lamp.load_split(config.data.lamp_dir, 'LaMP_2', 'dev')[:12]
  texts = gen.generate([e.input for e in dev], histories=[[i.text for i in
                                                           lamp.recent_history(e.profile, config.data.max_history)]
                                                          for e in dev])
  assert texts == [from_checkpoint[e.id] for e in dev]
  # users added incrementally, and a cold-start user
  e = next(x for x in dev if len(x.profile) > 4)
  items = [i.text for i in lamp.recent_history(e.profile, config.data.max_history)]
  gen.add_history('u', items[:2])
  assert gen.add_history('u', items[2:]) == len(items)
  assert gen.generate([e.input], user_ids=['u']) == [from_checkpoint[e.id]]
  with pytest.raises(KeyError, match='nobody'):
    gen.generate([e.input], user_ids=['nobody'])
  cold = gen.generate([e.input], user_ids=['nobody'], on_unknown_user='warn')
  assert cold == gen.generate([e.input], histories=[[]])  # served with no history, as promised


def test_bad_checkpoint_and_export_directories(tmp_path):
  from pplug_jax import checkpoints, export
  with pytest.raises(checkpoints.CheckpointNotFound, match='Train'):
    checkpoints.load_params(str(tmp_path), 'best')
  broken = tmp_path / 'checkpoints' / '5'
  broken.mkdir(parents=True)
  (broken / 'state').mkdir()
  with pytest.raises(checkpoints.CheckpointNotFound, match='not a readable'):
    checkpoints.load_params(str(tmp_path), 'latest')
  with pytest.raises(UserError, match='not a plug export'):
    export.load_export(str(tmp_path))


def test_inference_api_refuses_silent_mistakes(demo_run, tmp_path):
  from pplug_jax.inference import PersonaPlugGenerator
  workdir, _, _ = demo_run
  config = _demo_config(workdir)
  out = tmp_path / 'plug'
  from pplug_jax import export
  export.export(str(workdir), str(out))
  for name in ('plug.safetensors', 'plug_config.json'):
    assert os.stat(out / name).st_mode & 0o777 == 0o644, name
  gen = PersonaPlugGenerator(config.llm.path, config.encoder.path, str(out))
  prompt = ('Which tag does this movie relate to among the following tags? Just answer with '
            'the tag name without further explanation. tags: [sci-fi, comedy, romance, action] '
            'description: a starship crew meets an alien robot')
  with pytest.raises(KeyError, match="unknown user ids \\['nobody'\\]"):
    gen.generate([prompt], user_ids=['nobody'])
  assert len(gen.generate([prompt], user_ids=['nobody'], on_unknown_user='warn')) == 1
  with pytest.raises(TypeError, match='not a str'):
    gen.add_history('alice', 'one long text, not a list')
  with pytest.raises(TypeError, match='not a str'):
    gen.generate(prompt, user_ids=['alice'])
  with pytest.raises(TypeError, match=r'histories\[0\] must be a list of texts'):
    gen.generate([prompt], histories=['a text where a list of texts belongs'])
  assert gen.generate([], user_ids=[]) == []
  assert gen.generate([], histories=[]) == []


def _readme_snippet() -> str:
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  start = text.index('<!-- inference-snippet -->')
  block = text[text.index('```python', start) + len('```python'):]
  return block[:block.index('```')]


def test_readme_inference_snippet_runs_as_written_on_the_demo_export(demo_run, tmp_path):
  """The README's snippet, with only the paths swapped in: the demo run's, and an export
  outside it (the shared run is never written into)."""
  workdir, _, _ = demo_run
  proc = subprocess.run([sys.executable, '-m', 'pplug_jax.export', f'--workdir={workdir}',
                         f'--out={tmp_path}/plug'], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  code = _readme_snippet().replace('/tmp/pplug_demo/plug', f'{tmp_path}/plug').replace(
      '/tmp/pplug_demo', str(workdir))
  scope: dict = {}
  exec(compile(code, 'README.md', 'exec'), scope)
  assert scope['outputs'] == ['sci-fi', 'action']  # the same prompt, each user's own genre


def test_evaluations_after_the_first_compile_nothing(demo_run):
  """A SplitGenerator compiles its generation once; later evaluations reuse it."""
  import jax
  from jax import monitoring
  from pplug_jax import checkpoints, generation, partitioning, system as system_lib
  from pplug_jax.data import records
  workdir, _, _ = demo_run
  config = _demo_config(workdir)
  config.eval.num_beams = 2  # beam search: the costly compile
  trainable, _ = checkpoints.load_params(str(workdir), 'best')
  rdir = os.path.join(str(workdir), 'records')
  mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
  system = system_lib.load_system(config, records.read_metadata(rdir)['fingerprint']['dim'], mesh)
  generator = generation.SplitGenerator(system, config)
  compiles = []
  monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(event)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  # the tests' persistent compilation cache off: a hit there would skip the compile it counts
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    first = generator.generate_split(trainable, rdir, 'dev', 40, max_batches=2)
    after_first = len(compiles)
    second = generator.generate_split(trainable, rdir, 'dev', 40, max_batches=2)
  finally:
    jax.config.update('jax_enable_compilation_cache', cached)
  assert after_first > 0  # the listener sees compiles
  assert len(compiles) == after_first, compiles[after_first:]
  assert generator.jitted(True)._cache_size() == 1
  assert first['predictions'] == second['predictions'] and len(first['predictions']) == 80
