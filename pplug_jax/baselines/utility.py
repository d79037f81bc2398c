"""Utility feedback for ROPG: how much each profile item, alone in the prompt, helps the LLM.

    python -m pplug_jax.baselines.utility --config configs/lamp.py:task=N,... --workdir W \
        [--split train]

As LaMP's `profile_item_utilization_scorer.py` does it: for every query, the top
`config.ropg.candidates` (l) items of an initial ranking (`config.ropg.initial_ranker`) each go
alone into LaMP's k = 1 prompt; the frozen LLM generates with the config's settings (beam 4 for
the paper) and the output is scored against the gold output with `metrics.utilities`.

Output, `W/ropg/utility_<split>.jsonl`, one JSON object per query, in the split's order:

    {"id": "<query id>", "candidates": [profile positions, initial ranking order],
     "item_ids": [their profile ids], "outputs": [generated text], "utility": [floats in 0..1]}

A query with an empty profile has empty lists. `W/ropg/utility_<split>.json` records the
settings and input files; a run with other ones is refused. Lines are appended (and fsynced)
after each chunk of queries, so a killed run continues where it stopped: a torn last line is
dropped and its queries are scored again, none twice, none lost. The workdir's lock keeps a
second scorer out, and a line is appended only for a query the file does not hold yet.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from absl import flags, logging
from tqdm.auto import tqdm

from pplug_jax import storage
from pplug_jax import cli, fileio, metrics as metrics_lib, partitioning, validation
from pplug_jax.baselines import retrieval, runner
from pplug_jax.baselines.prompts import rag_prompt
from pplug_jax.baselines.retrieval import rank_profile
from pplug_jax.data import lamp



def paths(workdir: str, split: str) -> tuple[str, str]:
  """(the JSONL of scored queries, its settings file)."""
  root = os.path.join(workdir, 'ropg')
  return (os.path.join(root, f'utility_{split}.jsonl'), os.path.join(root, f'utility_{split}.json'))


def candidates(config, question: dict, encoder: Any = None) -> list[int]:
  """Profile positions of the top-l items of the initial ranking, best first."""
  profile = question['profile']
  l = config.ropg.candidates
  if not profile:
    return []
  if config.ropg.initial_ranker == 'file':
    return list(range(min(l, len(profile))))
  ranked = rank_profile(config.task, question['input'], profile, config.ropg.initial_ranker,
                        min(l, len(profile)), encoder)
  position = {id(item): i for i, item in enumerate(profile)}
  return [position[id(item)] for item in ranked]


def settings(config, split: str, qfile: str) -> dict[str, Any]:
  """What the scores depend on: compared on every resume."""
  return dict(runner.llm_settings(config), split=split, questions_sha256=fileio.sha256_of([qfile]),
              candidates=config.ropg.candidates, initial_ranker=config.ropg.initial_ranker,
              retriever=(storage.abspath(config.rag.retriever_path)
                         if config.ropg.initial_ranker == 'contriever' else None))


def read_done(path: str) -> list[dict]:
  """The whole lines of a (possibly torn) JSONL file; a partial last line is cut off the file."""
  if not storage.exists(path):
    return []
  done, good_bytes = [], 0
  with storage.open(path, 'rb') as f:
    for line in f:
      if not line.endswith(b'\n'):
        break
      try:
        done.append(json.loads(line))
      except json.JSONDecodeError:
        break
      good_bytes += len(line)
  if good_bytes != storage.getsize(path) and partitioning.is_main_process():
    logging.warning('%s: dropping a torn last line; its queries are scored again', path)
    with storage.open(path, 'r+b') as f:
      f.truncate(good_bytes)
  return done


def _size(path: str) -> int:
  return storage.getsize(path) if storage.exists(path) else 0


def score(config, workdir: str, split: str = 'train',
          generator: runner.BaselineGenerator | None = None, encoder: Any = None,
          stop_after_chunks: int | None = None) -> str:
  """Scores every query of a split (resuming a partial run); returns the JSONL path."""
  validation.check_config(config)  # the commands did; a Python caller may not have
  qfile, questions, examples = lamp.raw_questions(config, split)
  retrieval.check_fields(config.task, qfile, questions, 'recency')  # ROPG's corpus has the date
  out_file, meta_file = paths(workdir, split)
  fileio.record_or_check(meta_file, settings(config, split, qfile), 'these utility scores',
                         'Delete it and the .jsonl beside it to score again, or use another '
                         '--workdir.', write=partitioning.is_main_process())
  partitioning.sync('utility settings')
  done = {d['id'] for d in read_done(out_file)}
  todo = [q for q in questions if q['id'] not in done]
  before, written = len(done), _size(out_file)
  if config.ropg.initial_ranker == 'contriever' and encoder is None:
    encoder = runner.dense_encoder(config, workdir, 'contriever')
  generator = generator or runner.BaselineGenerator(config)
  gold = {e.id: e.output for e in examples}
  chunk = config.train.eval_batch_size * jax.process_count()  # queries; l full batches each
  start, chunks = time.time(), 0
  bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f'utility ({split})',
             unit='query', mininterval=5, disable=not partitioning.is_main_process())
  for begin in range(0, len(todo), chunk):
    part = todo[begin:begin + chunk]
    picked = [candidates(config, q, encoder) for q in part]
    budget = generator.encoding.prompt_budget(config.rag.max_length)
    prompts = [rag_prompt(config.task, q['input'], [q['profile'][i]], generator.tokenizer,
                          budget) for q, cand in zip(part, picked) for i in cand]
    outputs = iter(generator(prompts))
    lines = []
    for q, cand in zip(part, picked):
      texts = [next(outputs) for _ in cand]
      lines.append({'id': q['id'], 'candidates': cand,
                    'item_ids': [q['profile'][i].get('id') for i in cand], 'outputs': texts,
                    'utility': metrics_lib.utilities(config.task, texts,
                                                     [gold[q['id']]] * len(texts))})
    if partitioning.is_main_process():
      if _size(out_file) != written:  # someone else appended: never a query twice
        done = {d['id'] for d in read_done(out_file)}
      lines = [line for line in lines if line['id'] not in done]
      with storage.open(out_file, 'a', encoding='utf-8') as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + '\n' for line in lines)
        f.flush()
        os.fsync(f.fileno())
      done.update(line['id'] for line in lines)
      written = _size(out_file)
    bar.update(len(part))
    chunks += 1
    if stop_after_chunks is not None and chunks >= stop_after_chunks:
      break
  bar.close()
  partitioning.sync('utility written')
  logging.info('utility (%s): %d queries scored now, %d before, in %.1fs', split,
               min(len(todo), chunks * chunk), before, time.time() - start)
  return out_file


def main(argv):
  del argv
  with cli.job('baselines.utility') as config:
    print(score(config, flags.FLAGS.workdir, flags.FLAGS.split))


if __name__ == '__main__':
  cli.define_config_and_workdir('Scores go to WORKDIR/ropg/utility_<split>.jsonl.')
  flags.DEFINE_enum('split', 'train', ['train', 'dev'], 'Split to score.')
  cli.run(main)
