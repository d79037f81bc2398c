"""The README's TPU tables: `pplug_jax.aot` plans for backbones x TPU topologies.

    python scripts/plan_table.py [--sizes base,xl,xxl] [--topologies v4:2x2x1,v5e:2x4] [--task 2]
    python scripts/plan_table.py --sizes '' --llms llama2-7b,llama3.1-8b,qwen2.5-7b

FlanT5: large models use a model-parallel mesh (1, N), small ones a data-parallel mesh (N, 1).
Decoder-only presets use their config's mesh (`configs/lamp.py` DECODER_MESH). Each cell is the
train step's memory per device, whether it fits, and its step-time lower bound at peak.
"""

import argparse
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import lamp as lamp_config  # noqa: E402
from pplug_jax import aot  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', default='base,large,xl,xxl')
  parser.add_argument('--topologies', default='v4:2x2x1,v5e:2x4,v5p:2x2x1,v6e:2x4')
  parser.add_argument('--llms', default='',
                      help='decoder-only presets, e.g. llama2-7b,llama3.1-8b,qwen2.5-7b')
  parser.add_argument('--task', type=int, default=2)
  args = parser.parse_args()
  topologies = args.topologies.split(',')
  rows = [(size, f'task={args.task},size={size}') for size in args.sizes.split(',') if size]
  rows += [(llm, f'task={args.task},llm={llm}') for llm in args.llms.split(',') if llm]
  print('| backbone (train step, LaMP-%d shapes) | ' % args.task + ' | '.join(topologies) + ' |')
  print('|---|' + '---|' * len(topologies))
  for name, config_string in rows:
    cells = []
    for topology in topologies:
      config = lamp_config.get_config(config_string)
      n = len(aot.topology_devices(topology))
      if name in ('xl', 'xxl'):
        mesh = (1, n)
      elif name in ('small', 'base', 'large'):
        mesh = (n, 1)
      else:
        mesh = None  # the preset's own mesh
      try:
        p = aot.plan(config, topology, mesh, generate=False)  # the table is the train step
      except Exception as e:  # a mesh that cannot split this model, say
        cells.append(f'error: {str(e).splitlines()[0][:60]}')
        continue
      t = p['train_step']
      if 'error' in t:
        cells.append(f'does not compile ({t["error"][:50]})')
        continue
      cells.append(f'{t["per_chip_gib"]:.1f} GiB {"fits" if t["fits"] else "**no**"}, '
                   f'mesh {tuple(p["mesh"])}, >= {t["step_time_lower_bound_s"]:.2f} s')
      print(f'{name} {topology}: {aot.format_plan(p)}', file=sys.stderr, flush=True)
    print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
