"""LaMP parsing per task, validation errors, and the synthetic generator."""

import json
import os

import numpy as np
import pytest

from pplug_jax.data import lamp, synthetic

# One example per task in the official format (abridged texts).
FIXTURES = {
    'LaMP_1': ('For an author who has written the paper with the title "Deep Nets for X", which '
               'reference is related? Just answer with [1] or [2] without explanation. '
               '[1]: "Paper A" [2]: "Paper B"', {'title': 'T1', 'abstract': 'A1'},
               'Deep Nets for X', 'T1 A1', '[1]'),
    'LaMP_2': ('Which tag does this movie relate to among the following tags? tags: [sci-fi, '
               'comedy] description: A robot learns to love.', {'tag': 'sci-fi',
                                                                'description': 'Space opera.'},
               'A robot learns to love.', 'Space opera.', 'sci-fi'),
    'LaMP_3': ('What is the score of the following review on a scale of 1 to 5? just answer '
               'with 1, 2, 3, 4, or 5 without further explanation. review: Great blender.',
               {'text': 'Loved it', 'score': '5'}, 'Great blender.', 'Loved it', '5'),
    'LaMP_4': ('Generate a headline for the following article: Markets rose today.',
               {'text': 'Body', 'title': 'Head'}, 'Markets rose today.', 'Body Head', 'Up'),
    'LaMP_5': ('Generate a title for the following abstract of a paper: We study X.',
               {'title': 'On X', 'abstract': 'We look at X.'}, 'We study X.',
               'On X We look at X.', 'X'),
    'LaMP_6': ('Generate a subject for the following email: Meeting moved to 3pm.',
               {'text': 'Hi all', 'title': 'Lunch'}, 'Meeting moved to 3pm.', 'Hi all Lunch',
               'Meeting'),
    'LaMP_7': ('Paraphrase the following tweet without any explanation before or after it: '
               'so tired today', {'text': 'coffee time'}, 'so tired today', 'coffee time',
               'very tired'),
}


def _write(root, task, split, questions, golds):
  folder = root / task
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f'{split}_questions.json').write_text(json.dumps(questions))
  if golds is not None:
    (folder / f'{split}_outputs.json').write_text(json.dumps({'task': task, 'golds': golds}))
  return folder


@pytest.mark.parametrize('task', sorted(FIXTURES))
def test_every_task_parses_query_and_profile_text(tmp_path, task):
  text, item, query, item_text, output = FIXTURES[task]
  qs = [{'id': '10', 'input': text, 'profile': [dict(item, id='101', date='2020-02-01'),
                                                dict(item, id='100', date='2019-12-31')]},
        {'id': '11', 'input': text, 'profile': []}]
  _write(tmp_path, task, 'dev', qs, [{'id': '10', 'output': output},
                                     {'id': '11', 'output': output}])
  exs = lamp.load_split(str(tmp_path), task, 'dev')
  assert [e.id for e in exs] == ['10', '11']
  assert exs[0].query == query
  assert exs[0].profile[0].text == item_text
  assert exs[0].output == output
  assert exs[1].profile == ()  # a cold-start user is valid
  # the most recent item is kept last, and truncation keeps the most recent
  assert [i.id for i in lamp.recent_history(exs[0].profile, 1)] == ['101']
  assert [i.id for i in lamp.recent_history(exs[0].profile, 5)] == ['100', '101']


def test_raw_questions_are_the_files_entries_from_one_read(tmp_path, monkeypatch):
  """The baselines' prompts take every profile field from the entries as read; the file is read
  once for both the entries and the validated examples, and only on request are they kept."""
  import ml_collections
  from pplug_jax import storage
  text, item, *_ = FIXTURES['LaMP_3']
  qs = [{'id': '7', 'input': text, 'profile': [dict(item, id='70', date='2020-01-02')]},
        {'id': '8', 'input': text, 'profile': []}]
  _write(tmp_path, 'LaMP_3', 'dev', qs, [{'id': '7', 'output': '5'}, {'id': '8', 'output': '1'}])
  opened = []
  real_open = storage.open
  monkeypatch.setattr(storage, 'open', lambda path, *a, **k: opened.append(path) or
                      real_open(path, *a, **k))
  config = ml_collections.ConfigDict({'task': 'LaMP_3', 'split_type': 'user',
                                      'data': {'lamp_dir': str(tmp_path)}})
  qfile, entries, examples = lamp.raw_questions(config, 'dev')
  assert qfile == str(tmp_path / 'LaMP_3' / 'dev_questions.json')
  assert entries == qs  # every field, the score and the date included
  assert [e.id for e in examples] == ['7', '8'] and examples[0].output == '5'
  assert opened.count(qfile) == 1
  assert all(e.raw is None for e in lamp.load_split(str(tmp_path), 'LaMP_3', 'dev'))


