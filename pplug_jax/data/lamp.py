"""LaMP benchmark files: schema, parsing and validation (what differs per task: data/tasks.py).

Layout: `<lamp_dir>/LaMP_N/` (user-based split) or `<lamp_dir>/LaMP_time_N/` (time-based), each
holding `{split}_questions.json` and `{split}_outputs.json`, flat or in a `{split}/` subfolder.
The test split has no outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

from pplug_jax import fileio, storage
from pplug_jax.data.tasks import LampError, TaskSpec, task_spec

SPLITS = ('train', 'dev', 'test')
SPLIT_TYPES = ('user', 'time')

def official_query(task: str, text: str) -> str:
  """The query the official code embeds, quirks kept: a missing marker is found at -1, so the
  slice starts len(marker) - 1 characters in; LaMP-1 takes the text between 'title "' and '",'."""
  spec = task_spec(task)
  if spec.name == 'LaMP_1':
    start = text.find('title "') + len('title "')
    return text[start:text.find('",', start)]
  marker = spec.official_marker
  if marker is None:
    raise LampError(f'{spec.name}: the official code has no query rule for this task.')
  return text[text.find(marker) + len(marker):]


@dataclasses.dataclass(frozen=True)
class ProfileItem:
  id: str
  text: str
  date: str = ''


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  input: str
  query: str
  profile: tuple[ProfileItem, ...]
  output: str | None = None
  # the entry as the file has it (every profile field, for the baselines' prompts); kept only
  # when asked (`load_split(keep_raw=True)`), since a train split's raw entries are large
  raw: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)


def task_dir(lamp_dir: str, task: str, split_type: str = 'user') -> str:
  """`<lamp_dir>/LaMP_N` (user) or `<lamp_dir>/LaMP_time_N` (time)."""
  if split_type not in SPLIT_TYPES:
    raise LampError(f'config.split_type={split_type!r} must be one of {SPLIT_TYPES}.')
  n = task_spec(task).name.split('_')[1]
  return os.path.join(lamp_dir, f'LaMP_{n}' if split_type == 'user' else f'LaMP_time_{n}')


def split_files(root: str, split: str) -> tuple[str, str | None]:
  """(questions file, outputs file or None) of a split, flat or in a `{split}/` subfolder."""
  if split not in SPLITS:
    raise LampError(f'Unknown split {split!r}; use one of {SPLITS}.')
  for folder in (root, os.path.join(root, split)):
    q = os.path.join(folder, f'{split}_questions.json')
    if storage.exists(q):
      o = os.path.join(folder, f'{split}_outputs.json')
      return q, (o if storage.exists(o) else None)
  raise LampError(f'{root}: no {split}_questions.json (looked in {root} and {root}/{split}). '
                  'Download LaMP from the benchmark site and set config.data.lamp_dir.')


def _load_json(path: str) -> Any:
  try:
    with storage.open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise LampError(f'{path}: malformed JSON ({e}). Re-download the file.') from e


def _str_field(obj: dict, key: str, where: str) -> str:
  if key not in obj or obj[key] is None:
    raise LampError(f'{where}: missing field {key!r}.')
  return str(obj[key])


def parse_questions(path: str, spec: TaskSpec, keep_raw: bool = False) -> list[Example]:
  """Parses and validates a `*_questions.json` (outputs are attached separately); `keep_raw`
  keeps each entry as read in `Example.raw`."""
  data = _load_json(path)
  if not isinstance(data, list):
    raise LampError(f'{path}: expected a JSON list of questions, got {type(data).__name__}.')
  examples, seen = [], set()
  for n, q in enumerate(data):
    if not isinstance(q, dict):
      raise LampError(f'{path}: entry #{n} is not an object.')
    qid = _str_field(q, 'id', f'{path}: entry #{n}')
    if qid in seen:
      raise LampError(f'{path}: example id {qid}: duplicated id.')
    seen.add(qid)
    example = parse_question(q, spec, f'{path}: example id {qid}')
    examples.append(dataclasses.replace(example, raw=q) if keep_raw else example)
  return examples


def parse_question(q: dict, spec: TaskSpec, where: str) -> Example:
  """One LaMP question ({id, input, profile: [{id, date?, <the task's fields>}]}), validated;
  `where` names it in errors (file and id, or the API argument)."""
  qid = _str_field(q, 'id', where)
  text = _str_field(q, 'input', where)
  profile = q.get('profile')
  if not isinstance(profile, list):
    raise LampError(f'{where}: missing field "profile" (a list; [] for a user with no history).')
  items = []
  for k, item in enumerate(profile):
    iwhere = f'{where}, profile item #{k}'
    if not isinstance(item, dict):
      raise LampError(f'{iwhere}: not an object.')
    iid = _str_field(item, 'id', iwhere)
    parts = [_str_field(item, f, f'{where}, profile item {iid}') for f in spec.profile_fields]
    items.append(ProfileItem(iid, ' '.join(parts), str(item.get('date') or '')))
  return Example(qid, text, spec.query(text), tuple(items))


def parse_outputs(path: str, spec: TaskSpec) -> dict[str, str]:
  """Parses a `*_outputs.json`: {task, golds: [{id, output}]} -> {id: output}."""
  data = _load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('golds'), list):
    raise LampError(f'{path}: expected {{"task": ..., "golds": [{{"id", "output"}}]}}.')
  task = str(data.get('task', spec.name)).replace('-', '_')
  if task.replace('time_', '') != spec.name:
    raise LampError(f'{path}: says task {data.get("task")!r}, but config.task is {spec.name}.')
  out: dict[str, str] = {}
  for n, g in enumerate(data['golds']):
    gid = _str_field(g, 'id', f'{path}: gold #{n}')
    if gid in out:
      raise LampError(f'{path}: example id {gid}: duplicated id.')
    out[gid] = _str_field(g, 'output', f'{path}: example id {gid}')
    if spec.kind == 'regression':
      _check_number(out[gid], f'{path}: example id {gid}', spec)
  return out


def _check_number(value: str, where: str, spec: TaskSpec) -> None:
  """A regression gold (LaMP-3's rating) must be a finite number: the metrics take its float."""
  try:
    ok = math.isfinite(float(value))
  except ValueError:
    ok = False
  if not ok:
    raise LampError(f'{where}: output {value!r} is not a number; {spec.name} golds are ratings '
                    f'({", ".join(spec.labels)}). Fix the file or re-download it.')


def load_split(lamp_dir: str, task: str, split: str, split_type: str = 'user',
               keep_raw: bool = False) -> list[Example]:
  """Reads one split of a task; train/dev carry outputs, test does not. `keep_raw` keeps each
  question's entry as read (`Example.raw`)."""
  spec = task_spec(task)
  qfile, ofile = split_files(task_dir(lamp_dir, task, split_type), split)
  examples = parse_questions(qfile, spec, keep_raw)
  if ofile is None:
    if split != 'test':
      raise LampError(f'{qfile}: no {split}_outputs.json beside it; train and dev need outputs.')
    return examples
  return attach_outputs(examples, parse_outputs(ofile, spec), qfile, ofile)


def attach_outputs(examples: list[Example], golds: dict[str, str], qfile: str,
                   ofile: str) -> list[Example]:
  """The examples with their outputs; the two files' ids must agree exactly."""
  ids = {e.id for e in examples}
  missing = sorted(ids - set(golds))
  extra = sorted(set(golds) - ids)
  if missing or extra:
    raise LampError(f'{ofile}: output ids do not match {qfile}: '
                    f'{len(missing)} questions without output (e.g. {missing[:3]}), '
                    f'{len(extra)} outputs without question (e.g. {extra[:3]}).')
  return [dataclasses.replace(e, output=golds[e.id]) for e in examples]


def recent_history(items: Sequence[ProfileItem], max_items: int,
                   order: str = 'date') -> tuple[ProfileItem, ...]:
  """The most recent `max_items`, oldest first: sorted by date when every item has one.

  order='file' keeps the file's order and takes its last items (the official code's
  `his_id[-512:]`).
  """
  items = tuple(items)
  if order == 'date' and items and all(i.date for i in items):
    items = tuple(sorted(items, key=lambda i: _date_key(i.date)))
  return items[-max_items:] if max_items > 0 else ()


def _date_key(date: str) -> tuple:
  nums = [int(x) for x in re.findall(r'\d+', date)]
  return tuple(nums) if nums else (date,)


def write_split(root: str, split: str, task: str, examples: Sequence[dict],
                outputs: dict[str, str] | None) -> None:
  """Writes `{split}_questions.json` (+ `{split}_outputs.json`) in the official format."""
  storage.makedirs(root, exist_ok=True)
  with storage.open(os.path.join(root, f'{split}_questions.json'), 'w', encoding='utf-8') as f:
    json.dump(list(examples), f, ensure_ascii=False)
  if outputs is not None:
    with storage.open(os.path.join(root, f'{split}_outputs.json'), 'w', encoding='utf-8') as f:
      json.dump(golds_file(task, list(outputs), list(outputs.values())), f, ensure_ascii=False)


def golds_file(task: str, ids: Sequence[str], outputs: Sequence[str],
               **per_row: Sequence[Any]) -> dict[str, Any]:
  """LaMP's outputs format, {"task", "golds": [{"id", "output", ...}]}: the golds' files, every
  prediction file and the leaderboard's. `per_row` adds a field to each row (RSPG's retriever)."""
  if len(outputs) != len(ids) or any(len(v) != len(ids) for v in per_row.values()):
    raise ValueError(f'{len(ids)} ids, {len(outputs)} outputs and per-row fields of '
                     f'{[len(v) for v in per_row.values()]}: one of each per example.')
  return {'task': task_spec(task).name,
          'golds': [{'id': i, 'output': o, **{k: v[n] for k, v in per_row.items()}}
                    for n, (i, o) in enumerate(zip(ids, outputs))]}


def write_predictions(path: str, task: str, ids: Sequence[str], outputs: Sequence[str],
                      **per_row: Sequence[Any]) -> None:
  """Writes a prediction file (`golds_file`) whole; the caller is the main process."""
  fileio.write_json(path, golds_file(task, ids, outputs, **per_row))


def read_predictions(path: str) -> dict[str, str]:
  """A prediction file -> {id: output}; the outputs are a model's, so they are not checked as
  golds are (parse_outputs)."""
  data = _load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('golds'), list):
    raise LampError(f'{path}: expected {{"task": ..., "golds": [{{"id", "output"}}]}}.')
  return {g['id']: g['output'] for g in data['golds']}


def raw_questions(config, split: str) -> tuple[str, list[dict], list[Example]]:
  """(questions file, its entries as read, the validated examples), from one read of the file:
  the prompts need every profile field, which the parsed profile items do not keep."""
  root = task_dir(config.data.lamp_dir, config.task, config.split_type)
  qfile, _ = split_files(root, split)
  examples = load_split(config.data.lamp_dir, config.task, split, config.split_type,
                        keep_raw=True)
  return qfile, [e.raw for e in examples], examples
