"""LongLaMP's files as published (parquet or JSON of the Hugging Face release; the email
builder's questions and outputs), their checks, and the TFDS builder, on generated data."""

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pplug_jax.data import longlamp
from pplug_jax.data.tasks import LONGLAMP_TASKS, LampError, longlamp_spec

# One user per task with the release's fields (abridged, made up): (user field, row, the
# history texts PPlug embeds, the retrieval query LongLaMP's code gives its rankers)
ROWS = {
    'abstract_generation': ('name', {
        'input': 'Generate an abstract for the title "Sparse X" using the following items: 1. '
                 'sparsity 2. speed',
        'output': 'We show that sparse X is fast. ' * 30,
        'profile': [{'id': 'p7', 'title': 'Dense X', 'abstract': 'X is dense.', 'year': 2019},
                    {'id': 'p9', 'title': 'Fast Y', 'abstract': 'Y is fast.', 'year': 2021}]},
        ['Dense X X is dense.', 'Fast Y Y is fast.'], '1. sparsity 2. speed'),
    'product_review': ('reviewerId', {
        'input': 'Generate the review text written by a reviewer who has a given an overall '
                 'rating of "5.0" for a product with description "A kettle". The summary of the '
                 'review text is "Great".',
        'output': 'This kettle boils fast and looks good on the counter. ' * 20,
        'profile': [{'overall': 4.0, 'summary': 'Nice', 'description': 'A mug',
                     'reviewText': 'Holds tea.'}]},
        ['4.0 Nice A mug Holds tea.'], None),
    'topic_writing': ('author', {
        'input': 'Generate the content for a reddit post Moving to a new city',
        'output': 'So I moved last week and here is what I learned. ' * 25,
        'profile': [{'id': 't1', 'author': 'u1', 'summary': 'My first bike',
                     'content': 'I bought a bike.'}]},
        ['My first bike I bought a bike.'], None),
}


def _rows(task, n):
  user_field, row, *_ = ROWS[task]
  return [dict(copy.deepcopy(row), **{user_field: f'user{k}'}, output=f'{row["output"]} {k}')
          for k in range(n)]


