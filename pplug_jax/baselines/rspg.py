"""RSPG-Pre and RSPG-Post: a model that picks, per query, which retriever's prompt to trust.

    python -m pplug_jax.baselines.rspg --kind pre|post --config ... --workdir W [--split dev]

Salemi et al. (SIGIR 2024); LaMP-Benchmark/LaMP `RSPG/`. The pool is `config.rspg.retrievers`
(the paper's six: no retrieval, BM25, Contriever, Recency, ROPG-RL, ROPG-KD), each run with
k = `config.rag.k` over train and the evaluated split by the baseline runner (a finished run of
the same settings is reused). Each option's label is its per-query utility
(`metrics.utilities`: accuracy, ROUGE-1, or LaMP-3's normalised MAE).

The selection model scores each option from its lower-cased prompt (Pre) or from
`prompt [SEP] output` (Post) and is trained with a KL loss against the softmax of the labels;
`config.rspg.loss_form`: 'kl': batch-mean KL(softmax(u / T) || softmax(s / T)); 'reference' (the
code): `KLDivLoss(log_softmax(s) / T, softmax(u))`, the temperature dividing the log-probabilities.
They agree at T = 1. Inference takes the argmax and returns that retriever's output, already
generated.

Deviation: the reference's selection model is Longformer-base-4096 (pooler output, then a linear
layer). No maintained Flax Longformer exists, so this uses the project's Flax BERT
(`config.rspg.model_path`, default the Contriever directory), a linear layer on the [CLS] hidden
state, and `config.rspg.max_length` (at most 512) tokens.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import linen as nn

from pplug_jax import storage
from pplug_jax import (cli, fileio, generation, metrics as metrics_lib, partitioning, tokenizers,
                       validation)
from pplug_jax.baselines import runner, trainer
from pplug_jax.data import lamp
from pplug_jax.errors import ConfigError, UserError
from pplug_jax.models import bert, hf_weights
from pplug_jax.validation import LOSS_FORMS

KINDS = ('pre', 'post')
POOL = ('none', 'bm25', 'contriever', 'recency', 'ropg-rl', 'ropg-kd')


def rspg_loss(scores: jax.Array, labels: jax.Array, temperature: float,
              form: str = 'kl') -> jax.Array:
  """RSPG's loss for [B, R] selector scores and per-retriever utilities (see module doc)."""
  if form == 'kl':
    target = jax.nn.softmax(labels / temperature, axis=-1)
    log_model = jax.nn.log_softmax(scores / temperature, axis=-1)
  elif form == 'reference':
    target = jax.nn.softmax(labels, axis=-1)
    log_model = jax.nn.log_softmax(scores, axis=-1) / temperature
  else:
    raise ConfigError(f'config.rspg.loss_form={form!r}: use one of {LOSS_FORMS}.')
  return (target * (jnp.log(jnp.maximum(target, 1e-30)) - log_model)).sum(-1).mean()


class Selector(nn.Module):
  """BERT and a linear layer on the [CLS] hidden state: one score per input text."""
  config: bert.BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    hidden = bert.Bert(self.config, name='bert')(input_ids, attention_mask)
    head = nn.Dense(1, kernel_init=nn.initializers.normal(0.02), name='head')
    return head(hidden[:, 0].astype(jnp.float32))[:, 0]


def option_scores(model: Selector, params: Any, ids: jax.Array, mask: jax.Array,
                  rngs: dict | None = None) -> jax.Array:
  """[B, R] scores of R options per query, from [B, R, L] tokens."""
  b, r, length = ids.shape
  return model.apply({'params': params}, ids.reshape(b * r, length),
                     mask.reshape(b * r, length), rngs=rngs).reshape(b, r)


def pool_outputs(config, workdir: str, split: str, generator=None) -> dict[str, dict]:
  """{method: its run's files} for every retriever of the pool on a split (run if needed)."""
  k = config.rag.k
  for method in config.rspg.retrievers:
    runner.run(config, workdir, method, k, split, generator, reuse=True)
  return {m: runner.load_run(workdir, m, k, split) for m in config.rspg.retrievers}