def test_time_layout_and_subfolder_and_test_without_outputs(tmp_path):
  text, item, *_ = FIXTURES['LaMP_3']
  folder = tmp_path / 'LaMP_time_3' / 'test'
  folder.mkdir(parents=True)
  (folder / 'test_questions.json').write_text(json.dumps(
      [{'id': '7', 'input': text, 'profile': [dict(item, id='1')]}]))
  exs = lamp.load_split(str(tmp_path), 3, 'test', 'time')
  assert exs[0].output is None and exs[0].query == 'Great blender.'
  assert lamp.task_spec('LaMP-3').labels == ('1', '2', '3', '4', '5')
  assert len(lamp.task_spec(2).labels) == 15


def _expect_error(tmp_path, questions, golds, *needles, raw=None):
  folder = _write(tmp_path, 'LaMP_4', 'train', questions, golds)
  if raw is not None:
    (folder / 'train_questions.json').write_text(raw)
  with pytest.raises(lamp.LampError) as err:
    lamp.load_split(str(tmp_path), 'LaMP_4', 'train')
  for needle in needles:
    assert needle in str(err.value), str(err.value)


def test_malformed_json(tmp_path):
  _expect_error(tmp_path, [], [], 'train_questions.json', 'malformed JSON', raw='[{"id": ')


def test_missing_fields(tmp_path):
  _expect_error(tmp_path, [{'id': '5', 'profile': []}], [], 'example id 5', "'input'")
  _expect_error(tmp_path, [{'id': '6', 'input': 'x', 'profile': [{'id': '9', 'text': 't'}]}],
                [{'id': '6', 'output': 'o'}], 'example id 6', 'profile item 9', "'title'")
  _expect_error(tmp_path, [{'id': '8', 'input': 'x'}], [], 'example id 8', 'profile')


def test_output_ids_must_match_and_ids_unique(tmp_path):
  q = {'id': '1', 'input': 'Generate a headline for the following article: a', 'profile': []}
  _expect_error(tmp_path, [q], [{'id': '2', 'output': 'h'}], 'train_outputs.json',
                "['1']", "['2']")
  _expect_error(tmp_path, [q, q], [{'id': '1', 'output': 'h'}], 'example id 1', 'duplicated')
  _expect_error(tmp_path, [q], [{'id': '1', 'output': 'h'}, {'id': '1', 'output': 'h'}],
                'train_outputs.json', 'duplicated')


def test_unknown_task():
  with pytest.raises(lamp.LampError, match='config.task'):
    lamp.task_spec('LaMP_9')


@pytest.mark.parametrize('task', ['LaMP_2', 'LaMP_7'])
def test_synthetic_round_trip_is_deterministic_and_personal(tmp_path, task):
  users = {'train': 60, 'dev': 20, 'test': 10}
  info = synthetic.generate(str(tmp_path / 'a'), task, users=users, seed=3, empty_frac=0.1,
                            long_frac=0.05)
  synthetic.generate(str(tmp_path / 'b'), task, users=users, seed=3, empty_frac=0.1,
                     long_frac=0.05)
  for split in ('train', 'dev', 'test'):
    a = (tmp_path / 'a' / task / f'{split}_questions.json').read_bytes()
    assert a == (tmp_path / 'b' / task / f'{split}_questions.json').read_bytes()
  train = lamp.load_split(str(tmp_path / 'a'), task, 'train')
  assert len(train) == 60
  assert any(not e.profile for e in train) and any(len(e.profile) > 512 for e in train)
  prefs = info['preferences']
  assert info['best_non_personalised_accuracy'] == 1 / len(prefs)
  for e in train:
    pref = e.output if task == 'LaMP_2' else e.output.split(':')[0]
    assert pref in prefs
    if len(e.profile) >= 10:  # the preference is the most common one in the profile text
      counts = {p: sum(i.text.startswith(p + ':') if task == 'LaMP_7' else
                       any(w in i.text.split() for w in synthetic.GENRE_WORDS[p].split())
                       for i in e.profile) for p in prefs}
      assert max(counts, key=counts.get) == pref
  test = lamp.load_split(str(tmp_path / 'a'), task, 'test')
  assert all(e.output is None for e in test)


