"""Inference for new users and inputs from a base LLM, an encoder and an exported plug.

    gen = PersonaPlugGenerator(llm_path, encoder_path, plug_dir)
    gen.add_history('alice', ['item text', ...])            # no retraining needed
    gen.generate(['input text'], user_ids=['alice'])         # or histories=[['item', ...]]

Cold-start users (no history) work: their persona is zero and only the instruction token steers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from absl import logging
import numpy as np

from pplug_jax import export, generation, partitioning, tokenizers
from pplug_jax.data import buckets, lamp
from pplug_jax.models import bert as bert_lib, hf_weights, numerics, plug as plug_lib, t5 as t5_lib
from pplug_jax.models.text_encoder import TextEncoder
from pplug_jax.system import System


def _texts(value, name: str) -> list[str]:
  """A list of texts; a lone str is a TypeError (iterating it would give characters)."""
  if isinstance(value, (str, bytes)):
    raise TypeError(f'{name} must be a list of texts, not a {type(value).__name__}: wrap a '
                    'single text in a list.')
  value = list(value)
  bad = [type(v).__name__ for v in value if not isinstance(v, str)]
  if bad:
    raise TypeError(f'{name} must hold texts (str); found {bad[0]}.')
  return value


class PersonaPlugGenerator:
  """Personalised generation with a frozen FlanT5 and an exported plug."""

  def __init__(self, llm_path: str, encoder_path: str, plug_path: str, dtype: str = 'float32',
               num_beams: int | None = None, max_new_tokens: int | None = None):
    self.plug_config, trainable = export.load_export(plug_path)
    plug_config = self.plug_config
    llm_config, llm_params = hf_weights.load_t5(
        llm_path, dtype=numerics.as_dtype(dtype),
        vocab_limit=plug_config['llm'].get('vocab_limit', 0))
    if llm_config.d_model != plug_config['llm']['d_model']:
      raise ValueError(f'{plug_path} was trained for d_model={plug_config["llm"]["d_model"]} '
                       f'({plug_config["llm"]["name"]}); {llm_path} has '
                       f'd_model={llm_config.d_model}.')
    d = plug_config['data']
    self.encoder = TextEncoder(encoder_path, plug_config['encoder']['pooling'],
                               plug_config['encoder']['normalize'], max_length=d['item_max_length'])
    if self.encoder.dim != plug_config['encoder']['dim']:
      raise ValueError(f'{plug_path} expects {plug_config["encoder"]["dim"]}-d encoder embeddings '
                       f'({plug_config["encoder"]["name"]}); {encoder_path} gives '
                       f'{self.encoder.dim}.')
    gen = dict(plug_config['generation'])
    if num_beams is not None:
      gen['num_beams'] = num_beams
    if max_new_tokens is not None:
      gen['max_new_tokens'] = max_new_tokens
    self.settings = generation.GenerationSettings(**gen)
    self.tokenizer = tokenizers.load_llm_tokenizer(plug_config['llm']['tokenizer'], llm_path)
    self.task = lamp.task_spec(plug_config['task'])
    plug = plug_lib.PersonaPlug(self.encoder.dim, llm_config.d_model, plug_config['persona_scale'],
                                plug_config['instruction_scale'])
    query_encoder = None
    if 'query_encoder' in trainable:
      query_encoder = bert_lib.Bert(self.encoder.config)
    mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
    self.system = System(mesh, partitioning.STANDARD_RULES, t5_lib.T5(llm_config), llm_params,
                         plug, self.encoder.dim, query_encoder, trainable.get('query_encoder'))
    self.trainable = jax.tree.map(jnp.asarray, trainable)
    self.max_input_length = d['max_input_length']
    self.max_history = d['max_history']
    self.query_max_length = d['query_max_length']
    self.histories: dict[str, np.ndarray] = {}

    def fn(trainable, llm_params, batch):
      embedded, mask = self.system.encoder_inputs(trainable, llm_params, batch)
      _, weights = self.system.soft_tokens(trainable, batch)
      tokens = generation.decode_tokens(self.system.llm, llm_params, embedded, mask,
                                        self.settings)
      return tokens, weights

    self._generate = jax.jit(fn)

  def add_history(self, user_id: str, texts: Sequence[str]) -> int:
    """Embeds new history items (oldest first) for a user; returns the user's item count."""
    new = self.encoder.encode(_texts(texts, f'add_history({user_id!r}, texts)'))
    old = self.histories.get(user_id, np.zeros((0, self.encoder.dim), np.float32))
    self.histories[user_id] = np.concatenate([old, new])[-self.max_history:]
    return len(self.histories[user_id])

  def generate(self, inputs: Sequence[str], user_ids: Sequence[str] | None = None,
               histories: Sequence[Sequence[str]] | None = None,
               return_weights: bool = False, on_unknown_user: str = 'raise'):
    """Personalised outputs for a batch; each row's history is a stored user's or given texts.

    A user id never given to add_history is an error (on_unknown_user='raise'), or is warned
    about and served as a cold-start user with no history (on_unknown_user='warn').
    """
    inputs = _texts(inputs, 'inputs')
    if on_unknown_user not in ('raise', 'warn'):
      raise ValueError(f"on_unknown_user={on_unknown_user!r}: use 'raise' or 'warn'.")
    n = len(inputs)
    if histories is not None:
      if isinstance(histories, str):
        raise TypeError('histories must be a list with one list of texts per input, not a str.')
      hist = [self.encoder.encode(_texts(h, f'histories[{i}]')[-self.max_history:])
              for i, h in enumerate(histories)]
    elif user_ids is not None:
      if isinstance(user_ids, str):
        raise TypeError('user_ids must be a list with one id per input, not a str.')
      unknown = sorted({u for u in user_ids if u not in self.histories})
      if unknown and on_unknown_user == 'raise':
        raise KeyError(f'unknown user ids {unknown[:5]} ({len(unknown)} in all): call '
                       "add_history first, or pass on_unknown_user='warn' to serve them with no "
                       'history.')
      if unknown:
        logging.warning('%d unknown user ids (e.g. %s) get no history (cold start).',
                        len(unknown), unknown[:3])
      hist = [self.histories.get(u, np.zeros((0, self.encoder.dim), np.float32))
              for u in user_ids]
    else:
      raise ValueError('Pass user_ids (after add_history) or histories (texts per input).')
    if len(hist) != n:
      raise ValueError(f'{n} inputs but {len(hist)} histories.')
    if n == 0:
      return ([], np.zeros((0, 0), np.float32)) if return_weights else []
    h = buckets.pad_size(max([len(x) for x in hist] + [1]), self.max_history)
    history = np.zeros((n, h, self.encoder.dim), np.float32)
    history_mask = np.zeros((n, h), np.int32)
    for i, x in enumerate(hist):
      history[i, :len(x)] = x
      history_mask[i, :len(x)] = 1
    queries = [self.plug_config['encoder']['query_prefix'] + self.task.query(t) for t in inputs]
    enc = self.tokenizer(list(inputs), truncation=True, max_length=self.max_input_length,
                         padding='max_length', return_tensors='np')
    qenc = self.encoder.tokenizer(queries, truncation=True, max_length=self.query_max_length,
                                  padding='max_length', return_tensors='np')
    batch = {'input_ids': enc['input_ids'].astype(np.int32),
             'input_mask': enc['attention_mask'].astype(np.int32),
             'query_embedding': self.encoder.encode(queries),
             'query_encoder_ids': qenc['input_ids'].astype(np.int32),
             'query_encoder_mask': qenc['attention_mask'].astype(np.int32),
             'history': history, 'history_mask': history_mask}
    tokens, weights = self._generate(self.trainable, self.system.llm_params,
                                     {k: jnp.asarray(v) for k, v in batch.items()})
    texts = [t.strip() for t in self.tokenizer.batch_decode(np.asarray(tokens),
                                                            skip_special_tokens=True)]
    return (texts, np.asarray(weights)) if return_weights else texts
