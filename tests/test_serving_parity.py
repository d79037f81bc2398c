"""What is trained is what is served: the inference API's greedy outputs equal evaluate's.

For the default, `reference` (configs/lamp.py:demo,reference: fine-tuned encoder with dropout,
the official constants; also exported with the reference names), PPlug + BM25 and PPlug +
recency plugs trained on the demo's data,
`PersonaPlugGenerator` given each dev user's LaMP profile items reproduces `evaluate`'s
prediction for every dev user, and the persona changes the outputs.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from pplug_jax.errors import UserError

from conftest import ROOT

SETTINGS = {
    'default': ('configs/lamp.py:demo', []),
    'reference': ('configs/lamp.py:demo,reference', ['--config.optim.max_steps=60']),
    'bm25': ('configs/lamp.py:demo', ['--config.plug.retrieval=bm25',
                                      '--config.plug.retrieval_k=1']),
    'recency': ('configs/lamp.py:demo', ['--config.plug.retrieval=recency',
                                         '--config.plug.retrieval_k=1']),
}


def _train(src, workdir, config, flags):
  """A short demo training on the demo's base model and data (copied, not regenerated)."""
  os.makedirs(workdir)
  shutil.copytree(os.path.join(src, 'demo'), os.path.join(workdir, 'demo'))
  proc = subprocess.run(
      [sys.executable, '-m', 'pplug_jax.train', '--config', config, f'--workdir={workdir}',
       '--config.optim.max_steps=40', '--config.train.eval_every=1000',
       '--config.train.checkpoint_every=1000', '--config.demo_compare=False', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _dev_questions(config):
  from pplug_jax.data import lamp
  root = lamp.task_dir(config.data.lamp_dir, config.task, config.split_type)
  with open(lamp.split_files(root, 'dev')[0]) as f:
    return json.load(f)


def _check_reference_export(config, cfg, out):
  from safetensors.numpy import load_file
  from transformers import AutoModel
  assert config.encoder.mode == 'finetune' and config.llm.dropout_rate == 0.1
  assert config.plug.persona_scale == 539.9738
  assert cfg['persona_scale'] == 539.9738 and cfg['instruction_scale'] == 539.9738 / 7
  names = set(load_file(os.path.join(out, 'pplug_reference.safetensors')))
  assert 'inst_token' in names and 'align_mlp.0.weight' in names
  AutoModel.from_pretrained(os.path.join(out, 'query_encoder'))  # the official loader's call


@pytest.mark.parametrize('setting', list(SETTINGS))
def test_inference_api_equals_evaluate_on_every_dev_user(setting, demo_run, tmp_path):
  from pplug_jax import checkpoints, evaluate, export
  from pplug_jax.inference import PersonaPlugGenerator
  config_name, flags = SETTINGS[setting]
  if setting == 'default':  # a copy: evaluate writes its predictions into the workdir
    workdir = str(tmp_path / setting)
    shutil.copytree(str(demo_run[0]), workdir)
  else:
    workdir = str(tmp_path / setting)
    _train(str(demo_run[0]), workdir, config_name, flags)
  config = checkpoints.load_config(workdir)
  evaluate.evaluate(config, workdir, 'dev', 'best')
  with open(os.path.join(workdir, 'predictions_dev.json')) as f:
    expected = {g['id']: g['output'] for g in json.load(f)['golds']}
  out = str(tmp_path / 'plug')
  cfg = export.export(workdir, out, with_reference_names=setting == 'reference')
  if setting == 'reference':  # fine-tuned encoder with dropout, the official constants
    _check_reference_export(config, cfg, out)
  gen = PersonaPlugGenerator(config.llm.path, config.encoder.path, out)
  questions = _dev_questions(config)
  assert len(questions) == len(expected) == 100
  inputs, profiles = [q['input'] for q in questions], [q['profile'] for q in questions]
  served = []
  for start in range(0, len(inputs), 40):
    served += gen.generate(inputs[start:start + 40], profiles=profiles[start:start + 40])
  same = sum(s == expected[q['id']] for s, q in zip(served, questions))
  assert same == len(questions), f'{setting}: {same} of {len(questions)} equal evaluate'
  # the persona matters: zeroed, the same plug gives other outputs for many users
  zeroed = gen.generate(inputs[:40], profiles=profiles[:40], persona=False)
  changed = sum(a != b for a, b in zip(zeroed, served[:40]))
  assert changed >= 8, f'{setting}: the persona changes only {changed} of 40 outputs'
  if setting in ('bm25', 'recency'):  # texts have no fields to build the prompt from
    with pytest.raises(UserError, match='Pass profiles='):
      gen.generate(inputs[:1], histories=[['some item text']])


def test_an_export_without_the_input_settings_is_refused(demo_run, tmp_path):
  """An export made before the settings were recorded would be served with guessed ones."""
  from pplug_jax import export
  out = str(tmp_path / 'plug')
  export.export(str(demo_run[0]), out)
  path = os.path.join(out, export.CONFIG_FILE)
  with open(path) as f:
    cfg = json.load(f)
  old = {k: v for k, v in cfg.items() if k not in ('config', 'records_fingerprint')}
  old['format'] = 'pplug_jax.plug/1'
  with open(path, 'w') as f:
    json.dump(old, f)
  with pytest.raises(UserError, match='Export it again: python -m pplug_jax.export --workdir'):
    export.load_export(out)