def _write_parquet(folder, split, rows, parts=1):
  folder.mkdir(parents=True, exist_ok=True)
  step = -(-len(rows) // parts)
  for k in range(parts):
    pq.write_table(pa.Table.from_pylist(rows[k * step:(k + 1) * step]),
                   folder / f'{split}-{k:05d}-of-{parts:05d}.parquet')


@pytest.mark.parametrize('task', sorted(ROWS))
def test_the_releases_parquet_reads_with_ids_queries_and_history_texts(tmp_path, task):
  _, row, texts, retrieval_query = ROWS[task]
  folder = tmp_path / f'{task}_user'
  _write_parquet(folder, 'train', _rows(task, 5), parts=2)
  _write_parquet(folder, 'val', _rows(task, 3))
  exs = longlamp.load_split(str(tmp_path), f'LongLaMP_{task}', 'train')
  assert [e.id for e in exs] == ['train-0', 'train-1', 'train-2', 'train-3', 'train-4']
  assert [e.output for e in exs] == [f'{row["output"]} {k}' for k in range(5)]
  assert exs[0].input == row['input'] and exs[0].query == row['input'].strip()
  assert [i.text for i in exs[0].profile] == texts
  want_ids = [str(p['id']) if 'id' in p else f'train-0-{k}' for k, p in enumerate(row['profile'])]
  assert [i.id for i in exs[0].profile] == want_ids
  dev = longlamp.load_split(str(tmp_path), task, 'dev', keep_raw=True)  # dev is the release's val
  assert [e.id for e in dev] == ['val-0', 'val-1', 'val-2'] and dev[1].raw['input'] == row['input']
  spec = longlamp_spec(task)
  assert spec.retrieval_query(row['input']) == (row['input'] if retrieval_query is None
                                                else retrieval_query)
  assert spec.kind == 'generation' and spec.max_target_length == 512
  assert [m for m, _, _ in spec.table_metrics] == ['rouge-1', 'rouge-L', 'meteor']


def test_json_and_json_lines_read_as_the_parquet_does_and_temporal_is_its_own_folder(tmp_path):
  task = 'product_review'
  rows = _rows(task, 4)
  _write_parquet(tmp_path / 'pq' / f'{task}_temporal', 'test', rows)
  (tmp_path / 'js' / f'{task}_temporal').mkdir(parents=True)
  (tmp_path / 'js' / f'{task}_temporal' / 'test.json').write_text(json.dumps(rows))
  (tmp_path / 'jl' / f'{task}_temporal').mkdir(parents=True)
  (tmp_path / 'jl' / f'{task}_temporal' / 'test.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in rows) + '\n')
  got = [longlamp.load_split(str(tmp_path / d), task, 'test', 'time') for d in ('pq', 'js', 'jl')]
  assert got[0] == got[1] == got[2] and len(got[0]) == 4
  assert got[0][0].profile[0].text == '4.0 Nice A mug Holds tea.'
  with pytest.raises(LampError, match=r'product_review_user: no train split .*LongLaMP/LongLaMP'):
    longlamp.load_split(str(tmp_path / 'pq'), task, 'train', 'user')


@pytest.mark.parametrize('change, message', [
    (lambda r: r.pop('output'), r"train-00000-of-00001.parquet: example id train-1 \(row 1 of "
                                r"train\): missing field 'output'"),
    (lambda r: r['profile'][0].pop('reviewText'), r"example id train-1 \(row 1 of train\), "
                                                  r"profile item train-1-0: missing field "
                                                  r"'reviewText'"),
    (lambda r: r.pop('profile'), r'example id train-1 .*missing field "profile"'),
    (lambda r: r.pop('input'), r"example id train-1 .*missing field 'input'"),
])
def test_a_missing_field_is_named_with_the_file_and_the_example_id(tmp_path, change, message):
  rows = _rows('product_review', 3)
  change(rows[1])
  (tmp_path / 'product_review_user').mkdir()
  (tmp_path / 'product_review_user' / 'train.json').write_text(json.dumps(rows))
  if 'output' in message:  # the JSON's name in place of the parquet's
    message = message.replace('train-00000-of-00001.parquet', 'train.json')
  with pytest.raises(LampError, match=message):
    longlamp.load_split(str(tmp_path), 'product_review', 'train')


def test_empty_profiles_are_valid_and_nothing_is_skipped(tmp_path):
  rows = _rows('topic_writing', 3)
  rows[1]['profile'] = []
  _write_parquet(tmp_path / 'topic_writing_user', 'val', rows)
  exs = longlamp.load_split(str(tmp_path), 'topic_writing', 'dev')
  assert len(exs) == 3 and exs[1].profile == () and len(exs[2].profile) == 1


def _email_files(folder, split, with_outputs=True, outputs=None):
  folder.mkdir(parents=True, exist_ok=True)
  qs = [{'id': f'{split}{k}', 'input': f'Complete the text of the following email. title: '
                                      f'Lunch {k}. text: Hi all, are we',
         'profile': [{'id': f'm{k}', 'title': 'Old', 'text': f'See you at {k}.'}]}
        for k in range(3)]
  (folder / f'{split}_questions.json').write_text(json.dumps(qs))
  if with_outputs:
    outs = outputs if outputs is not None else [{'id': q['id'], 'output': f'still on {n}?'}
                                                for n, q in enumerate(qs)]
    (folder / f'{split}_outputs.json').write_text(json.dumps(outs))
  return qs


def test_email_reads_the_avocado_builders_files(tmp_path):
  folder = tmp_path / 'email_completion_user'
  qs = _email_files(folder, 'dev')
  _email_files(folder, 'test', with_outputs=False)
  dev = longlamp.load_split(str(tmp_path), 'email_completion', 'dev')
  assert [e.id for e in dev] == ['dev0', 'dev1', 'dev2']
  assert [e.output for e in dev] == ['still on 0?', 'still on 1?', 'still on 2?']
  assert dev[0].profile[0].text == 'See you at 0.' and dev[0].query == qs[0]['input']
  assert LONGLAMP_TASKS['LongLaMP_email_completion'].retrieval_query(qs[0]['input']) == (
      'Lunch 0. text: Hi all, are we')
  assert all(e.output is None for e in longlamp.load_split(str(tmp_path), 'email_completion',
                                                          'test'))
  _email_files(folder, 'train', outputs=[{'id': 'train0', 'output': 'x'}])
  with pytest.raises(LampError, match=r'train_outputs.json: output ids do not match .*2 questions '
                                      r'without output'):
    longlamp.load_split(str(tmp_path), 'email_completion', 'train')
  (folder / 'train_outputs.json').unlink()
  with pytest.raises(LampError, match='no train_outputs.json beside it'):
    longlamp.load_split(str(tmp_path), 'email_completion', 'train')
  with pytest.raises(LampError, match="Avocado builder"):
    longlamp.load_split(str(tmp_path), 'email_completion', 'dev', 'temporal')


def test_an_unknown_task_or_setting_names_the_choices(tmp_path):
  with pytest.raises(LampError, match="Unknown LongLaMP task 'poems'.*LongLaMP_abstract_generation"):
    longlamp.load_split(str(tmp_path), 'poems', 'train')
  with pytest.raises(LampError, match="config.split_type='yearly'"):
    longlamp.load_split(str(tmp_path), 'topic_writing', 'train', 'yearly')


def test_the_tfds_builder_reads_a_longlamp_subset(tmp_path):
  import tensorflow_datasets as tfds
  from pplug_jax.data import lamp_tfds
  manual = tmp_path / 'manual'
  _write_parquet(manual / 'abstract_generation_user', 'train', _rows('abstract_generation', 4))
  _write_parquet(manual / 'abstract_generation_user', 'val', _rows('abstract_generation', 2))
  builder = lamp_tfds.LongLamp(config='abstract_generation_user', data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert set(builder.info.splits.keys()) == {'train', 'dev'}
  dev = list(builder.as_dataset(split='dev').as_numpy_iterator())
  want = {e.id: e for e in longlamp.load_split(str(manual), 'abstract_generation', 'dev')}
  assert sorted(d['id'].decode() for d in dev) == sorted(want) == ['val-0', 'val-1']
  for d in dev:
    e = want[d['id'].decode()]
    assert d['output'].decode() == e.output and d['has_output']
    assert [t.decode() for t in d['profile']['text']] == [i.text for i in e.profile]
