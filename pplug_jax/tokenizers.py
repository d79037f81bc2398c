"""LLM and encoder tokenizers, chosen by config (transformers' tokenizers only, no models)."""

from __future__ import annotations

from typing import Any

from pplug_jax import storage
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
  tok = AutoTokenizer.from_pretrained(storage.local_model_dir(path))  # gs://: a local copy
  tok.name_or_path = path  # the name the records and checks record, never the local copy
  return check_tokenizer(tok, path)


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


def is_decoder_only_dir(path: str) -> bool:
  """Whether a Hugging Face directory holds a decoder-only LM (config.json model_type)."""
  import json
  import os
  file = os.path.join(path, 'config.json')
  if not path or not storage.exists(file):
    return False
  with storage.open(file) as f:
    return json.load(f).get('model_type', 't5') != 't5'


class LlmEncoding:
  """How LaMP text becomes the LLM's token ids, for training, evaluation and inference alike.

  T5: input and output each tokenized with the tokenizer's special tokens (a closing </s>).
  Decoder-only: the prompt is tokenizer(input) with its special tokens (BOS for Llama), or with
  chat_template the tokenizer's chat template around the input as one user turn with the
  generation prompt; the target is tokenizer(output) without special tokens, then EOS.
  """

  def __init__(self, tok: Any, decoder_only: bool, chat_template: bool = False,
               source: str = 'config.llm.path'):
    self.tok, self.decoder_only, self.chat_template = tok, decoder_only, chat_template
    if chat_template and not decoder_only:
      raise UserError('config.llm.chat_template=True is for decoder-only backbones; FlanT5 '
                      'takes the plain input. Set it to False.')
    if chat_template and not getattr(tok, 'chat_template', None):
      raise UserError(f'{source}: config.llm.chat_template=True but its tokenizer has no chat '
                      'template (tokenizer_config.json chat_template / chat_template.jinja). '
                      'Use an instruction-tuned model directory, or set it to False.')
    if decoder_only and getattr(tok, 'eos_token_id', None) is None:
      raise UserError(f'{source}: its tokenizer has no EOS token, so targets cannot end and '
                      'generation cannot stop. Use the model\'s own tokenizer files.')

  def input_ids(self, text: str, max_length: int) -> list[int]:
    """The prompt's ids, at most max_length of them."""
    if not self.chat_template:
      return self.tok(text, truncation=True, max_length=max_length)['input_ids']
    wrap = lambda t: self.tok.apply_chat_template(
        [{'role': 'user', 'content': t}], add_generation_prompt=True, tokenize=False)
    ids = self.tok(wrap(text), add_special_tokens=False)['input_ids']
    if len(ids) > max_length:  # cut the user's text, never the template around it
      overhead = len(self.tok(wrap(''), add_special_tokens=False)['input_ids'])
      content = self.tok(text, add_special_tokens=False)['input_ids']
      keep = self.tok.decode(content[:max(0, max_length - overhead)])
      ids = self.tok(wrap(keep), add_special_tokens=False)['input_ids'][:max_length]
    return ids

  def prompt_budget(self, max_length: int) -> int:
    """The budget for a prompt built by counting plain tokenizer ids (special tokens included,
    as LaMP's RAG prompts count them), so that input_ids(prompt, max_length) keeps it whole:
    max_length itself, less the chat template's frame when the template is on."""
    if not self.chat_template:
      return max_length
    frame = len(self.tok(self.tok.apply_chat_template(
        [{'role': 'user', 'content': ''}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)['input_ids'])
    return max(1, max_length - frame + len(self.tok('')['input_ids']))

  def target_ids(self, text: str, max_length: int) -> list[int]:
    """The target's ids (EOS-terminated for decoder-only), at most max_length of them."""
    if not self.decoder_only:
      return self.tok(text, truncation=True, max_length=max_length)['input_ids']
    ids = self.tok(text, add_special_tokens=False)['input_ids'][:max(0, max_length - 1)]
    return ids + [self.tok.eos_token_id]


def llm_encoding(config, tok: Any | None = None) -> LlmEncoding:
  """The LlmEncoding of config.llm (its family from config.llm.path's config.json)."""
  tok = tok if tok is not None else llm_tokenizer(config)
  return LlmEncoding(tok, is_decoder_only_dir(config.llm.path),
                     bool(config.llm.get('chat_template', False)), config.llm.path)


BYTE_SPECIALS = ('<pad>', '<s>', '</s>')  # ids 0, 1, 2; the 256 bytes follow


def save_byte_level_tokenizer(path: str, chat_template: str | None = None) -> int:
  """Writes a byte-level tokenizer (no merges: one token per UTF-8 byte) into a model directory.

  Llama-style: <s> (BOS) in front of every text, </s> the EOS, <pad> id 0. transformers loads
  it with AutoTokenizer (tokenizer.json). Returns its vocabulary size.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {t: i for i, t in enumerate(BYTE_SPECIALS + tuple(alphabet))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.add_special_tokens(list(BYTE_SPECIALS))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A $B',
                                                     special_tokens=[('<s>', 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', bos_token='<s>',
                                 eos_token='</s>')
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(path)
  return len(vocab)

