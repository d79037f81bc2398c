"""Runs a retrieval baseline (or the plain model) over a LaMP split with the frozen LLM.

Each example's profile is ranked (`rank_profile`), the top k go into LaMP's prompt
(`rag_prompt`, its budget counted with the backbone's tokenizer), and the frozen backbone
(FlanT5 or decoder-only) generates with the config's settings (beam 4 for the paper), compiled
once for one static shape. The prompt becomes token ids exactly as a PPlug input does
(`tokenizers.LlmEncoding`). Predictions and metrics are written in the same
formats as `evaluate`, to `<workdir>/baselines/<method>_k<k>/`, with the prompts beside them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from pplug_jax import storage
from pplug_jax import fileio, generation, metrics as metrics_lib, partitioning, tokenizers
from pplug_jax import system as system_lib
from pplug_jax.baselines.prompts import rag_prompt
from pplug_jax.baselines.retrieval import (DENSE_METHODS, METHODS, ROPG_METHODS, check_fields,
                                           rank_profile)
from pplug_jax.data import lamp
from pplug_jax.data.lamp import raw_questions
from pplug_jax.errors import ConfigError
from pplug_jax.models import backbone, numerics
from pplug_jax.models.text_encoder import TextEncoder

NO_RETRIEVAL = 'none'


def method_dir(workdir: str, method: str, k: int) -> str:
  """Where a baseline's files go: <workdir>/baselines/none or <method>_k<k>."""
  name = NO_RETRIEVAL if method == NO_RETRIEVAL else f'{method}_k{k}'
  return os.path.join(workdir, 'baselines', name)


def ropg_retriever_dir(workdir: str, method: str) -> str:
  """Where `python -m pplug_jax.baselines.ropg` exports a trained retriever (HF directory)."""
  return os.path.join(workdir, 'ropg', method.split('-')[1], 'retriever')


def retriever_dtype(config) -> str:
  """The dense rankers' precision: config.encoder.dtype ('auto': bfloat16 on TPU/GPU)."""
  return numerics.resolve_dtype(config.encoder.dtype)


def dense_encoder(config, workdir: str, method: str) -> Any:
  """The TextEncoder a dense method ranks with: Contriever, or a trained ROPG retriever."""
  if method in ROPG_METHODS:
    return TextEncoder(ropg_retriever(workdir, method), config.rag.retriever_pooling, False,
                       retriever_dtype(config))
  if not config.rag.retriever_path:
    raise ConfigError("config.rag.retriever_path is empty: method 'contriever' needs a "
                      'Hugging Face directory of facebook/contriever.')
  return TextEncoder(config.rag.retriever_path, config.rag.retriever_pooling, False,
                     retriever_dtype(config))


def check_method(config, workdir: str, method: str, k: int) -> None:
  """The method and k are known, and what the method ranks with is there: checked first."""
  if method != NO_RETRIEVAL and method not in METHODS:
    raise ConfigError(f'--method={method!r}: use one of {(NO_RETRIEVAL,) + METHODS}.')
  if k < 1:
    raise ConfigError(f'--k={k}: retrieve at least one item.')
  if method in ROPG_METHODS:
    ropg_retriever(workdir, method)
  elif method == 'contriever' and not config.rag.retriever_path and not config.demo:
    raise ConfigError("config.rag.retriever_path is empty: method 'contriever' needs a "
                      'Hugging Face directory of facebook/contriever.')


def ropg_retriever(workdir: str, method: str) -> str:
  """The trained ROPG retriever's directory; refused, naming the command that trains it."""
  path = ropg_retriever_dir(workdir, method)
  if not storage.exists(os.path.join(path, 'model.safetensors')):
    raise ConfigError(f'{path}: no trained {method} retriever. Train it first: python -m '
                      f'pplug_jax.baselines.ropg --objective {method.split("-")[1]} '
                      f'--config ... --workdir {workdir}')
  return path


def llm_settings(config) -> dict[str, Any]:
  """What the frozen LLM's outputs depend on, for deciding whether saved outputs still hold.

  The weights are identified by path, size and modification time (hashing a 40 GB FlanT5-XXL
  on every run would cost minutes).
  """
  path = storage.abspath(config.llm.path)
  weights = sorted((n, storage.getsize(os.path.join(path, n)),
                    storage.mtime_ns(os.path.join(path, n)))
                   for n in storage.listdir(path) if n.endswith('.safetensors')) \
      if storage.isdir(path) else []
  return {'task': lamp.task_spec(config.task).name, 'split_type': config.split_type,
          'llm_name': config.llm.name, 'llm_path': path, 'llm_weights': [list(w) for w in weights],
          'llm_tokenizer': config.llm.tokenizer, 'vocab_limit': config.llm.vocab_limit,
          'chat_template': bool(config.llm.get('chat_template', False)),
          'llm_dtype': config.llm.dtype, 'rag_max_length': config.rag.max_length,
          'generation': {k: config.eval[k] for k in ('num_beams', 'length_penalty',
                                                       'early_stopping', 'max_new_tokens')}}


def build_prompts(config, questions: list[dict], method: str, k: int,
                  encoding: tokenizers.LlmEncoding,
                  encoder: Any = None) -> tuple[list[str], int]:
  """The LLM input of every question, and how many had an empty profile (plain input)."""
  budget = encoding.prompt_budget(config.rag.max_length)
  prompts, empty = [], 0
  for q in tqdm(questions, desc=f'prompts ({method})', unit='example', mininterval=5,
                disable=not partitioning.is_main_process()):
    if not q['profile']:
      empty += 1
    if method == NO_RETRIEVAL or not q['profile']:
      prompts.append(q['input'])
      continue
    items = rank_profile(config.task, q['input'], q['profile'], method, k, encoder,
                         seed=config.seed)
    prompts.append(rag_prompt(config.task, q['input'], items, encoding.tok, budget))
  return prompts, empty


