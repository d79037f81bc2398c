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
