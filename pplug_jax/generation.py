"""Split-wide generation for evaluation: every example once, compiled once, LaMP-scored.

`decoding.py` holds the token-level searches (greedy, beam). This module runs them over a
records split with the system's soft tokens, gathers the predictions of every process, and
scores them with the official metrics. Generation settings are explicit (`GenerationSettings`),
and a `SplitGenerator` keeps its jitted functions and tokenizer for every later evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from pplug_jax import decoding, metrics as metrics_lib, partitioning, tokenizers
from pplug_jax.data import pipeline
from pplug_jax.models import backbone
from pplug_jax.system import System


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """How to decode: greedy when num_beams == 1, else beam search with HF semantics."""
  num_beams: int = 4
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  max_new_tokens: int = 128

  @classmethod
  def from_config(cls, config) -> 'GenerationSettings':
    e = config.eval
    return cls(int(e.num_beams), float(e.length_penalty), e.early_stopping,
               int(e.max_new_tokens))


def decode_tokens(llm: backbone.Model, llm_params: dict, embedded: jax.Array, mask: jax.Array,
                  settings: GenerationSettings) -> jax.Array:
  """Generated tokens [B, max_new_tokens] (new tokens only) after the input embeddings."""
  if settings.num_beams <= 1:
    return decoding.greedy(llm, llm_params, embedded, mask, settings.max_new_tokens)
  tokens, _ = decoding.beam_search(llm, llm_params, embedded, mask, settings.max_new_tokens,
                                   settings.num_beams, settings.length_penalty,
                                   settings.early_stopping)
  return tokens


def personalised_decode(system: System, settings: GenerationSettings, trainable: dict | None,
                        llm_params: dict, batch: dict, persona: bool = True):
  """(tokens, history weights, (input embeddings, mask)) of a batch: what evaluation and the
  inference API both run; trainable=None is the plain frozen model."""
  embedded, mask = system.encoder_inputs(trainable, llm_params, batch, persona=persona)
  tokens = decode_tokens(system.llm, llm_params, embedded, mask, settings)
  if trainable is None:
    weights = jnp.zeros(batch['history_mask'].shape, jnp.float32)
  else:
    _, weights = system.soft_tokens(trainable, batch)
  return tokens, weights, (embedded, mask)


def decode_texts(tokenizer, tokens: np.ndarray) -> list[str]:
  """Generated token rows -> output texts, special tokens dropped and stripped."""
  return [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


class SplitGenerator:
  """Generates over record splits for one system; each variant (plug, persona) compiles once."""

  def __init__(self, system: System, config, settings: GenerationSettings | None = None):
    self.system = system
    self.config = config  # the data settings of the records (lengths, history size)
    self.settings = settings or GenerationSettings.from_config(config)
    self._tokenizer = None
    self._fns: dict[bool, Callable] = {}

  @property
  def tokenizer(self) -> Any:
    """The LLM tokenizer, loaded once on first use (planning compiles need none)."""
    if self._tokenizer is None:
      self._tokenizer = tokenizers.llm_tokenizer(self.config)
    return self._tokenizer

  def jitted(self, persona: bool = True) -> Callable:
    """jit(trainable, llm_params, batch) -> (tokens, mean NLL, history weights), built once."""
    if persona not in self._fns:
      system, settings = self.system, self.settings

      def fn(trainable, llm_params, batch):
        tokens, weights, (embedded, mask) = personalised_decode(system, settings, trainable,
                                                                llm_params, batch, persona)
        nll = system.loss_from_inputs(llm_params, embedded, mask, batch)
        return tokens, nll, weights

      self._fns[persona] = jax.jit(fn)
    return self._fns[persona]

  def generate_split(self, trainable: dict | None, records_dir: str, split: str,
                     batch_size: int, persona: bool = True, max_batches: int = -1,
                     desc: str = 'generate', explain_top_k: int = 0) -> dict[str, Any]:
    """Predictions and references {id: text}, mean target NLL, optional top-k explanations.

    Every process ends with every example's prediction, each example counted once.
    """
    mesh, rules = self.system.mesh, self.system.rules
    gen = self.jitted(persona)
    num_batches, it = pipeline.eval_batches(self.config, records_dir, split, batch_size)
    if max_batches > 0:
      num_batches = min(num_batches, max_batches)
    preds, refs, explain, nll_sum, nll_n = {}, {}, {}, 0.0, 0
    start = time.time()
    for i, batch in enumerate(tqdm(it, total=num_batches, desc=desc, unit='batch',
                                   mininterval=5, disable=not partitioning.is_main_process())):
      if i >= num_batches:
        break
      tokens, nll, weights = gen(trainable, self.system.llm_params,
                                 partitioning.to_global(batch, mesh, rules))
      texts = decode_texts(self.tokenizer, partitioning.to_local(tokens, mesh, rules))
      weights = partitioning.to_local(weights, mesh, rules)
      n_tok = int((batch['target_mask'] * batch['valid'][:, None]).sum())
      nll_sum += float(nll) * n_tok
      nll_n += n_tok
      for row, (eid, ref, text, ok) in enumerate(zip(batch['id'], batch['target_text'], texts,
                                                     batch['valid'])):
        if not ok:
          continue
        eid = eid.decode()
        preds[eid], refs[eid] = text, ref.decode()
        if explain_top_k > 0:
          top = np.argsort(-weights[row])[:explain_top_k]
          explain[eid] = [{'item_id': batch['history_item_ids'][row, j].decode(),
                           'weight': float(weights[row, j])}
                          for j in top if weights[row, j] > 0]
    if jax.process_count() > 1:
      preds, refs, explain = (_merge_across_processes(d) for d in (preds, refs, explain))
      nll_sum, nll_n = (sum(_merge_across_processes({'v': x}, list_values=True)['v'])
                        for x in (nll_sum, nll_n))
    seconds = time.time() - start
    logging.info('%s: %d examples in %.1fs (%.1f examples/s)', desc, len(preds), seconds,
                 len(preds) / max(seconds, 1e-9))
    return {'predictions': preds, 'references': refs, 'nll': nll_sum / max(nll_n, 1),
            'explanations': explain, 'examples_per_second': len(preds) / max(seconds, 1e-9)}


def over_host_rows(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_rows: int,
                   mesh: jax.sharding.Mesh, rules, desc: str = 'generate') -> np.ndarray:
  """fn over every row of `arrays` ([N, ...] each, held whole by every process), `batch_rows`
  rows a call: the global batch, sharded on the mesh's batch axis. The last batch is topped up
  with the first rows and cut, so one shape compiles once. Returns fn's rows [N, ...] (numpy, on
  every process). The baselines' generation and RSPG's scoring run here; a records split runs in
  SplitGenerator.generate_split, where each process reads its own rows."""
  n = len(arrays[0])
  if n == 0:
    raise ValueError(f'{desc}: no rows to run.')
  outputs = []
  for start in tqdm(range(0, n, batch_rows), desc=desc, unit='batch', mininterval=5,
                    disable=not partitioning.is_main_process()):
    rows = np.arange(start, start + batch_rows) % n
    got = fn(*(partitioning.global_from_host(mesh, rules, a[rows]) for a in arrays))
    outputs.append(partitioning.gather_to_host(got)[:min(batch_rows, n - start)])
  return np.concatenate(outputs)


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
