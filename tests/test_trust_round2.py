"""Issue 22, section 4: findings that were silently wrong (LaMP-3 golds, the headless hint)."""

import json
import re

import pytest

from pplug_jax.data import lamp
from pplug_jax.models import hf_weights

from test_bad_input import _without_lm_head


def _lamp3(root, golds):
  questions = [{'id': str(i), 'input': f'What is the score of this review? review: ok {i}',
                'profile': [{'id': f'{i}0', 'text': 'fine', 'score': '4'}]}
               for i in range(len(golds))]
  lamp.write_split(str(root / 'LaMP_3'), 'dev', 'LaMP_3', questions,
                   {str(i): g for i, g in enumerate(golds)})


def test_lamp3_golds_must_be_numbers_and_the_error_names_file_and_id(tmp_path):
  _lamp3(tmp_path, ['4', '2.0', 'five'])
  with pytest.raises(lamp.LampError) as err:
    lamp.load_split(str(tmp_path), 'LaMP_3', 'dev')
  text = str(err.value)
  assert 'dev_outputs.json: example id 2' in text and "'five' is not a number" in text
  for bad in ('nan', 'inf', ''):
    _lamp3(tmp_path, ['4', bad])
    with pytest.raises(lamp.LampError, match='example id 1: output .* is not a number'):
      lamp.load_split(str(tmp_path), 'LaMP_3', 'dev')
  _lamp3(tmp_path, ['1', '5', '3.0'])
  assert [e.output for e in lamp.load_split(str(tmp_path), 'LaMP_3', 'dev')] == ['1', '5', '3.0']


def test_headless_directory_hint_never_converts_that_same_directory(tiny_t5, tmp_path):
  """An AutoModel-converted FlanT5 (a T5Model, no LM head): converting it again with
  T5ForConditionalGeneration would invent a head and load silently, so the hint must not."""
  bad = tmp_path / 'headless'
  _without_lm_head(tiny_t5['v1.1'][0], bad, tie_word_embeddings=True, architectures=['T5Model'])
  with pytest.raises(hf_weights.CheckpointError) as err:
    hf_weights.load_t5(str(bad))
  text = str(err.value)
  sources = re.findall(r"from_pretrained\('([^']*)'\)", text)
  assert sources == ['ORIGINAL'], text
  assert str(bad) not in sources and 'never this directory' in text
  assert 'T5ForConditionalGeneration' in text and 'original checkpoint' in text
  # a pickle-only directory (it has its head) still gets the command for itself
  pickled = tmp_path / 'pickled'
  pickled.mkdir()
  (pickled / 'config.json').write_text(json.dumps({'model_type': 't5'}))
  (pickled / 'pytorch_model.bin').write_bytes(b'x')
  with pytest.raises(hf_weights.CheckpointError) as err:
    hf_weights.SafetensorsDir(str(pickled))
  assert re.findall(r"from_pretrained\('([^']*)'\)", str(err.value)) == [str(pickled)]


def _copy_workdir(src, dst):
  """A demo workdir elsewhere, its config pointing at the copy's own data and models."""
  import shutil
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('tensorboard', 'plug', '.lock'))
  cfg = (dst / 'config.json').read_text().replace(str(src), str(dst))
  (dst / 'config.json').write_text(cfg)
  for name in ('predictions_dev.json', 'predictions_test.json', 'metrics_dev.json'):
    (dst / name).unlink(missing_ok=True)


@pytest.mark.parametrize('changed', ['dev_outputs.json', 'test_questions.json'])
def test_evaluate_refuses_records_of_other_input_files(demo_run, tmp_path, changed):
  """Before: a rewritten dev_outputs.json still scored the old golds, and a replaced
  test_questions.json got predictions for the old ids, exit 0."""
  import subprocess
  import sys
  from conftest import ROOT
  work = tmp_path / 'w'
  _copy_workdir(demo_run[0], work)
  split = changed.split('_')[0]
  path = work / 'demo' / 'lamp' / 'LaMP_2' / changed
  data = json.loads(path.read_text())
  if changed == 'dev_outputs.json':
    data['golds'][0]['output'] = 'comedy' if data['golds'][0]['output'] != 'comedy' else 'action'
  else:
    data[0]['input'] += ' (edited)'
  path.write_text(json.dumps(data))
  proc = subprocess.run([sys.executable, '-m', 'pplug_jax.evaluate', f'--workdir={work}',
                         f'--split={split}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  err = proc.stderr.strip().splitlines()[-1]
  assert f'the {split} records were made from other input files' in err, err
  assert 'evaluate scores the records, not the files' in err and 'records_dir=NEW' in err
  assert not (work / f'predictions_{split}.json').exists()


def test_bad_llm_weights_are_refused_before_any_encoding(tiny_t5, tiny_bert, tmp_path):
  """Before: a truncated or pickle-only LLM was found only after the whole precompute."""
  import shutil
  import subprocess
  import sys
  from conftest import ROOT
  from pplug_jax import precompute
  from configs.lamp import get_config
  questions = [{'id': str(i), 'input': f'Which tag? tags: [a, b] description: x {i}',
                'profile': [{'id': f'{i}0', 'description': 'y', 'tag': 'a'}]} for i in range(4)]
  lamp.write_split(str(tmp_path / 'lamp' / 'LaMP_2'), 'dev', 'LaMP_2', questions,
                   {str(i): 'a' for i in range(4)})
  bad = tmp_path / 'llm'
  shutil.copytree(tiny_t5['v1.1'][0], bad)
  weights = bad / 'model.safetensors'
  weights.write_bytes(weights.read_bytes()[:-100])
  proc = subprocess.run(
      [sys.executable, '-m', 'pplug_jax.precompute', '--config', 'configs/lamp.py:task=2',
       f'--config.encoder.path={tiny_bert[0]}', f'--config.llm.path={bad}',
       f'--config.data.lamp_dir={tmp_path / "lamp"}', f'--workdir={tmp_path / "w"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'model.safetensors: truncated' in proc.stderr.strip().splitlines()[-1]
  assert not list((tmp_path / 'w').rglob('*.tfrecord-*'))
  # train's check (required): no weights at all is refused too; standalone precompute needs
  # only the tokenizer
  weights.unlink()
  config = get_config('task=2')
  config.llm.path = str(bad)
  precompute.check_llm_weights(config, required=False)
  with pytest.raises(hf_weights.CheckpointError, match='no \\*.safetensors file'):
    precompute.check_llm_weights(config, required=True)
