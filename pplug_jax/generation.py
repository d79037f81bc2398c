"""Generation over an eval split (every example once) and LaMP metrics; used by train and evaluate."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from pplug_jax import decoding, metrics as metrics_lib, tokenizers
from pplug_jax.data import pipeline
from pplug_jax.system import System


def decode_tokens(system: System, llm_params: dict, embedded: jax.Array, mask: jax.Array) -> jax.Array:
  """Greedy (eval.num_beams == 1) or beam search, as config.eval says."""
  e = system.config.eval
  if e.num_beams <= 1:
    return decoding.greedy(system.llm, llm_params, embedded, mask, e.max_new_tokens)
  tokens, _ = decoding.beam_search(system.llm, llm_params, embedded, mask, e.max_new_tokens,
                                   e.num_beams, e.length_penalty, e.early_stopping)
  return tokens


def make_generate_fn(system: System, persona: bool = True):
  """jit(trainable, llm_params, batch) -> (tokens, mean NLL, history attention weights)."""

  def fn(trainable, llm_params, batch):
    embedded, mask = system.inputs(trainable, llm_params, batch, persona=persona)
    tokens = decode_tokens(system, llm_params, embedded, mask)
    nll = system.loss_from_inputs(llm_params, embedded, mask, batch)
    if trainable is None:
      weights = jnp.zeros(batch['history_mask'].shape, jnp.float32)
    else:
      _, weights = system.soft_tokens(trainable, batch)
    return tokens, nll, weights

  return jax.jit(fn)


def generate_split(system: System, trainable: dict | None, records_dir: str, split: str,
                   batch_size: int, persona: bool = True, max_batches: int = -1,
                   desc: str = 'generate', explain_top_k: int = 0) -> dict[str, Any]:
  """Predictions and references {id: text}, mean target NLL, optional top-k explanations."""
  config = system.config
  tok = tokenizers.llm_tokenizer(config)
  mesh, rules = system.mesh, tuple(config.logical_axis_rules)
  gen = make_generate_fn(system, persona)
  num_batches, it = pipeline.eval_batches(config, records_dir, split, batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  preds, refs, explain, nll_sum, nll_n = {}, {}, {}, 0.0, 0
  start = time.time()
  for i, batch in enumerate(tqdm(it, total=num_batches, desc=desc, unit='batch', mininterval=5)):
    if i >= num_batches:
      break
    tokens, nll, weights = gen(trainable, system.llm_params, pipeline.to_global(batch, mesh, rules))
    texts = tok.batch_decode(pipeline.to_local(tokens, mesh, rules), skip_special_tokens=True)
    weights = pipeline.to_local(weights, mesh, rules)
    n_tok = int((batch['target_mask'] * batch['valid'][:, None]).sum())
    nll_sum += float(nll) * n_tok
    nll_n += n_tok
    for row, (eid, ref, text, ok) in enumerate(zip(batch['id'], batch['target_text'], texts,
                                                   batch['valid'])):
      if not ok:
        continue
      eid = eid.decode()
      preds[eid], refs[eid] = text.strip(), ref.decode()
      if explain_top_k > 0:
        top = np.argsort(-weights[row])[:explain_top_k]
        explain[eid] = [{'item_id': batch['history_item_ids'][row, j].decode(),
                         'weight': float(weights[row, j])}
                        for j in top if weights[row, j] > 0]
  if jax.process_count() > 1:  # every process ends with every example's prediction
    preds, refs, explain = (_merge_across_processes(d) for d in (preds, refs, explain))
    nll_sum, nll_n = (sum(_merge_across_processes({'v': x}, list_values=True)['v'])
                      for x in (nll_sum, nll_n))
  seconds = time.time() - start
  logging.info('%s: %d examples in %.1fs (%.1f examples/s)', desc, len(preds), seconds,
               len(preds) / max(seconds, 1e-9))
  return {'predictions': preds, 'references': refs, 'nll': nll_sum / max(nll_n, 1),
          'explanations': explain, 'examples_per_second': len(preds) / max(seconds, 1e-9)}


def _merge_across_processes(local: dict, list_values: bool = False) -> dict:
  """Gathers a JSON-able dict from every process (all-gather of padded UTF-8 bytes)."""
  import json
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([blob.size], np.int64)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  parts = multihost_utils.process_allgather(padded)
  merged: dict = {}
  for part, size in zip(parts.reshape(len(sizes), -1), sizes):
    for k, v in json.loads(part[:size].tobytes().decode()).items():
      if list_values:
        merged.setdefault(k, []).append(v)
      else:
        merged[k] = v
  return merged


def score(task: str, out: dict[str, Any]) -> dict[str, float]:
  """LaMP metrics of generate_split's output, plus the teacher-forced NLL."""
  ids = sorted(out['predictions'])
  m = metrics_lib.lamp_metrics(task, [out['predictions'][i] for i in ids],
                               [out['references'][i] for i in ids])
  m['nll'] = out['nll']
  return m
