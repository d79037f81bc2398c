"""Inference for new users and inputs from a base LLM, an encoder and an exported plug.

    gen = PersonaPlugGenerator(llm_path, encoder_path, plug_dir)
    gen.add_history('alice', ['item text', ...])            # no retraining needed
    gen.generate(['input text'], user_ids=['alice'])         # or histories=[['item', ...]]
    gen.generate(['input text'], profiles=[[{'id': '1', 'description': ..., 'tag': ...,
                                             'date': '2020-01-31'}, ...]])  # LaMP items

The export records the training config, and every request goes through the code that made the
training and evaluation records (`features.build`, `features.serialize`, `pipeline.pad_example`)
and through evaluation's decoding (`generation.personalised_decode`): the same LLM input (plain
or the retrieval prompt), query (`data.query_source`), history order and size, lengths and
embedding precision as `evaluate`. A plug trained with retrieval (or time-aware) needs LaMP
profile items (`profiles=`, or dicts in add_history), since texts alone have no fields or dates.

Cold-start users (no history) work: their persona is zero and only the instruction token steers.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pplug_jax import storage
from pplug_jax import export, features, generation, partitioning, system as system_lib, tokenizers
from pplug_jax.data import buckets, lamp, pipeline
from pplug_jax.errors import UserError
from pplug_jax.models.text_encoder import TextEncoder

History = Sequence[str] | Sequence[dict]  # item texts (oldest first), or LaMP profile items


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


def _items(value, name: str) -> list[dict]:
  """A list of LaMP profile items (dicts)."""
  if isinstance(value, (str, bytes, dict)):
    raise TypeError(f'{name} must be a list of LaMP profile items (dicts), not a '
                    f'{type(value).__name__}.')
  value = list(value)
  bad = [type(v).__name__ for v in value if not isinstance(v, dict)]
  if bad:
    raise TypeError(f'{name} must hold LaMP profile items (dicts); found {bad[0]}.')
  return value


def serving_config(plug_config: dict[str, Any], llm_path: str | os.PathLike,
                   encoder_path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The training config recorded in an export, with this machine's model paths."""
  config = ml_collections.ConfigDict(plug_config['config'])
  recorded_tokenizer = config.llm.tokenizer
  with config.unlocked():
    config.llm.path = os.fspath(llm_path)
    config.encoder.path = os.fspath(encoder_path)
    # the recorded tokenizer when it is here ('byte' needs no files), else the LLM's own
    keep = recorded_tokenizer == 'byte' or (recorded_tokenizer and storage.isdir(recorded_tokenizer))
    config.llm.tokenizer = recorded_tokenizer if keep else ''
    config.mesh_shape = (1, 1)
    # queries embedded in the precision the records were made in ('auto' chose it there)
    config.encoder.dtype = plug_config.get('records_fingerprint', {}).get(
        'encoder_dtype', config.encoder.dtype)
  return config


