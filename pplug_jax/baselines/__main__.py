"""python -m pplug_jax.baselines --config configs/lamp.py:task=N,... --method bm25 --k 4 \
    --split dev --workdir W

Runs one retrieval baseline (bm25, recency, contriever, random, or a trained ropg-kd/ropg-rl) or the plain frozen model
(--method none: the Ad-hoc row) over a split; writes W/baselines/<method>_k<k>/.
"""

import json

from absl import flags
from ml_collections import config_flags

from pplug_jax import cli, partitioning
from pplug_jax.baselines import runner


def main(argv):
  del argv
  f = flags.FLAGS
  partitioning.maybe_initialize_distributed()
  config = f.config
  if config.demo:  # the demo's own files, never a user's
    from pplug_jax import demo
    demo.prepare(config, f.workdir)
  k = f.k if f.k is not None else config.rag.k
  print(json.dumps(runner.run(config, f.workdir, f.method, k, f.split), indent=1))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'configs/lamp.py[:args]', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Results go to WORKDIR/baselines/<method>_k<k>/.')
  flags.DEFINE_string('method', 'bm25', 'none | bm25 | recency | contriever | random | ropg-kd | ropg-rl')
  flags.DEFINE_integer('k', None, 'Items retrieved (default config.rag.k = 4).')
  flags.DEFINE_enum('split', 'dev', ['train', 'dev', 'test'], 'Split to run.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