def option_texts(kind: str, prompt: str, output: str, sep: str) -> str:
  """What the selector reads for one option: the prompt (Pre), or prompt [SEP] output (Post)."""
  return prompt.lower() if kind == 'pre' else f'{prompt.lower()} {sep} {output}'


def selection_data(config, kind: str, runs: dict[str, dict], questions: list[dict],
                   golds: dict[str, str] | None, tokenizer: Any) -> dict[str, np.ndarray]:
  """Tokens [N, R, L], and with golds the utility labels [N, R], in question order."""
  methods = list(config.rspg.retrievers)
  texts, labels = [], []
  for q in questions:
    outputs = [runs[m]['predictions'][q['id']] for m in methods]
    texts.extend(option_texts(kind, runs[m]['prompts'][q['id']], o, tokenizer.sep_token)
                 for m, o in zip(methods, outputs))
    if golds is not None:
      labels.append(metrics_lib.utilities(config.task, outputs, [golds[q['id']]] * len(methods)))
  enc = tokenizer(texts, truncation=True, max_length=config.rspg.max_length,
                  padding='max_length', return_tensors='np')
  n, r = len(questions), len(methods)
  data = {'ids': enc['input_ids'].astype(np.int32).reshape(n, r, -1),
          'mask': enc['attention_mask'].astype(np.int32).reshape(n, r, -1)}
  if golds is not None:
    data['labels'] = np.asarray(labels, np.float32)
  return data


def input_problems(config, kind: str, workdir: str | None = None) -> list[str]:
  """The kind, the selection model and (with `workdir`) each retriever's inputs, e.g. trained
  ROPG retrievers: what must be there before any run of the pool (the rspg values themselves
  are validation.config_problems')."""
  problems = []
  if kind not in KINDS:
    problems.append(f'--kind={kind!r}: use one of {KINDS}.')
  if not (config.rspg.model_path or config.rag.retriever_path) and not config.demo:
    # the demo sets rag.retriever_path to its MiniLM
    problems.append('config.rspg.model_path and config.rag.retriever_path are empty: the '
                    'selection model needs a Hugging Face BERT directory.')
  for method in config.rspg.retrievers if workdir is not None else ():
    try:
      runner.check_method(config, workdir, method, config.rag.k)
    except UserError as e:
      problems.append(str(e))
  return problems


def _check(config, kind: str, workdir: str | None = None) -> str:
  """For a Python caller: the config and input_problems in one refusal; the model's path."""
  validation.refuse(validation.config_problems(config) + input_problems(config, kind, workdir))
  return config.rspg.model_path or config.rag.retriever_path


