"""An example's model features from a LaMP example and the settings: the one code path.

Precompute (training and evaluation records) and the inference API (`PersonaPlugGenerator`)
both call `build` and `serialize`, so a plug is served with exactly the inputs it was trained on:

- the LLM input text: the plain input, or with `plug.retrieval` the LaMP prompt of the top
  `plug.retrieval_k` profile items (PPlug + retrieval);
- the query text whose embedding steers the history attention (`data.query_source`, with
  `encoder.query_prefix`);
- the history: the `data.max_history` most recent items in `data.history_order`, with their
  texts, dates and ids.

`serialize` then turns features plus their embeddings into the record every later stage reads
(`pipeline.pad_example` pads it the same way for training, evaluation and inference).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from pplug_jax import tokenizers
from pplug_jax.baselines.prompts import rag_prompt
from pplug_jax.baselines.retrieval import check_fields, rank_profile
from pplug_jax.data import lamp, records


@dataclasses.dataclass(frozen=True)
class Features:
  """What the plug and the LLM see of one example, before any embedding or tokenisation."""
  llm_input: str                           # the text the LLM's input ids are made from
  query: str                               # the encoder's query text (prefix included)
  history: tuple[lamp.ProfileItem, ...]    # the kept items, oldest first


def query_text(config, example: lamp.Example, llm_tok: Any) -> str:
  """The text whose embedding steers the history attention (without the encoder's prefix).

  data.query_source='input': the task's query from the whole input. 'truncated_input' (the
  official code): decode(encode(input)[:max_input_length][:-1]), then its query rule.
  """
  if config.data.query_source == 'input':
    return example.query
  ids = llm_tok(example.input)['input_ids'][:config.data.max_input_length][:-1]
  return lamp.official_query(config.task, llm_tok.decode(ids))


def needs_profile_fields(config) -> bool:
  """Whether `build` needs each example's raw LaMP profile items (every field, not only text)."""
  return bool(config.plug.retrieval)


def check_profile_fields(config, where: str, questions: Sequence[dict]) -> None:
  """Every profile item has the fields the retrieval prompt reads (else a LampError naming it)."""
  check_fields(config.task, where, list(questions), config.plug.retrieval)


def llm_input(config, example: lamp.Example, llm_tok: Any,
              raw_profile: Sequence[dict] | None) -> str:
  """The plain input, or with config.plug.retrieval the LaMP prompt of its top retrieval_k
  profile items within data.max_input_length tokens (the plain input when it has none)."""
  if not config.plug.retrieval or not example.profile:
    return example.input
  if raw_profile is None:
    raise ValueError(f'example {example.id}: config.plug.retrieval={config.plug.retrieval!r} '
                     'builds the LaMP prompt from the profile items\' fields; pass them.')
  items = rank_profile(config.task, example.input, list(raw_profile), config.plug.retrieval,
                       config.plug.retrieval_k, seed=config.seed)
  budget = config.data.max_input_length
  if config.llm.get('chat_template', False):  # the template's frame comes out of the budget
    budget = tokenizers.llm_encoding(config, llm_tok).prompt_budget(budget)
  return rag_prompt(config.task, example.input, items, llm_tok, budget)


def build(config, example: lamp.Example, llm_tok: Any,
          raw_profile: Sequence[dict] | None = None) -> Features:
  """The features of one example under `config` (raw_profile: its LaMP profile dicts, needed
  when needs_profile_fields(config))."""
  history = lamp.recent_history(example.profile, config.data.max_history,
                                config.data.history_order)
  return Features(llm_input(config, example, llm_tok, raw_profile),
                  config.encoder.query_prefix + query_text(config, example, llm_tok), history)


def serialize(config, example_id: str, feats: Features, output: str | None, encoding: Any,
              encoder: Any, item_embeddings: dict[str, np.ndarray],
              query_embedding: np.ndarray) -> bytes:
  """The record of one example: token ids, embeddings (keyed by item text) and history fields.

  `encoding` is `tokenizers.llm_encoding(config, ...)`; `encoder` the TextEncoder (its
  tokenizer gives the query's encoder ids for a fine-tuned input encoder).
  """
  d = config.data
  hist = feats.history
  h_emb = (np.stack([item_embeddings[i.text] for i in hist]) if hist else
           np.zeros((0, encoder.dim), np.float32))
  return records.serialize_example(
      example_id=example_id,
      input_ids=encoding.input_ids(feats.llm_input, d.max_input_length),
      target_ids=encoding.target_ids(output, d.max_target_length) if output is not None else [],
      target_text=output or '',
      query_embedding=query_embedding,
      query_encoder_ids=encoder.tokenize([feats.query], d.query_max_length)[0],
      history_embeddings=h_emb, history_dates=[i.date for i in hist],
      history_item_ids=[i.id for i in hist], embedding_dtype=d.embedding_dtype)


def encode(config, encoder: Any, feats: Sequence[Features],
           cache: dict[str, np.ndarray] | None = None, progress: bool = True
           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Embeddings of the history texts (keyed by text; items at data.item_max_length, the
  encoder's own length) and of the queries (at data.query_max_length).

  With `cache` (text -> embedding, updated here) only texts not in it are encoded, and the
  cache itself is returned as the item table.
  """
  table = {} if cache is None else cache
  unique = list(dict.fromkeys(i.text for f in feats for i in f.history if i.text not in table))
  if unique:
    bar = 'history items' if progress else None
    table.update(zip(unique, encoder.encode(unique, progress=bar)))
  query_emb = encoder.encode([f.query for f in feats], progress='queries' if progress else None,
                             max_length=config.data.query_max_length)
  return table, query_emb
