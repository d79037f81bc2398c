"""Generation over an eval split (every example once) and LaMP metrics; used by train and evaluate."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from pplug_jax import metrics as metrics_lib
from pplug_jax import tokenizers
from pplug_jax.data import pipeline
from pplug_jax.system import System


def generate_split(system: System, trainable: dict | None, records_dir: str, split: str,
                   batch_size: int, persona: bool = True, max_batches: int = -1,
                   desc: str = 'generate') -> dict[str, Any]:
  """Predictions {id: text}, references {id: text} and the mean NLL over a split."""
  config = system.config
  tok = tokenizers.llm_tokenizer(config)
  mesh, rules = system.mesh, tuple(config.logical_axis_rules)
  max_new = config.eval.max_new_tokens

  @jax.jit
  def gen(trainable, llm_params, batch):
    embedded, mask = system.inputs(trainable, llm_params, batch, persona=persona)
    from pplug_jax import decoding
    tokens = decoding.greedy(system.llm, llm_params, embedded, mask, max_new)
    return tokens, system.loss_from_inputs(llm_params, embedded, mask, batch)

  num_batches, it = pipeline.eval_batches(config, records_dir, split, batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  preds, refs, nll_sum, nll_n = {}, {}, 0.0, 0
  start = time.time()
  for i, batch in enumerate(tqdm(it, total=num_batches, desc=desc, unit='batch', mininterval=5)):
    if i >= num_batches:
      break
    g = pipeline.to_global(batch, mesh, rules)
    tokens, nll = gen(trainable, system.llm_params, g)
    texts = tok.batch_decode(np.asarray(tokens), skip_special_tokens=True)
    valid = batch['valid'].astype(bool)
    n_tok = int((batch['target_mask'] * batch['valid'][:, None]).sum())
    nll_sum += float(nll) * n_tok
    nll_n += n_tok
    for eid, ref, text, ok in zip(batch['id'], batch['target_text'], texts, valid):
      if ok:
        preds[eid.decode()] = text.strip()
        refs[eid.decode()] = ref.decode()
  seconds = time.time() - start
  logging.info('%s: %d examples in %.1fs (%.1f examples/s)', desc, len(preds), seconds,
               len(preds) / max(seconds, 1e-9))
  return {'predictions': preds, 'references': refs, 'nll': nll_sum / max(nll_n, 1),
          'examples_per_second': len(preds) / max(seconds, 1e-9)}


def score(task: str, out: dict[str, Any]) -> dict[str, float]:
  """LaMP metrics of generate_split's output, plus the teacher-forced NLL."""
  ids = sorted(out['predictions'])
  m = metrics_lib.lamp_metrics(task, [out['predictions'][i] for i in ids],
                               [out['references'][i] for i in ids])
  m['nll'] = out['nll']
  return m