class PersonaPlugGenerator:
  """Personalised generation with a frozen base LLM (FlanT5 or decoder-only) and an exported plug."""

  def __init__(self, llm_path: str, encoder_path: str, plug_path: str, dtype: str | None = None,
               num_beams: int | None = None, max_new_tokens: int | None = None):
    """dtype: the LLM's compute dtype (default: as trained); num_beams, max_new_tokens: override
    the recorded generation settings."""
    self.plug_config, trainable = export.load_export(plug_path)
    pc = self.plug_config
    config = serving_config(pc, llm_path, encoder_path)
    if dtype is not None:
      with config.unlocked():
        config.llm.dtype = dtype
    family = system_lib.llm_family(llm_path)
    if family != pc['llm'].get('family', 't5'):
      raise UserError(f'{plug_path} was trained for a {pc["llm"]["family"]} backbone '
                      f'({pc["llm"]["name"]}); {llm_path} is a {family} model. Give the base '
                      'model the plug was trained with.')
    self.config = config
    self.encoder = TextEncoder(encoder_path, config.encoder.pooling, config.encoder.normalize,
                               config.encoder.dtype, config.encoder.batch_size,
                               config.data.item_max_length)  # as precompute embeds
    if self.encoder.dim != pc['encoder']['dim']:
      raise UserError(f'{plug_path} expects {pc["encoder"]["dim"]}-d encoder embeddings '
                      f'({pc["encoder"]["name"]}); {encoder_path} gives {self.encoder.dim}.')
    mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
    self.system = system_lib.load_system(config, self.encoder.dim, mesh)
    if self.system.llm.config.d_model != pc['llm']['d_model']:
      raise UserError(f'{plug_path} was trained for d_model={pc["llm"]["d_model"]} '
                      f'({pc["llm"]["name"]}); {llm_path} has '
                      f'd_model={self.system.llm.config.d_model}.')
    if not math.isclose(self.system.plug.persona_scale, pc['persona_scale'], rel_tol=1e-4):
      raise UserError(f'{plug_path} was trained on a base model whose embeddings have mean norm '
                      f'{pc["persona_scale"]:.4g}; {llm_path} gives '
                      f'{self.system.plug.persona_scale:.4g}: another model. Give the base model '
                      'the plug was trained with.')
    settings = generation.GenerationSettings.from_config(config)
    overrides = {k: v for k, v in (('num_beams', num_beams), ('max_new_tokens', max_new_tokens))
                 if v is not None}
    self.settings = generation.GenerationSettings(**{**settings.__dict__, **overrides})
    self.tokenizer = tokenizers.llm_tokenizer(config)
    self.encoding = tokenizers.llm_encoding(config, self.tokenizer)
    self.spec = lamp.task_spec(config.task)
    self.trainable = jax.tree.map(jnp.asarray, trainable)
    self.histories: dict[str, list] = {}
    self._embeddings: dict[str, np.ndarray] = {}  # item text -> embedding, computed once

    def fn(trainable, llm_params, batch, persona):
      tokens, weights, _ = generation.personalised_decode(self.system, self.settings, trainable,
                                                          llm_params, batch, persona)
      return tokens, weights

    self._generate = {p: jax.jit(lambda t, l, b, p=p: fn(t, l, b, p)) for p in (True, False)}

  @property
  def needs_profiles(self) -> bool:
    """Whether this plug needs LaMP profile items, not texts: PPlug + retrieval builds its
    prompt from the items' fields, a time-aware plug reads their dates."""
    return features.needs_profile_fields(self.config) or pipeline.uses_dates(self.config)

  def add_history(self, user_id: str, history: History) -> int:
    """Adds a user's history items (texts or LaMP profile items; oldest first when undated);
    returns the user's item count."""
    name = f'add_history({user_id!r}, history)'
    given = list(history) if not isinstance(history, (str, bytes, dict)) else history
    if given and all(isinstance(x, dict) for x in given):
      new, kind = _items(given, name), dict
    else:
      new, kind = _texts(given, name), str
    old = self.histories.get(user_id, [])
    if old and new and not isinstance(old[0], kind):
      raise TypeError(f'{name}: user {user_id!r} has {type(old[0]).__name__} items; add the same '
                      'kind (texts or LaMP profile items).')
    self.histories[user_id] = old + new
    return len(self.histories[user_id])

  def _example(self, i: int, text: str, history: list, where: str
               ) -> tuple[lamp.Example, list[dict] | None]:
    """The LaMP example of one request, and its raw profile items (None for texts)."""
    if history and isinstance(history[0], dict):
      items = [dict(item, id=str(item.get('id', k))) for k, item in enumerate(history)]
      return lamp.parse_question({'id': str(i), 'input': text, 'profile': items}, self.spec,
                                 where), items
    if history and self.needs_profiles:
      what = ('retrieval' if features.needs_profile_fields(self.config) else 'time-aware')
      raise UserError(f'{where}: this plug was trained with {what} features '
                      f'(plug.retrieval={self.config.plug.retrieval!r}, plug.time_decay='
                      f'{self.config.plug.get("time_decay", "none")!r}); texts have no fields or '
                      "dates. Pass profiles= (LaMP profile items with their fields and 'date').")
    items = tuple(lamp.ProfileItem(str(k), t) for k, t in enumerate(history))
    return lamp.Example(str(i), text, self.spec.query(text), items), None

  def generate(self, inputs: Sequence[str], user_ids: Sequence[str] | None = None,
               histories: Sequence[Sequence[str]] | None = None,
               profiles: Sequence[Sequence[dict]] | None = None,
               return_weights: bool = False, on_unknown_user: str = 'raise',
               persona: bool = True):
    """Personalised outputs for a batch; each row's history is a stored user's, given texts
    (`histories`) or given LaMP profile items (`profiles`).

    A user id never given to add_history is an error (on_unknown_user='raise'), or is warned
    about and served as a cold-start user with no history (on_unknown_user='warn').
    With return_weights, also the history attention weights [n, max_history] over each row's
    kept items (oldest first). persona=False zeroes the persona token(s) (an ablation: what
    the history adds).
    """
    inputs = _texts(inputs, 'inputs')
    if on_unknown_user not in ('raise', 'warn'):
      raise ValueError(f"on_unknown_user={on_unknown_user!r}: use 'raise' or 'warn'.")
    if sum(x is not None for x in (user_ids, histories, profiles)) != 1:
      raise ValueError('Pass one of user_ids (after add_history), histories (texts per input) '
                       'or profiles (LaMP profile items per input).')
    n = len(inputs)
    if histories is not None:
      if isinstance(histories, str):
        raise TypeError('histories must be a list with one list of texts per input, not a str.')
      hist = [_texts(h, f'histories[{i}]') for i, h in enumerate(histories)]
    elif profiles is not None:
      if isinstance(profiles, (str, dict)):
        raise TypeError('profiles must be a list with one list of LaMP profile items per input.')
      hist = [_items(p, f'profiles[{i}]') for i, p in enumerate(profiles)]
    else:
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
      hist = [self.histories.get(u, []) for u in user_ids]
    if len(hist) != n:
      raise ValueError(f'{n} inputs but {len(hist)} histories.')
    if n == 0:
      return ([], np.zeros((0, 0), np.float32)) if return_weights else []
    where = 'profiles' if profiles is not None else 'histories' if histories is not None \
        else 'user_ids'
    feats = []
    for i, (text, h) in enumerate(zip(inputs, hist)):
      example, raw = self._example(i, text, list(h), f'{where}[{i}]')
      feats.append(features.build(self.config, example, self.tokenizer, raw))
    batch = self._batch(feats)
    tokens, weights = self._generate[persona](self.trainable, self.system.llm_params, batch)
    texts = generation.decode_texts(self.tokenizer, np.asarray(tokens)[:n])
    return (texts, np.asarray(weights)[:n]) if return_weights else texts

  def _batch(self, feats: list[features.Features]) -> dict[str, jax.Array]:
    """The requests' records, made, parsed and padded as precompute and evaluation do."""
    config, d = self.config, self.config.data
    _, query_emb = features.encode(config, self.encoder, feats, cache=self._embeddings,
                                   progress=False)
    serialized = [features.serialize(config, str(i), f, None, self.encoding, self.encoder,
                                     self._embeddings, q)
                  for i, (f, q) in enumerate(zip(feats, query_emb))]
    rows = buckets.pad_size(len(serialized), max(len(serialized), 8), minimum=1)
    serialized += serialized[:1] * (rows - len(serialized))  # a few row counts, few compiles
    length = max(len(self.encoding.input_ids(f.llm_input, d.max_input_length)) for f in feats)
    shape = (buckets.pad_size(length, d.max_input_length), 1)
    batch = pipeline.batch_of_records(config, serialized, self.encoder.dim, shape)
    return partitioning.to_global(batch, self.system.mesh, self.system.rules)
