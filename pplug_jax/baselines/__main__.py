"""python -m pplug_jax.baselines --config configs/lamp.py:task=N,... --method bm25 --k 4 \
    --split dev --workdir W

Runs one retrieval baseline (bm25, recency, contriever, random, or a trained ropg-kd or
ropg-rl) or the plain frozen model (--method none: the Ad-hoc row) over a split; writes
W/baselines/<method>_k<k>/.
"""

import json

from absl import flags

from pplug_jax import cli
from pplug_jax.baselines import runner


def main(argv):
  del argv
  f = flags.FLAGS
  k = lambda config: f.k if f.k is not None else config.rag.k
  with cli.job('baselines', lambda c: runner.check_method(c, f.workdir, f.method, k(c))) as config:
    print(json.dumps(runner.run(config, f.workdir, f.method, k(config), f.split), indent=1))


if __name__ == '__main__':
  cli.define_config_and_workdir('Results go to WORKDIR/baselines/<method>_k<k>/.')
  flags.DEFINE_string('method', 'bm25',
                      'none | bm25 | recency | contriever | random | ropg-kd | ropg-rl')
  flags.DEFINE_integer('k', None, 'Items retrieved (default config.rag.k = 4).')
  flags.DEFINE_enum('split', 'dev', ['train', 'dev', 'test'], 'Split to run.')
  cli.run(main)