def run(config, workdir: str, kind: str, split: str = 'dev', generator=None,
        mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Trains (or resumes) the selector on train, predicts on `split`, writes like a baseline."""
  path = _check(config, kind, workdir)
  mesh = mesh or partitioning.make_mesh(config.mesh_shape)
  rules = tuple(config.logical_axis_rules)
  generator = generator or runner.BaselineGenerator(config, mesh)
  train_runs = pool_outputs(config, workdir, 'train', generator)
  eval_runs = pool_outputs(config, workdir, split, generator)
  tokenizer = tokenizers.load_tokenizer(path)
  bert_config, bert_params = hf_weights.load_bert(path, dropout_rate=config.rspg.dropout)
  model = Selector(bert_config)
  head = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 4), jnp.int32),
                    jnp.ones((1, 4), jnp.int32))['params']['head']
  params = {'bert': bert_params, 'head': head}
  _, train_q, train_ex = lamp.raw_questions(config, 'train')
  data = selection_data(config, kind, train_runs, train_q, {e.id: e.output for e in train_ex},
                        tokenizer)
  temperature, form = float(config.rspg.temperature), config.rspg.loss_form

  def loss_fn(params, batch, rng):
    scores = option_scores(model, params, batch['ids'], batch['mask'], {'dropout': rng})
    return rspg_loss(scores, batch['labels'], temperature, form)

  run_dir = os.path.join(workdir, 'rspg', kind)
  k = config.rag.k
  identity = {'kind': kind, 'model': storage.abspath(path), 'retrievers': list(
      config.rspg.retrievers), 'train_outputs_sha256': fileio.sha256_of(
          [os.path.join(runner.method_dir(workdir, m, k), 'predictions_train.json')
           for m in config.rspg.retrievers]), 'temperature': temperature, 'loss_form': form,
              'max_length': config.rspg.max_length, 'dropout': config.rspg.dropout}
  params, losses = trainer.fit(loss_fn, params, data, trainer.FitSettings.from_config(
      config, 'rspg'), run_dir, identity, mesh, rules, f'RSPG-{kind.capitalize()}')
  return predict(config, workdir, kind, split, model, params, eval_runs, tokenizer, mesh,
                 {'steps': len(losses), 'last_loss': losses[-1] if losses else None})


def predict(config, workdir: str, kind: str, split: str, model: Selector, params: Any,
            runs: dict[str, dict], tokenizer: Any, mesh: jax.sharding.Mesh,
            train_info: dict) -> dict[str, Any]:
  """Picks a retriever per query; writes predictions (and metrics) to baselines/rspg-<kind>_k<k>."""
  spec = lamp.task_spec(config.task)
  _, questions, examples = lamp.raw_questions(config, split)
  golds = {e.id: e.output for e in examples} if split != 'test' else None
  data = selection_data(config, kind, runs, questions, None, tokenizer)
  score_fn = jax.jit(lambda p, ids, mask: option_scores(model, p, ids, mask))
  params = jax.device_put(params, partitioning.replicated(mesh))
  n = len(questions)
  scores = generation.over_host_rows(
      lambda ids, mask: score_fn(params, ids, mask), (data['ids'], data['mask']),
      config.train.eval_batch_size * jax.process_count(), mesh, tuple(config.logical_axis_rules),
      desc=f'RSPG-{kind}')
  chosen = np.argmax(scores, -1).tolist()
  methods = list(config.rspg.retrievers)
  ids = [q['id'] for q in questions]
  outputs = [runs[methods[c]]['predictions'][i] for i, c in zip(ids, chosen)]
  method = f'rspg-{kind}'
  result: dict[str, Any] = {'method': method, 'k': config.rag.k, 'split': split, 'count': n,
                            'chosen': {m: chosen.count(j) for j, m in enumerate(methods)},
                            'train': train_info}
  if golds is not None:
    result.update(metrics_lib.lamp_metrics(spec.name, outputs, [golds[i] for i in ids]))
  out = runner.method_dir(workdir, method, config.rag.k)
  if partitioning.is_main_process():
    storage.makedirs(out, exist_ok=True)
    lamp.write_predictions(os.path.join(out, f'predictions_{split}.json'), spec.name, ids,
                           outputs, retriever=[methods[c] for c in chosen])
    if golds is not None:
      fileio.write_json(os.path.join(out, f'metrics_{split}.json'), result)
  logging.info('%s on %s: %s', method, split, result)
  return result


def main(argv):
  del argv
  import json
  f = flags.FLAGS
  with cli.job('baselines.rspg', lambda c: input_problems(c, f.kind, f.workdir)) as config:
    print(json.dumps(run(config, f.workdir, f.kind, f.split), indent=1))


if __name__ == '__main__':
  cli.define_config_and_workdir('Reads and writes WORKDIR/baselines/; trains in '
                                'WORKDIR/rspg/<kind>/.')
  flags.DEFINE_enum('kind', 'pre', list(KINDS), 'pre: from the prompt; post: prompt [SEP] output.')
  flags.DEFINE_enum('split', 'dev', ['dev', 'test'], 'Split to predict.')
  cli.run(main)
