"""LLM and encoder tokenizers, chosen by config (transformers' tokenizers only, no models)."""

from __future__ import annotations

from typing import Any


def llm_tokenizer(config) -> Any:
  """config.llm.tokenizer: 'byte' (ByT5 bytes, needs no files) or a directory; '' = llm.path."""
  name = config.llm.tokenizer or config.llm.path
  if name == 'byte':
    from transformers import ByT5Tokenizer
    return ByT5Tokenizer(extra_ids=0)
  if not name:
    raise ValueError('config.llm.path is empty: download FlanT5 (e.g. google/flan-t5-xxl) as a '
                     'Hugging Face directory and set --config.llm.path=DIR.')
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(name)


def encoder_tokenizer(config) -> Any:
  if not config.encoder.path:
    raise ValueError('config.encoder.path is empty: download the encoder (e.g. '
                     'BAAI/bge-base-en-v1.5) as a Hugging Face directory and set '
                     '--config.encoder.path=DIR.')
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(config.encoder.path)


def tokenizer_name(tok: Any) -> str:
  return f'{type(tok).__name__}:{getattr(tok, "name_or_path", "")}:{len(tok)}'
