"""One `TaskSpec` per LaMP task: everything that differs between the tasks, in one place.

Each spec holds, side by side:
- the output: its kind, labels, the longest target, the main metric and the table's metrics;
- PPlug's rules: the profile fields joined into a history item's text, the query this package
  embeds, and the marker the official PPlug code cuts its query at (`official_marker`);
- LaMP's retrieval rules (LaMP/prompts/utils.py): the query a ranker gets, the corpus fields of
  an item, and the fields every item must have for the task's prompt;
- LaMP's retrieval-augmented prompt (`create_*_prompt` in LaMP/prompts/prompts.py), applied by
  `baselines/prompts.py`.
LongLaMP's long-form tasks (Kumar et al., 2024) are specs of the same kind in `LONGLAMP_TASKS`,
with the rules of LongLaMP's code (longLaMP/prompts/prompts.py): the query PPlug embeds is the
whole input, and a history item's text is the item's retrieval corpus text.
The two LaMP query rules differ on purpose (LaMP-7: PPlug reads after 'before or after it:', LaMP's
rankers after the first ':'); both are the references' own. Adding a task is adding one spec.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from pplug_jax.errors import UserError

LAMP2_TAGS = ('sci-fi', 'based on a book', 'comedy', 'action', 'twist ending', 'dystopia',
              'dark comedy', 'classic', 'psychology', 'fantasy', 'romance', 'thought-provoking',
              'social commentary', 'violence', 'true story')


class LampError(UserError):
  """Bad LaMP data; the message names the file and example id."""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """How one task lays out a retrieved item: which field is cut, and the text around it."""
  field: str                                  # the free text that is truncated
  frame: Callable[[dict], str] | int          # what the budget counts besides that text
  piece: Callable[[dict, str], str]           # the item as written, given its cut text
  assemble: Callable[[str, str], str]         # (input, joined pieces) -> prompt
  header: str | None = None                   # reserved once, before the per-item split
  minus_one: bool = True                      # LaMP-1 alone has no `- 1` in the split


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What differs between the LaMP tasks (see the module's docstring)."""
  name: str
  kind: str                                   # 'classification' | 'regression' | 'generation'
  labels: tuple[str, ...]
  max_target_length: int
  main_metric: str
  metric_mode: str                            # 'max' | 'min': which way the main metric is better
  table_metrics: tuple[tuple[str, str, bool], ...]  # (metric key, label, higher is better)
  # PPlug
  profile_fields: tuple[str, ...]             # joined with a space into a history item's text
  query: Callable[[str], str]                 # the query the plug embeds
  official_marker: str | None                 # the official code's query marker (None: LaMP-1's
                                              # own rule, or none at all)
  # LaMP's retrieval baselines
  retrieval_query: Callable[[str], str | None]  # None: the input has no query (LaMP fails too)
  corpus_fields: tuple[str, ...]              # an item's text for the rankers
  required_fields: tuple[str, ...]            # what the prompt and the corpus read
  prompt: PromptSpec | None                   # None: LongLaMP's prompts (not yet built)
  # the files: 'lamp' ({split}_questions.json + {split}_outputs.json), 'longlamp' (the
  # Hugging Face release: one table per split of {input, output, profile}, no ids) or
  # 'longlamp_email' (LongLaMP's Avocado builder: questions + a plain list of outputs)
  file_format: str = 'lamp'
  folder: str = ''                            # LongLaMP: the subset, before _user/_temporal


def _after(marker: str) -> Callable[[str], str]:
  """PPlug's query: the text after `marker`, or the whole input without it."""
  def extract(text: str) -> str:
    i = text.find(marker)
    return text[i + len(marker):].strip() if i >= 0 else text.strip()
  return extract


def _first_quoted(text: str) -> str:
  m = re.search(r'"(.*?)"', text)
  return m.group(1).strip() if m else text.strip()


def _lamp_after(marker: str) -> Callable[[str], str | None]:
  """LaMP's retrieval query: the text after `marker`, or None without it."""
  def extract(text: str) -> str | None:
    i = text.find(marker)
    return None if i < 0 else text[i + len(marker):].strip()
  return extract


def quoted_strings(text: str) -> list[str]:
  """The strings between successive pairs of double quotes (an unclosed one is dropped)."""
  parts = text.split('"')
  return [parts[i] for i in range(1, len(parts) - 1, 2)]


def _citation_query(text: str) -> str | None:
  """LaMP-1's retrieval query: the two candidate titles."""
  quoted = quoted_strings(text)
  return f'{quoted[1]} {quoted[2]}' if len(quoted) >= 3 else None


def _after_title(question_input: str, joined: str) -> str:
  i = question_input.find('title')
  if i < 0:
    return question_input
  return question_input[:i + 5] + ', and ' + joined + question_input[i + 5:]


def _before(x: str, j: str) -> str:
  return f'{j}. {x}'