class BaselineGenerator:
  """The frozen LLM and one jitted generation function for [eval batch, rag.max_length]."""

  def __init__(self, config, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.mesh = mesh or partitioning.make_mesh(config.mesh_shape)
    self.rules = tuple(config.logical_axis_rules)
    self.llm, self.llm_params = system_lib.load_llm(config, self.mesh)
    self.tokenizer = tokenizers.llm_tokenizer(config)
    self.encoding = tokenizers.llm_encoding(config, self.tokenizer)
    settings = generation.GenerationSettings.from_config(config)
    llm = self.llm

    def generate(llm_params, ids, mask):
      embedded = backbone.embed(llm, llm_params, ids)
      return generation.decode_tokens(llm, llm_params, embedded, mask, settings)

    self._generate = jax.jit(generate)

  def __call__(self, prompts: list[str]) -> list[str]:
    """Generated text for each prompt (every process passes, and gets, all of them)."""
    if not prompts:
      return []
    ids, mask = self.token_rows(prompts, self.config.rag.max_length)
    tokens = generation.over_host_rows(
        lambda i, m: self._generate(self.llm_params, i, m), (ids, mask),
        self.config.train.eval_batch_size * jax.process_count(), self.mesh, self.rules)
    return generation.decode_texts(self.tokenizer, tokens)

  def token_rows(self, prompts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, length] ids and mask: each prompt as a PPlug input is encoded (LlmEncoding), zero
    right-padded as in the records (an empty row keeps one token, so no row is all padding)."""
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
      tokens = self.encoding.input_ids(prompt, length) or [backbone.fill_id(self.llm.config)]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def run_settings(config, workdir: str, method: str, k: int, split: str,
                 qfile: str) -> dict[str, Any]:
  """What a baseline's outputs depend on: the LLM, the questions, the method and its retriever."""
  out = dict(llm_settings(config), method=method, k=k, split=split,
             questions_sha256=fileio.sha256_of([qfile]), seed=config.seed)
  if method == 'contriever':
    out['retriever'] = storage.abspath(config.rag.retriever_path)
  elif method in ROPG_METHODS:
    out['retriever_sha256'] = fileio.sha256_of(
        [os.path.join(ropg_retriever_dir(workdir, method), 'model.safetensors')])
  if method in DENSE_METHODS and retriever_dtype(config) != 'float32':
    out['retriever_dtype'] = retriever_dtype(config)  # only then: float32 runs made before match
  return out


def load_run(workdir: str, method: str, k: int, split: str) -> dict[str, Any]:
  """A finished run's files: {'settings', 'predictions' (id -> text), 'prompts', 'metrics'}."""
  out = method_dir(workdir, method, k)
  files = {'settings': f'run_{split}.json', 'predictions': f'predictions_{split}.json',
           'prompts': f'prompts_{split}.json', 'metrics': f'metrics_{split}.json'}
  read = {'predictions': lamp.read_predictions}
  loaded = {key: read.get(key, fileio.read_json)(os.path.join(out, name))
            for key, name in files.items() if storage.exists(os.path.join(out, name))}
  return loaded


def run(config, workdir: str, method: str, k: int, split: str = 'dev',
        generator: BaselineGenerator | None = None, encoder: Any = None,
        reuse: bool = False) -> dict[str, Any]:
  """One baseline over a split; writes predictions, metrics and prompts; returns the metrics.

  With `reuse`, a finished run of the same settings and inputs (`run_<split>.json`) is read
  back instead of generated again.
  """
  check_method(config, workdir, method, k)
  spec = lamp.task_spec(config.task)
  qfile, questions, examples = raw_questions(config, split)
  check_fields(spec.name, qfile, questions, method)
  settings = run_settings(config, workdir, method, k, split, qfile)
  if reuse:
    old = load_run(workdir, method, k, split)
    if old.get('settings') == settings and 'predictions' in old and 'prompts' in old:
      logging.info('%s (k=%s) on %s: reusing %s', method, k, split,
                   method_dir(workdir, method, k))
      return old.get('metrics', {'method': method, 'k': k, 'split': split})
  if method in DENSE_METHODS and encoder is None:
    encoder = dense_encoder(config, workdir, method)
  generator = generator or BaselineGenerator(config)
  start = time.time()
  prompts, empty = build_prompts(config, questions, method, k, generator.encoding, encoder)
  outputs = generator(prompts)
  ids = [q['id'] for q in questions]
  result: dict[str, Any] = {'method': method, 'k': None if method == NO_RETRIEVAL else k,
                            'split': split, 'count': len(ids), 'empty_profiles': empty,
                            'seconds': round(time.time() - start, 1)}
  golds = {}
  if split != 'test':
    golds = {e.id: e.output for e in examples}
    result.update(metrics_lib.lamp_metrics(spec.name, outputs, [golds[i] for i in ids]))
  out = method_dir(workdir, method, k)
  if partitioning.is_main_process():
    storage.makedirs(out, exist_ok=True)
    lamp.write_predictions(os.path.join(out, f'predictions_{split}.json'), spec.name, ids,
                           outputs)
    fileio.write_json(os.path.join(out, f'prompts_{split}.json'), dict(zip(ids, prompts)))
    if golds:
      fileio.write_json(os.path.join(out, f'metrics_{split}.json'), result)
    fileio.write_json(os.path.join(out, f'run_{split}.json'), settings)  # last: marks it done
  logging.info('%s (k=%s) on %s: %s', method, k, split, result)
  return result
