"""ROPG-KD and ROPG-RL: a dense retriever trained from the LLM's utility feedback.

    python -m pplug_jax.baselines.ropg --objective kd|rl --config ... --workdir W

Salemi et al., "Optimization Methods for Personalizing Large Language Models through Retrieval
Augmentation" (SIGIR 2024); LaMP-Benchmark/LaMP `ROPG/`. The retriever starts from Contriever
(`config.rag.retriever_path`, mean pooling, unnormalised dot product). For each training query
it scores the l candidates of `W/ropg/utility_train.jsonl` (`python -m
pplug_jax.baselines.utility`), `s_j = q . d_j`, with ROPG's corpus (each item's text ends with
`" date: {date}"`); a query with fewer than l candidates is padded with empty documents of
utility 0, as the reference's collator does.

- KD: the student is `softmax(s / T)`, the teacher `softmax(u / T)`. `config.ropg.kd_form`:
  'kl' (the paper): batch-mean KL(teacher || student); 'reference' (the code): PyTorch's
  cross-entropy applied to the student's *probabilities* as if they were logits, i.e.
  `-sum_j teacher_j * log_softmax(softmax(s / T))_j`, averaged over the batch.
- RL: one candidate j ~ softmax(s) per query; reward `u_j - u_0`, with 0 the initial ranking's
  top item (and 0 for a padded one); loss `-mean(log p_j * reward)`.

The trained retriever is exported as a Hugging Face BERT directory, `W/ropg/<kd|rl>/retriever/`,
which `python -m pplug_jax.baselines --method ropg-kd|ropg-rl` ranks with.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from pplug_jax import storage
from pplug_jax import cli, fileio, partitioning, tokenizers, validation
from pplug_jax.baselines import runner, trainer, utility
from pplug_jax.baselines.retrieval import ropg_query_and_corpus
from pplug_jax.data import lamp
from pplug_jax.errors import ConfigError
from pplug_jax.models import bert, hf_weights
from pplug_jax.validation import KD_FORMS

OBJECTIVES = ('kd', 'rl')


def kd_loss(scores: jax.Array, utility_values: jax.Array, temperature: float,
            form: str = 'kl') -> jax.Array:
  """ROPG-KD's loss for [B, l] retriever scores and candidate utilities (see module doc)."""
  teacher = jax.nn.softmax(utility_values / temperature, axis=-1)
  if form == 'kl':
    log_student = jax.nn.log_softmax(scores / temperature, axis=-1)
    kl = teacher * (jnp.log(jnp.maximum(teacher, 1e-30)) - log_student)
    return kl.sum(-1).mean()
  if form == 'reference':
    probs = jax.nn.softmax(scores / temperature, axis=-1)
    return -(teacher * jax.nn.log_softmax(probs, axis=-1)).sum(-1).mean()
  raise ConfigError(f'config.ropg.kd_form={form!r}: use one of {KD_FORMS}.')


def rl_loss(scores: jax.Array, utility_values: jax.Array, valid: jax.Array,
            sampled: jax.Array) -> jax.Array:
  """ROPG-RL's REINFORCE loss given the sampled candidate of each query ([B] indices)."""
  log_p = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), sampled[:, None], -1)[:, 0]
  u = jnp.take_along_axis(utility_values, sampled[:, None], -1)[:, 0]
  chosen_valid = jnp.take_along_axis(valid, sampled[:, None], -1)[:, 0]
  reward = jnp.where(chosen_valid, u - utility_values[:, 0], 0.0)
  return -(log_p * jax.lax.stop_gradient(reward)).mean()


def retriever_scores(model: bert.Bert, params: Any, batch: dict[str, jax.Array],
                     rngs: dict | None = None) -> jax.Array:
  """[B, l] dot products of the query and candidate embeddings."""
  b, l, length = batch['doc_ids'].shape
  embed = lambda ids, mask: model.apply({'params': params}, ids, mask,
                                        method=bert.Bert.embed_text, rngs=rngs)
  query = embed(batch['query_ids'], batch['query_mask'])
  docs = embed(batch['doc_ids'].reshape(b * l, length),
               batch['doc_mask'].reshape(b * l, length)).reshape(b, l, -1)
  return jnp.einsum('bd,bld->bl', query, docs)


