"""Generates for every example of a split from a trained plug; writes LaMP predictions + metrics.

    python -m pplug_jax.evaluate --workdir DIR [--split dev|test] [--checkpoint best|latest]

Writes DIR/predictions_{split}.json ({"task", "golds": [{"id", "output"}]}: leaderboard-ready
for test), DIR/metrics_{split}.json when the split has outputs, and
DIR/explanations_{split}.json (the top-k history items and their attention weights).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import flags, logging

from pplug_jax import storage
from pplug_jax import (checkpoints, cli, fileio, generation, partitioning, precompute,
                       system as system_lib, validation)
from pplug_jax.data import lamp, records
from pplug_jax.errors import RecordsError
from pplug_jax.workdir_lock import held


def evaluate(config, workdir: str, split: str = 'dev', which: str = 'best') -> dict[str, Any]:
  """Runs generation on `split` with the `which` checkpoint; returns metrics (may be empty)."""
  records_path = records.records_dir(config, workdir)
  precompute.verify_records(config, records_path, advice=(
      'evaluate scores the records, not the files: make records of the current files in a new '
      'folder (python -m pplug_jax.precompute --config CFG --config.data.records_dir=NEW) and '
      f'evaluate on them (python -m pplug_jax.evaluate --workdir {workdir} --config CFG '
      '--config.data.records_dir=NEW).'))
  trainable, step = checkpoints.load_params(workdir, which)
  meta = records.read_metadata(records_path)
  if split not in meta['splits']:
    raise RecordsError(f'{records_path}: no {split} records; precompute found '
                       f'{sorted(meta["splits"])}.')
  mesh = partitioning.make_mesh(config.mesh_shape)
  system = system_lib.load_system(config, meta['fingerprint']['dim'], mesh)
  trainable = jax.device_put(trainable, partitioning.replicated_like(trainable, mesh))
  spec = lamp.task_spec(config.task)
  generator = generation.SplitGenerator(system, config)
  out = generator.generate_split(trainable, records_path, split, config.train.eval_batch_size,
                                 desc=f'{split} (step {step})',
                                 explain_top_k=config.eval.explain_top_k)
  ids = sorted(out['predictions'], key=lambda i: (len(i), i))
  result: dict[str, Any] = {'step': step, 'split': split, 'count': len(ids),
                            'examples_per_second': out['examples_per_second']}
  if partitioning.is_main_process():
    lamp.write_predictions(os.path.join(workdir, f'predictions_{split}.json'), spec.name, ids,
                           [out['predictions'][i] for i in ids])
    if config.eval.explain_top_k > 0:
      fileio.write_json(os.path.join(workdir, f'explanations_{split}.json'), out['explanations'])
  if meta['splits'][split].get('has_outputs'):
    result.update(generation.score(spec.name, out))
    if partitioning.is_main_process():
      fileio.write_json(os.path.join(workdir, f'metrics_{split}.json'), result)
  logging.info('%s: %s', split, result)
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  partitioning.maybe_initialize_distributed()
  with held(f.workdir if storage.isdir(f.workdir) else '', 'evaluate'):  # writes into it
    config = f.config if f.config is not None else checkpoints.load_config(f.workdir)
    validation.refuse(validation.config_problems(config, training=False))
    print(json.dumps(evaluate(config, f.workdir, f.split, f.checkpoint), indent=1))


if __name__ == '__main__':
  cli.define_config('Defaults to the config saved in the workdir.', required=False)
  flags.DEFINE_string('workdir', None, 'The training workdir.')
  flags.DEFINE_enum('split', 'dev', ['train', 'dev', 'test'], 'Split to generate for.')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
