"""LLM and encoder tokenizers, chosen by config (transformers' tokenizers only, no models)."""

from __future__ import annotations

from typing import Any

from pplug_jax.errors import UserError

_SAMPLE = 'The quick brown fox jumps over the lazy dog, and then it reads a book about movies.'


def check_tokenizer(tok: Any, path: str) -> Any:
  """Refuses a tokenizer that maps plain English mostly to <unk> (its files are missing)."""
  unk = getattr(tok, 'unk_token_id', None)
  if unk is None:
    return tok
  ids = tok(_SAMPLE, add_special_tokens=False)['input_ids']
  if not ids or sum(i == unk for i in ids) / len(ids) > 0.25:
    raise UserError(f'{path}: its tokenizer maps plain English to <unk> ({ids[:12]}...): the '
                    'tokenizer files are missing (tokenizer.json, spiece.model or vocab.txt, '
                    'with tokenizer_config.json). Download them from the same Hugging Face '
                    'model into this directory.')
  return tok


def load_tokenizer(path: str) -> Any:
  """The Hugging Face tokenizer saved in a model directory, checked to be a real one."""
  from transformers import AutoTokenizer
  return check_tokenizer(AutoTokenizer.from_pretrained(path), path)


def llm_tokenizer(config) -> Any:
  """config.llm.tokenizer: 'byte' (ByT5 bytes, needs no files) or a directory; '' = llm.path."""
  return load_llm_tokenizer(config.llm.tokenizer, config.llm.path)


def load_llm_tokenizer(tokenizer: str, llm_path: str) -> Any:
  """'byte' is the ByT5 byte tokenizer; a directory is loaded (and checked); '' means llm_path."""
  name = tokenizer or llm_path
  if name == 'byte':
    from transformers import ByT5Tokenizer
    return ByT5Tokenizer(extra_ids=0)
  if not name:
    raise UserError('config.llm.path is empty: download FlanT5 (e.g. google/flan-t5-xxl) as a '
                    'Hugging Face directory and set --config.llm.path=DIR.')
  return load_tokenizer(name)


def tokenizer_name(tok: Any) -> str:
  return f'{type(tok).__name__}:{getattr(tok, "name_or_path", "")}:{len(tok)}'