def training_data(config, workdir: str, tokenizer: Any) -> tuple[dict[str, np.ndarray], int]:
  """Token arrays of every scored train query with candidates; and how many had none."""
  qfile, questions, _ = lamp.raw_questions(config, 'train')
  scored = {d['id']: d for d in utility.read_done(utility.paths(workdir, 'train')[0])}
  missing = [q['id'] for q in questions if q['id'] not in scored]
  if missing:
    raise ConfigError(f'{len(missing)} of the {len(questions)} train queries of {qfile} have no '
                      f'utility scores yet (first: {missing[0]}). Run (it resumes): python -m '
                      f'pplug_jax.baselines.utility --config ... --workdir {workdir}')
  l = config.ropg.candidates
  queries, docs, utilities, valid, skipped = [], [], [], [], 0
  for q in questions:
    row = scored[q['id']]
    if not row['candidates']:
      skipped += 1
      continue
    query, corpus = ropg_query_and_corpus(config.task, q['input'], q['profile'])
    cand = row['candidates'][:l]
    queries.append(query)
    docs.extend([corpus[i] for i in cand] + [''] * (l - len(cand)))
    utilities.append(row['utility'][:l] + [0.0] * (l - len(cand)))
    valid.append([True] * len(cand) + [False] * (l - len(cand)))
  if not queries:
    raise ConfigError(f'{qfile}: no train query has a non-empty profile; ROPG has nothing to '
                      'learn from.')
  tok = lambda texts, n: tokenizer(texts, truncation=True, max_length=n, padding='max_length',
                                   return_tensors='np')
  qt = tok(queries, config.ropg.query_max_length)
  dt = tok(docs, config.ropg.doc_max_length)
  n = len(queries)
  data = {'query_ids': qt['input_ids'], 'query_mask': qt['attention_mask'],
          'doc_ids': dt['input_ids'].reshape(n, l, -1),
          'doc_mask': dt['attention_mask'].reshape(n, l, -1),
          'utility': np.asarray(utilities, np.float32), 'valid': np.asarray(valid)}
  return {k: v.astype(np.int32) if v.dtype.kind in 'iu' else v for k, v in data.items()}, skipped


def train(config, workdir: str, objective: str, mesh: jax.sharding.Mesh | None = None) -> str:
  """Trains one ROPG retriever and exports it; returns the exported directory."""
  if objective not in OBJECTIVES:
    raise ConfigError(f'--objective={objective!r}: use one of {OBJECTIVES}.')
  validation.check_config(config)  # the command did; a Python caller may not have
  if not config.rag.retriever_path:
    raise ConfigError('config.rag.retriever_path is empty: ROPG starts from Contriever; give a '
                      'Hugging Face directory of facebook/contriever.')
  mesh = mesh or partitioning.make_mesh(config.mesh_shape)
  rules = tuple(config.logical_axis_rules)
  source = config.rag.retriever_path
  bert_config, params = hf_weights.load_bert(source, pooling=config.rag.retriever_pooling,
                                             normalize=False, dropout_rate=config.ropg.dropout)
  model = bert.Bert(bert_config)
  data, skipped = training_data(config, workdir, tokenizers.load_tokenizer(source))
  logging.info('ROPG-%s: %d train queries (%d with an empty profile skipped), l=%d', objective,
               len(data['utility']), skipped, config.ropg.candidates)
  temperature, form = float(config.ropg.temperature), config.ropg.kd_form

  def loss_fn(params, batch, rng):
    drop_key, sample_key = jax.random.split(rng)
    scores = retriever_scores(model, params, batch, {'dropout': drop_key})
    if objective == 'kd':
      return kd_loss(scores, batch['utility'], temperature, form)
    sampled = jax.random.categorical(sample_key, scores, axis=-1)
    return rl_loss(scores, batch['utility'], batch['valid'], sampled)

  utility_file = utility.paths(workdir, 'train')[0]
  run_dir = os.path.join(workdir, 'ropg', objective)
  identity = {'objective': objective, 'retriever': storage.abspath(source),
              'utility_sha256': fileio.sha256_of([utility_file]),
              'candidates': config.ropg.candidates, 'temperature': temperature,
              'kd_form': form if objective == 'kd' else None, 'dropout': config.ropg.dropout,
              'query_max_length': config.ropg.query_max_length,
              'doc_max_length': config.ropg.doc_max_length}
  params, losses = trainer.fit(loss_fn, params, data, trainer.FitSettings.from_config(
      config, 'ropg'), run_dir, identity, mesh, rules, f'ROPG-{objective.upper()}')
  out = runner.ropg_retriever_dir(workdir, f'ropg-{objective}')
  if partitioning.is_main_process():
    hf_weights.save_bert(out, source, bert_config, params)
    fileio.write_json(os.path.join(run_dir, 'train_result.json'),
                      {'steps': len(losses), 'first_loss': losses[0] if losses else None,
                       'last_loss': losses[-1] if losses else None, 'examples':
                       int(len(data['utility'])), 'skipped_empty_profiles': skipped})
  partitioning.sync(f'ROPG-{objective} exported')
  return out


def main(argv):
  del argv
  with cli.job('baselines.ropg') as config:
    print(train(config, flags.FLAGS.workdir, flags.FLAGS.objective))


if __name__ == '__main__':
  cli.define_config_and_workdir('Reads WORKDIR/ropg/utility_train.jsonl; writes '
                                'WORKDIR/ropg/<objective>/.')
  flags.DEFINE_enum('objective', 'kd', list(OBJECTIVES), 'kd (distillation) or rl (REINFORCE).')
  cli.run(main)
