"""Dev metrics and train step time of the plug's variants on the demo's synthetic scenarios
where they should matter (a measurement, not a test).

    python scripts/variants_on_synthetic.py --out DIR

Runs the product's own commands, resumably (a rerun reuses every finished variant):
  1. python -m pplug_jax.train --config configs/lamp.py:demo --config.demo_ablations=True
     (the demo, then the `variants` study on `drift` and `two_preferences`, each scenario with
     its own data, base T5 and records in DIR/demo_ablations/<scenario>/);
  2. per scenario, python -m pplug_jax.ablate --study all on those files, for the paper's
     ablations too (mean pooling, no instruction token, the persona zeroed), reusing the
     variants trained in 1.
Prints one Markdown table per scenario (python -m pplug_jax.table --ablations), with each
variant's train step time on this machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ('drift', 'two_preferences')  # pplug_jax.ablate.DEMO_SCENARIOS
ONLY = 'full,mean_pooling,no_instruction,persona_zeroed,k2,k4,time_decay,k4_time_decay'


def _run(*args: str) -> str:
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f'{" ".join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  return proc.stdout


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  _run('pplug_jax.train', '--config', 'configs/lamp.py:demo', f'--workdir={args.out}',
       '--config.demo_compare=False', '--config.demo_ablations=True')
  for scenario in SCENARIOS:
    w = os.path.join(args.out, 'demo_ablations', scenario)
    _run('pplug_jax.ablate', '--config', 'configs/lamp.py:demo',
         f'--config.demo_data.scenario={scenario}', f'--workdir={w}', '--study=all',
         f'--only={ONLY}')
    print(f'### {scenario}\n\n' + _run('pplug_jax.table', f'--workdir={w}', '--ablations'),
          flush=True)


if __name__ == '__main__':
  main()