def test_tfds_builder_reads_manual_dir(tmp_path):
  import tensorflow_datasets as tfds
  from pplug_jax.data import lamp_tfds
  synthetic.generate(str(tmp_path / 'manual'), 'LaMP_2', users={'train': 6, 'dev': 4, 'test': 3},
                     seed=0, empty_frac=0.3, long_frac=0.0, mean_items=3)
  builder = lamp_tfds.Lamp(config='LaMP_2_user', data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
  assert set(builder.info.splits.keys()) == {'train', 'dev', 'test'}
  dev = list(builder.as_dataset(split='dev').as_numpy_iterator())
  want = {e.id: e for e in lamp.load_split(str(tmp_path / 'manual'), 'LaMP_2', 'dev')}
  assert {d['id'].decode() for d in dev} == set(want)
  for d in dev:
    e = want[d['id'].decode()]
    assert d['output'].decode() == e.output and d['query'].decode() == e.query
    assert [t.decode() for t in d['profile']['text']] == [i.text for i in e.profile]
  test = list(builder.as_dataset(split='test').as_numpy_iterator())
  assert len(test) == 3 and not any(t['has_output'] for t in test)


# sha256 over the files (name, bytes; sorted) of generate(d, task, users={'train': 30, 'dev': 10,
# 'test': 5}, seed=0, lengths=...), recorded before the scenarios existed
DEFAULT_FILES_SHA256 = {
    ('LaMP_2', 'short'): '2e66b53445e1cf62810b6cd113c4a279e8133fb5a18eefe93cd8b861e44efeee',
    ('LaMP_2', 'lamp'): 'ee5943cee6c9673022609e58aef29520546e0c42cc31b65f9f5d0890650e6b31',
    ('LaMP_4', 'short'): '54e586cf6837ce1b9651c2d50976e8e337a37be5d33a35758166857b2f6115eb',
    ('LaMP_7', 'short'): '7896808a55e3434c57d6632a59fc7ad4f09909ac60b3c8d3bf77e96ecf72479e',
}


@pytest.mark.parametrize('task,lengths', sorted(DEFAULT_FILES_SHA256))
def test_synthetic_defaults_are_byte_identical(tmp_path, task, lengths):
  import hashlib
  synthetic.generate(str(tmp_path), task, users={'train': 30, 'dev': 10, 'test': 5}, seed=0,
                     lengths=lengths)
  h = hashlib.sha256()
  root = tmp_path / task
  for name in sorted(os.listdir(root)):
    h.update(name.encode())
    h.update((root / name).read_bytes())
  assert h.hexdigest() == DEFAULT_FILES_SHA256[(task, lengths)]


def _raw(root, split='train'):
  import json
  q = json.load(open(root / 'LaMP_2' / f'{split}_questions.json'))
  o = {g['id']: g['output'] for g in json.load(open(root / 'LaMP_2' / f'{split}_outputs.json'))[
      'golds']}
  return [(x, o[x['id']]) for x in q]


def _majority(items):
  import collections
  return collections.Counter(i['tag'] for i in items).most_common(1)[0][0] if items else None


def test_drift_only_the_recent_items_show_the_current_preference(tmp_path):
  info = synthetic.generate(str(tmp_path), 'LaMP_2', users={'train': 80, 'dev': 10, 'test': 5},
                            seed=1, empty_frac=0.0, long_frac=0.0, scenario='drift')
  assert info['scenario'] == 'drift' and info['best_non_personalised_accuracy'] == 0.25
  users, stale = 0, 0
  recent_match, recent_n, early_match, early_n = 0, 0, 0, 0
  for q, output in _raw(tmp_path):
    items = sorted(q['profile'], key=lambda i: i['date'])
    if len(items) < 12:
      continue
    users += 1
    n = len(items)
    recent = items[int(np.ceil(n * synthetic.DRIFT_CHANGE[1])):]  # after every change point
    early = items[:int(n * synthetic.DRIFT_CHANGE[0])]  # before every change point
    recent_match += sum(i['tag'] == output for i in recent)
    recent_n += len(recent)
    early_match += sum(i['tag'] == output for i in early)
    early_n += len(early)
    stale += _majority(items) != output
  # the current preference: signal 0.8 + 0.2 / 4 by chance after the change, 0.2 / 4 before
  assert recent_match / recent_n >= 0.75 and early_match / early_n <= 0.12
  assert users >= 50 and stale >= 0.9 * users  # the whole history points the wrong way


def test_two_preferences_the_inputs_kind_decides_the_answer(tmp_path):
  info = synthetic.generate(str(tmp_path), 'LaMP_2', users={'train': 80, 'dev': 10, 'test': 5},
                            seed=2, empty_frac=0.0, long_frac=0.0, scenario='two_preferences')
  assert info['scenario'] == 'two_preferences'
  users = 0
  for q, output in _raw(tmp_path):
    words = q['input'].split()
    kinds = [k for k, w in enumerate(synthetic.KIND_WORDS) if w in words]
    assert len(kinds) == 1, q['input']
    by_kind = [[i for i in q['profile'] if synthetic.KIND_WORDS[k] in i['description'].split()]
               for k in (0, 1)]
    assert sum(map(len, by_kind)) == len(q['profile'])  # every item has one kind
    if min(map(len, by_kind)) < 6:
      continue
    users += 1
    assert _majority(by_kind[kinds[0]]) == output
    assert _majority(by_kind[1 - kinds[0]]) != output
  assert users >= 50


def test_scenarios_are_refused_where_they_do_not_exist(tmp_path):
  with pytest.raises(ValueError, match=r"scenario='weekly': use one of \('stable', 'drift', "):
    synthetic.generate(str(tmp_path), 'LaMP_2', scenario='weekly')
  with pytest.raises(ValueError, match="scenario='drift' exists for LaMP_2 only, not LaMP_7"):
    synthetic.generate(str(tmp_path), 'LaMP_7', scenario='drift')


def test_each_task_spec_is_consistent_across_its_rules():
  """One TaskSpec per task (data/tasks.py): the fields the prompt and corpus read are required,
  the main metric is in the table, and PPlug's query equals the official code's on a
  well-formed input, while LaMP's rankers may cut elsewhere (LaMP-7)."""
  from pplug_jax.data import tasks
  assert sorted(tasks.TASKS) == [f'LaMP_{n}' for n in range(1, 8)]
  for name, spec in tasks.TASKS.items():
    assert spec.name == name and tasks.task_spec(name.split('_')[1]) is spec
    assert set(spec.corpus_fields) <= set(spec.required_fields), name
    assert spec.prompt.field in spec.required_fields, name
    assert spec.main_metric in [key for key, _, _ in spec.table_metrics], name
    higher = dict((key, h) for key, _, h in spec.table_metrics)[spec.main_metric]
    assert higher == (spec.metric_mode == 'max'), name
    if spec.official_marker is not None:
      text = f'Some instruction {spec.official_marker}the query text'
      assert spec.query(text) == lamp.official_query(name, text) == 'the query text', name
  seven = 'Note: paraphrase the tweet before or after it: the text'
  assert tasks.task_spec(7).query(seven) == 'the text'  # PPlug: after its marker
  assert tasks.task_spec(7).retrieval_query(seven) == (  # LaMP: after the first colon
      'paraphrase the tweet before or after it: the text')
  assert tasks.task_spec(1).retrieval_query('no quoted titles') is None  # LaMP fails here too
  assert tasks.task_spec(1).retrieval_query('title "t", "a" or "b"') == 'a b'


def test_prediction_files_are_lamps_outputs_format_and_read_back(tmp_path):
  path = str(tmp_path / 'predictions_dev.json')
  lamp.write_predictions(path, 'LaMP_2', ['b', 'a'], ['drama', 'comedy'],
                         retriever=['bm25', 'recency'])
  with open(path, encoding='utf-8') as f:
    assert json.load(f) == {'task': 'LaMP_2', 'golds': [
        {'id': 'b', 'output': 'drama', 'retriever': 'bm25'},
        {'id': 'a', 'output': 'comedy', 'retriever': 'recency'}]}
  assert lamp.read_predictions(path) == {'b': 'drama', 'a': 'comedy'}
  # a golds file parses back with the task's checks; a prediction's output is not a gold's
  lamp.write_predictions(path, 'LaMP_3', ['x'], ['not a number'])
  assert lamp.read_predictions(path) == {'x': 'not a number'}
  with pytest.raises(lamp.LampError, match='not a number'):
    lamp.parse_outputs(path, lamp.task_spec('LaMP_3'))
  with pytest.raises(ValueError, match='one of each per example'):
    lamp.golds_file('LaMP_2', ['a', 'b'], ['x'])
