"""Retrieval-based personalisation as LaMP does it: per-task query and corpus, then a ranker.

Follows LaMP-Benchmark/LaMP (`LaMP/prompts/prompts.py`, `utils.py`, `rank_profiles.py`):

| task | query | corpus item |
|---|---|---|
| 1 | the 2nd and 3rd quoted strings of the input | `title abstract` |
| 2 | text after `description:` | description |
| 3 | text after `review:` | text |
| 4 | text after `article:` | `title text` |
| 5 | text after `paper:` | `title abstract` |
| 6 | text after the first `:` | text |
| 7 | text after the first `:` | text |

Rankers: BM25 (`rank_bm25.BM25Okapi` over whitespace tokens, `get_top_n` order, ties as numpy's
argsort leaves them), recency (by the date's integer tuple, newest first), Contriever (masked
mean pooling, unnormalised dot product) and random (`random.choices`, with replacement, as LaMP).
ROPG-KD and ROPG-RL rank like Contriever with their trained encoder, over ROPG's corpus, where
each item's text ends with `" date: {date}"` (LaMP's `ROPG/prompts/prompts.py`).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

from pplug_jax.data import lamp

ROPG_METHODS = ('ropg-kd', 'ropg-rl')
METHODS = ('bm25', 'recency', 'contriever', 'random') + ROPG_METHODS
DENSE_METHODS = ('contriever',) + ROPG_METHODS

def task_name(task: Any) -> str:
  """'LaMP_2', 'LaMP-2', '2' or 2 -> 'LaMP_2'."""
  return lamp.task_spec(task).name


def query_and_corpus(task: Any, question_input: str,
                     profile: Sequence[dict]) -> tuple[str, list[str]]:
  """LaMP's retrieval query for an input and the corpus text of each profile item."""
  spec = lamp.task_spec(task)
  query = spec.retrieval_query(question_input)
  if query is None:
    raise lamp.LampError(f'{spec.name}: cannot find the retrieval query in the input '
                         f'{question_input[:80]!r} (LaMP would fail here too); is config.task '
                         'right?')
  corpus = [' '.join(str(item[f]) for f in spec.corpus_fields) for item in profile]
  return query, corpus


def ropg_query_and_corpus(task: Any, question_input: str,
                          profile: Sequence[dict]) -> tuple[str, list[str]]:
  """ROPG's query and corpus: LaMP's, with `" date: {date}"` after each item's text."""
  query, corpus = query_and_corpus(task, question_input, profile)
  return query, [f'{text} date: {item["date"]}' for text, item in zip(corpus, profile)]


def _date_key(item: dict) -> tuple[int, ...]:
  return tuple(map(int, str(item['date']).split('-')))


def rank_profile(task: Any, question_input: str, profile: Sequence[dict], method: str, k: int,
                 encoder: Any = None, seed: int = 0) -> list[dict]:
  """The k profile items LaMP would put in the prompt, best first.

  `encoder` (for 'contriever', 'ropg-kd' and 'ropg-rl') is any object with
  `encode(texts) -> [n, d]`, e.g. a `pplug_jax.models.text_encoder.TextEncoder` over
  facebook/contriever, or over a retriever `python -m pplug_jax.baselines.ropg` trained and
  exported (`<workdir>/ropg/<kd|rl>/retriever`), with mean pooling.
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r}: use one of {METHODS} (or none for no retrieval).')
  if k < 1:
    raise ValueError(f'k={k}: retrieve at least one item.')
  profile = list(profile)
  if not profile:
    return []
  if method == 'recency':
    return sorted(profile, key=_date_key)[-k:][::-1]
  if method == 'random':
    return random.Random(seed).choices(profile, k=k)
  make = ropg_query_and_corpus if method in ROPG_METHODS else query_and_corpus
  query, corpus = make(task, question_input, profile)
  if method == 'bm25':
    from rank_bm25 import BM25Okapi
    return BM25Okapi([doc.split() for doc in corpus]).get_top_n(query.split(), profile, n=k)
  if encoder is None:
    raise ValueError(f'method={method!r} needs encoder= (a TextEncoder of facebook/contriever or '
                     'of a trained ROPG retriever).')
  scores = encoder.encode(corpus) @ encoder.encode([query])[0]
  order = np.argsort(-scores, kind='stable')[:k]
  return [profile[i] for i in order]

def check_fields(task: str, qfile: str, questions: list[dict], method: str) -> None:
  """Every profile item has the fields the task's prompt (and the ranker) reads."""
  dated = method in ('recency',) + ROPG_METHODS
  need = lamp.task_spec(task).required_fields + (('date',) if dated else ())
  for q in questions:
    for item in q['profile']:
      missing = [f for f in need if item.get(f) is None]
      if missing:
        raise lamp.LampError(f'{qfile}: example id {q["id"]}, profile item {item.get("id")}: '
                             f'missing field(s) {missing}, which the {method} baseline needs.')
