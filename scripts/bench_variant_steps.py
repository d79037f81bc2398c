"""Train step time of each plug variant on the same shapes (a measurement, not a test).

flan-t5-small shapes (random weights), batch 8, input 256, target 32, history 32 items of 768-d,
fp32 on this machine's CPU: `scripts/bench_train_step.py`'s step, with config.plug changed.

    python scripts/bench_variant_steps.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import random_flan_t5_small
from bench_train_step import bench_ours

VARIANTS = {
    'full': {},
    'mean_pooling': {'pooling': 'mean'},
    'no_instruction': {'instruction': False},
    'k2': {'num_persona_tokens': 2},
    'k4': {'num_persona_tokens': 4},
    'time_decay': {'time_decay': 'learned'},
    'k4_time_decay': {'num_persona_tokens': 4, 'time_decay': 'learned'},
}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  _, path = random_flan_t5_small()
  out = {}
  for name, plug in VARIANTS.items():
    seconds, _ = bench_ours(path, args.repeats, plug)
    out[name] = round(seconds * 1e3, 1)
    print(f'{name:15s} {out[name]:8.1f} ms/step', flush=True)
  full = out['full']
  print(json.dumps({k: {'ms_per_step': v, 'vs_full': round(v / full, 3)} for k, v in out.items()},
                   indent=1))


if __name__ == '__main__':
  main()
