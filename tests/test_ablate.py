"""python -m pplug_jax.ablate: variants trained side by side on one set of records, resumable
after SIGKILL without retraining the finished ones, laid out by table --ablations."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, prepared_copy

FLAGS = ['--config.optim.max_steps=40', '--config.train.eval_every=1000',
         '--config.train.checkpoint_every=10', '--config.train.log_every=10']


def _ablate(workdir, *extra):
  return [sys.executable, '-m', 'pplug_jax.ablate', '--config', 'configs/lamp.py:demo',
          f'--workdir={workdir}', *extra]


def test_study_resumes_after_sigkill_without_retraining_finished_variants(demo_run, tmp_path):
  w = str(tmp_path / 'w')
  prepared_copy(str(demo_run[0]), w)  # the demo's data, base T5 and records: no re-fit
  only = '--only=full,persona_zeroed,mean_pooling,history_1'
  cmd = _ablate(w, '--study=paper', only, *FLAGS)
  full_done = os.path.join(w, 'ablations', 'full', 'train_result.json')
  mean_ckpt = os.path.join(w, 'ablations', 'mean_pooling', 'checkpoints', '10')
  victim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not os.path.isdir(mean_ckpt) and time.time() < deadline and victim.poll() is None:
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert os.path.exists(full_done) and os.path.isdir(mean_ckpt)
  assert not os.path.exists(os.path.join(w, 'ablations', 'mean_pooling', 'train_result.json'))
  finished_at = os.stat(full_done).st_mtime_ns

  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ablation full: finished in' in proc.stderr and 'not trained again' in proc.stderr
  assert 'Resumed from' in proc.stderr  # mean_pooling, from its checkpoint
  assert os.stat(full_done).st_mtime_ns == finished_at  # not retrained
  # every variant trained on W's records, with its own keys
  for name, key, value in (('mean_pooling', 'pooling', 'mean'), ('history_1', None, None)):
    with open(os.path.join(w, 'ablations', name, 'config.json')) as f:
      config = json.load(f)
    assert config['data']['records_dir'] == os.path.join(w, 'records')
    if key:
      assert config['plug'][key] == value
  assert config['data']['history_cap'] == 1
  assert sorted(os.listdir(os.path.join(w, 'records'))) == sorted(
      os.listdir(os.path.join(str(demo_run[0]), 'records')))  # no second set of records

  with open(os.path.join(w, 'ablations', 'results.json')) as f:
    results = json.load(f)['variants']
  assert list(results) == ['full', 'mean_pooling', 'persona_zeroed', 'history_1']
  for name in ('full', 'mean_pooling', 'history_1'):
    with open(os.path.join(w, 'ablations', name, 'train_result.json')) as f:
      assert results[name]['dev'] == json.load(f)['dev']
  full, zeroed = results['full']['dev'], results['persona_zeroed']['dev']
  assert zeroed == results['full']['dev_persona_zeroed']
  assert zeroed['accuracy'] < full['accuracy'] - 0.2, results  # the persona carries the user
  assert results['mean_pooling']['keys'] == {'plug.pooling': 'mean'}

  table = subprocess.run([sys.executable, '-m', 'pplug_jax.table', f'--workdir={w}',
                          '--ablations'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert table.returncode == 0, table.stderr[-2000:]
  def cell(name, key):  # the best of a column is bold
    x = results[name]['dev'][key]
    return f'**{x:.3f}**' if x == max(v['dev'][key] for v in results.values()) else f'{x:.3f}'

  m = results['mean_pooling']['dev']
  assert (f'| mean_pooling | `plug.pooling=mean` | {cell("mean_pooling", "accuracy")} | '
          f'{cell("mean_pooling", "f1")} | {m["accuracy"] - full["accuracy"]:+.3f} |'
          ) in table.stdout, table.stdout
  assert f'| persona_zeroed | `persona=zeroed (full\'s checkpoint)` |' in table.stdout
  assert table.stdout.startswith('| Variant | Changed keys | Accuracy ↑ | F1 ↑ |')  # no Table 1
  with open(os.path.join(w, 'ablations', 'ablations.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_unknown_variant_is_named_before_any_work(tmp_path):
  w = tmp_path / 'w'
  proc = subprocess.run(_ablate(w, '--study=variants', '--only=k4,k8'), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert ("error: --only=k4,k8: 'k8' is not in the variants study (full, k2, k4, time_decay, "
          'k4_time_decay).') in proc.stderr
  assert not w.exists()


def test_demo_ablations_plan_each_scenario_in_its_own_folder_with_fresh_paths(tmp_path):
  from configs import lamp as lamp_config
  from pplug_jax import ablate
  config = lamp_config.get_config('demo')
  config.demo_ablations = True
  config.data.lamp_dir = str(tmp_path / 'w' / 'demo' / 'lamp')  # as the main demo filled it
  config.llm.path = str(tmp_path / 'w' / 'demo' / 'tiny_t5')
  studies = ablate.demo_study_configs(config, str(tmp_path / 'w'))
  assert list(studies) == ['drift', 'two_preferences']
  for scenario, (c, sub, names) in studies.items():
    assert sub == str(tmp_path / 'w' / 'demo_ablations' / scenario)
    assert names == ['full', 'k2', 'k4', 'time_decay', 'k4_time_decay']
    assert c.demo_data.scenario == scenario and c.demo
    assert not (c.demo_compare or c.demo_optimized or c.demo_ablations)
    assert (c.data.lamp_dir, c.data.records_dir, c.llm.path, c.encoder.path) == ('',) * 4
  assert config.demo_data.scenario == 'stable'  # the main run's config is left as it was
  assert not os.path.exists(tmp_path / 'w')  # a plan writes nothing


def test_every_study_of_the_demo_passes_the_check_and_a_bad_value_is_listed_with_a_bad_name(
    tmp_path):
  """The check cli.job runs before any work: no problem for a valid study (a check that
  returned the variants' names once refused every study), all problems at once otherwise."""
  from configs import lamp as lamp_config
  from pplug_jax import ablate
  config = lamp_config.get_config('demo')
  for study in ablate.STUDIES:
    assert ablate.study_problems(study, None, config) == [], study
  assert ablate.study_problems('paper', ['full', 'mean_pooling'], config) == []
  w = tmp_path / 'w'
  proc = subprocess.run(_ablate(w, '--only=full,bogus', '--config.data.max_history=0'),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-3:] == [
      'error: invalid config:', '  config.data.max_history=0: must be > 0.',
      f"  --only=full,bogus: 'bogus' is not in the paper study "
      f"({', '.join(ablate.STUDIES['paper'])})."]
  assert not w.exists()