_ROUGE = (('rouge-1', 'ROUGE-1', True), ('rouge-L', 'ROUGE-L', True))
_TITLE_FOR = (lambda p: f'"{p["title"]}" is the title for " " ',
              lambda p, t: f'"{p["title"]}" is the title for "{t}" ')

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec(
        'LaMP_1', 'classification', ('[1]', '[2]'), 128, 'accuracy', 'max',
        (('accuracy', 'Accuracy', True),),
        profile_fields=('title', 'abstract'), query=_first_quoted, official_marker=None,
        retrieval_query=_citation_query, corpus_fields=('title', 'abstract'),
        required_fields=('title', 'abstract'),
        prompt=PromptSpec('title', 2, lambda p, t: f'"{t}"', _after_title, minus_one=False)),
    TaskSpec(
        'LaMP_2', 'classification', LAMP2_TAGS, 128, 'accuracy', 'max',
        (('accuracy', 'Accuracy', True), ('f1', 'F1', True)),
        profile_fields=('description',), query=_after('description:'),
        official_marker='description: ',
        retrieval_query=_lamp_after('description:'), corpus_fields=('description',),
        required_fields=('description', 'tag'),
        prompt=PromptSpec('description', lambda p: f'the tag for the movie: " " is "{p["tag"]}" ',
                          lambda p, t: f'the tag for the movie: "{t}" is "{p["tag"]}" ',
                          _before)),
    TaskSpec(
        'LaMP_3', 'regression', ('1', '2', '3', '4', '5'), 10, 'mae', 'min',
        (('mae', 'MAE', False), ('rmse', 'RMSE', False)),
        profile_fields=('text',), query=_after('review:'), official_marker='review: ',
        retrieval_query=_lamp_after('review:'), corpus_fields=('text',),
        required_fields=('text', 'score'),
        prompt=PromptSpec('text', lambda p: f'{p["score"]} is the score for " " ',
                          lambda p, t: f'{p["score"]} is the score for "{t}" ', _before)),
    TaskSpec(
        'LaMP_4', 'generation', (), 128, 'rouge-1', 'max', _ROUGE,
        profile_fields=('text', 'title'), query=_after('article:'), official_marker='article: ',
        retrieval_query=_lamp_after('article:'), corpus_fields=('title', 'text'),
        required_fields=('title', 'text'),
        prompt=PromptSpec('text', *_TITLE_FOR, _before)),
    TaskSpec(
        'LaMP_5', 'generation', (), 128, 'rouge-1', 'max', _ROUGE,
        profile_fields=('title', 'abstract'), query=_after('paper:'), official_marker='paper: ',
        retrieval_query=_lamp_after('paper:'), corpus_fields=('title', 'abstract'),
        required_fields=('title', 'abstract'),
        prompt=PromptSpec('abstract', lambda p: f'"{p["title"]}" is a title " " ',
                          lambda p, t: f'"{p["title"]}" is a title for "{t}" ',
                          lambda x, j: f'{j}. Following the given patterns {x}',
                          header='Following the given patterns')),
    TaskSpec(
        'LaMP_6', 'generation', (), 128, 'rouge-1', 'max', _ROUGE,
        profile_fields=('text', 'title'), query=_after(':'), official_marker=None,
        retrieval_query=_lamp_after(':'), corpus_fields=('text',),
        required_fields=('title', 'text'),
        prompt=PromptSpec('text', *_TITLE_FOR, _before)),
    TaskSpec(
        'LaMP_7', 'generation', (), 128, 'rouge-1', 'max', _ROUGE,
        profile_fields=('text',), query=_after('before or after it:'),
        official_marker='before or after it: ',
        retrieval_query=_lamp_after(':'), corpus_fields=('text',), required_fields=('text',),
        prompt=PromptSpec('text', lambda p: '"" ', lambda p, t: f'"{t}" ',
                          lambda x, j: f'{j} are written by a person. Following the given '
                                       f'patterns {x}',
                          header='are written by user. Following the given patterns')),
)}


def _stripped(text: str) -> str:
  return text.strip()


def _whole(text: str) -> str:
  return text


_LONG_METRICS = _ROUGE + (('meteor', 'METEOR', True),)


def _longlamp(name: str, corpus: tuple[str, ...], retrieval_query: Callable[[str], str | None],
              required: tuple[str, ...], file_format: str = 'longlamp') -> TaskSpec:
  """A LongLaMP task: long generated text, PPlug's history = the retrieval corpus' text."""
  return TaskSpec(
      f'LongLaMP_{name}', 'generation', (), 512, 'rouge-1', 'max', _LONG_METRICS,
      profile_fields=corpus, query=_stripped, official_marker=None,
      retrieval_query=retrieval_query, corpus_fields=corpus, required_fields=required,
      prompt=None, file_format=file_format, folder=name)


# LongLaMP's corpus texts and retrieval queries (generate_query_for_* in prompts.py). The Hugging
# Face release names a topic-writing item's fields summary/content, which LongLaMP's code reads as
# input/output.
LONGLAMP_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    _longlamp('abstract_generation', ('title', 'abstract'), _lamp_after('items:'),
              ('title', 'abstract')),
    _longlamp('product_review', ('overall', 'summary', 'description', 'reviewText'), _whole,
              ('overall', 'summary', 'description', 'reviewText')),
    _longlamp('topic_writing', ('summary', 'content'), _whole, ('summary', 'content')),
    _longlamp('email_completion', ('text',), _lamp_after(':'), ('title', 'text'),
              file_format='longlamp_email'),
)}


def longlamp_spec(task: str) -> TaskSpec:
  """'LongLaMP_product_review' or 'product_review' -> its TaskSpec."""
  key = task if task.startswith('LongLaMP_') else f'LongLaMP_{task}'
  if key not in LONGLAMP_TASKS:
    raise LampError(f'Unknown LongLaMP task {task!r}; use one of {sorted(LONGLAMP_TASKS)}.')
  return LONGLAMP_TASKS[key]


def task_spec(task: str | int) -> TaskSpec:
  """'LaMP_2', 'LaMP-2', '2' or 2 -> its TaskSpec."""
  key = str(task).replace('-', '_')
  key = key if key.startswith('LaMP_') else f'LaMP_{key}'
  if key not in TASKS:
    raise LampError(f'Unknown LaMP task {task!r}; config.task must be one of {sorted(TASKS)}.')
  return TASKS[key]
