"""LongLaMP's files (Kumar et al., 2024), read as they are published, into LaMP's `Example`s.

Layout: `<longlamp_dir>/<subset>_<setting>/`, `<subset>_<setting>` being the Hugging Face
dataset `LongLaMP/LongLaMP`'s subset (`abstract_generation_user`, `product_review_temporal`, ...)
and `<setting>` `user` or `temporal` (`config.split_type` 'user' or 'time'). A subset's folder
holds, per split (`train`, `val`; `test`), any one of:
- the Hugging Face parquet files: `{split}-00000-of-0000N.parquet` ..., `{split}.parquet` or
  `{split}/*.parquet`;
- the same rows as JSON: `{split}.json` (a list) or `{split}.jsonl` (a row per line).
A row is `{input, output, profile: [{<the task's fields>}], <the user's id>}`. The release has no
example ids, so an example's id is `{split}-{row}` (the row's place in the split, the files
sorted by name), and a profile item without an `id` gets `{example id}-{place}`.

Email completion is not public: LongLaMP's Avocado builder writes `<dir>/email_completion_<setting>/`
(name the folder so) with `{split}_questions.json` (`[{id, input, profile: [{id, title, text}]}]`)
and `{split}_outputs.json` (a plain list `[{id, output}]`) for `train`, `dev` and `test`; test has
no outputs.

Every check of LaMP's files applies (data/lamp.py): a missing field is named with the file and
the example id, ids are unique, an empty profile is a valid cold-start user, and nothing is
skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epy

from pplug_jax import storage
from pplug_jax.data import lamp
from pplug_jax.data.tasks import LampError, TaskSpec, longlamp_spec

with epy.lazy_imports():  # pyarrow (~0.3 s) only when a parquet file is read
  import pyarrow.parquet as pq

SETTINGS = {'user': 'user', 'time': 'temporal', 'temporal': 'temporal'}
FILE_SPLITS = {'longlamp': {'train': 'train', 'dev': 'val', 'test': 'test'},
               'longlamp_email': {'train': 'train', 'dev': 'dev', 'test': 'test'}}


def task_dir(longlamp_dir: str, task: str, split_type: str = 'user') -> str:
  """`<longlamp_dir>/<subset>_user` or `<longlamp_dir>/<subset>_temporal`."""
  if split_type not in SETTINGS:
    raise LampError(f'config.split_type={split_type!r} must be one of {sorted(SETTINGS)} '
                    '(LongLaMP: user or temporal).')
  return os.path.join(longlamp_dir, f'{longlamp_spec(task).folder}_{SETTINGS[split_type]}')


def split_files(root: str, split: str, spec: TaskSpec) -> list[str]:
  """The files of one split: the parquet or JSON files (the release), or [questions, outputs]
  (the email builder's; outputs absent for test)."""
  if split not in lamp.SPLITS:
    raise LampError(f'Unknown split {split!r}; use one of {lamp.SPLITS}.')
  name = FILE_SPLITS[spec.file_format][split]
  if spec.file_format == 'longlamp_email':
    q = os.path.join(root, f'{name}_questions.json')
    if not storage.exists(q):
      raise LampError(f'{root}: no {name}_questions.json. Run LongLaMP\'s Avocado builder '
                      '(data/avocado/create_avocado_dataset.py) with --output_dir here.')
    o = os.path.join(root, f'{name}_outputs.json')
    return [q] + ([o] if storage.exists(o) else [])
  for pattern in (f'{name}-*.parquet', f'{name}.parquet', f'{name}/*.parquet', f'{name}.json',
                  f'{name}.jsonl'):
    found = sorted(storage.glob(os.path.join(root, pattern)))
    if found:
      return found
  raise LampError(f'{root}: no {name} split ({name}-*.parquet, {name}.parquet, {name}/*.parquet, '
                  f'{name}.json or {name}.jsonl). Download the subset {os.path.basename(root)} '
                  'of the Hugging Face dataset LongLaMP/LongLaMP into it.')


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of one parquet, JSON-list or JSON-lines file, as dicts."""
  if path.endswith('.parquet'):
    with storage.open(path, 'rb') as f:
      return pq.read_table(f).to_pylist()
  with storage.open(path, encoding='utf-8') as f:
    try:
      if path.endswith('.jsonl'):
        return [json.loads(line) for line in f if line.strip()]
      rows = json.load(f)
    except json.JSONDecodeError as e:
      raise LampError(f'{path}: not valid JSON ({e}). Re-download the file.') from e
  if not isinstance(rows, list):
    raise LampError(f'{path}: expected a JSON list of rows, got {type(rows).__name__}.')
  return rows


def _with_ids(row: Any, qid: str, where: str) -> dict[str, Any]:
  """The row with its example id and every profile item's (`{qid}-{k}` where it has none)."""
  if not isinstance(row, dict):
    raise LampError(f'{where}: not an object.')
  profile = row.get('profile')
  if isinstance(profile, list):
    profile = [dict(item, id=str(item.get('id') if item.get('id') is not None else f'{qid}-{k}'))
               if isinstance(item, dict) else item for k, item in enumerate(profile)]
  return dict(row, id=qid, profile=profile)


def _output(row: dict, where: str) -> str:
  if row.get('output') is None:
    raise LampError(f'{where}: missing field \'output\'.')
  return str(row['output'])


def _release_split(files: list[str], split: str, spec: TaskSpec,
                   keep_raw: bool) -> list[lamp.Example]:
  name = FILE_SPLITS['longlamp'][split]
  examples, n = [], 0
  for path in files:
    for row in read_rows(path):
      qid = f'{name}-{n}'
      where = f'{path}: example id {qid} (row {n} of {name})'
      q = _with_ids(row, qid, where)
      ex = lamp.parse_question(q, spec, where)
      output = _output(q, where) if split != 'test' or q.get('output') is not None else None
      examples.append(dataclasses.replace(ex, output=output, raw=q if keep_raw else None))
      n += 1
  return examples


def _email_split(files: list[str], split: str, spec: TaskSpec,
                 keep_raw: bool) -> list[lamp.Example]:
  qfile = files[0]
  examples = lamp.parse_questions(qfile, spec, keep_raw)
  if len(files) == 1:
    if split != 'test':
      raise LampError(f'{qfile}: no {split}_outputs.json beside it; train and dev need outputs.')
    return examples
  ofile = files[1]
  with storage.open(ofile, encoding='utf-8') as f:
    data = json.load(f)
  rows = data.get('golds') if isinstance(data, dict) else data
  if not isinstance(rows, list):
    raise LampError(f'{ofile}: expected a list of {{"id", "output"}} (or {{"golds": [...]}}).')
  golds: dict[str, str] = {}
  for k, g in enumerate(rows):
    if not isinstance(g, dict) or g.get('id') is None:
      raise LampError(f'{ofile}: output #{k} has no id.')
    gid = str(g['id'])
    if gid in golds:
      raise LampError(f'{ofile}: example id {gid}: duplicated id.')
    golds[gid] = _output(g, f'{ofile}: example id {gid}')
  return lamp.attach_outputs(examples, golds, qfile, ofile)


def load_split(longlamp_dir: str, task: str, split: str, split_type: str = 'user',
               keep_raw: bool = False) -> list[lamp.Example]:
  """One split of a LongLaMP task as validated `Example`s (query: the input; a history item's
  text: its retrieval corpus fields joined by a space). `keep_raw` keeps each row as read."""
  spec = longlamp_spec(task)
  files = split_files(task_dir(longlamp_dir, task, split_type), split, spec)
  if spec.file_format == 'longlamp_email':
    return _email_split(files, split, spec, keep_raw)
  return _release_split(files, split, spec, keep_raw)
