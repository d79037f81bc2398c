"""What a run on a bucket costs against local disk: the demo's main job on local disk and on the
Cloud Storage emulator (fake-gcs-server on localhost), wall time and requests by phase.

    python scripts/bench_gcs.py --out DIR [--steps N] [--checkpoint_every N]

Runs `python -m pplug_jax.train --config configs/lamp.py:demo` twice, from nothing, as a new
user would: with --workdir DIR/local, then with --workdir gs://bench/demo. The gs:// run's
requests go through a recording proxy in front of the emulator (tests/gcs_emulator.py), which
sees each request's object, so they are counted by phase (the train log's lines mark the
phases) and by what they touch; the emulator's own log gives the total, as a cross-check.
Prints a Markdown table. A measurement, not a test: the numbers depend on the machine, and an
emulator on localhost has no network latency, so on Cloud Storage each request costs more
(tens of ms), which makes the request counts the part that carries over.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import gcs_emulator  # noqa: E402

# (the train log's line that begins a phase, its name), in order
PHASES = ((r'demo: ', 'demo data and base model'),
          (r'Precomputing encoder embeddings', 'precompute'),
          (r'Mesh ', 'model load and compile'),
          (r'Training \d+ steps', 'training'),
          (r'dev, frozen model without plug', 'Table 1 comparison'))


def _what(name: str) -> str:
  """What an object (or listing prefix) belongs to."""
  rel = name.removeprefix('demo/')  # the workdir is gs://BUCKET/demo
  for prefix, what in (('records/train', 'records: train'), ('records/dev', 'records: dev'),
                       ('records/test', 'records: test'), ('records', 'records: other'),
                       ('checkpoints', 'checkpoints'), ('best', 'checkpoints (best)'),
                       ('tensorboard', 'TensorBoard'), ('.lock', 'workdir lock'),
                       ('demo/lamp', 'demo LaMP files'), ('demo/tiny', 'demo base model'),
                       ('baselines', 'baselines'), ('table', 'table')):
    if rel.startswith(prefix):
      return what
  return 'other (config, results)'


def _run(cmd: list[str], env: dict, marks: list[tuple[float, str]] | None = None) -> float:
  """Runs the command, its log read as it comes (recording the phase marks); its wall time."""
  began = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  seen = set()
  tail = collections.deque(maxlen=40)
  for line in proc.stderr:
    tail.append(line)
    for pattern, name in PHASES:
      if marks is not None and name not in seen and re.search(pattern, line):
        seen.add(name)
        marks.append((time.time(), name))
  if proc.wait():
    raise SystemExit(f'{" ".join(cmd)} failed:\n{"".join(tail)}')
  return time.time() - began


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=0, help='optim.max_steps (0: the demo\'s)')
  parser.add_argument('--checkpoint_every', type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=False)
  extra = []
  if args.steps:
    extra.append(f'--config.optim.max_steps={args.steps}')
  if args.checkpoint_every:
    extra.append(f'--config.train.checkpoint_every={args.checkpoint_every}')
  train = [sys.executable, '-m', 'pplug_jax.train', '--config', 'configs/lamp.py:demo', *extra]

  local_s = _run(train + [f'--workdir={os.path.join(args.out, "local")}'], dict(os.environ))

  emulator = gcs_emulator.Emulator(os.path.join(args.out, 'objects'),
                                   os.path.join(args.out, 'fake-gcs-server.log'))
  proxy = gcs_emulator.FaultProxy(emulator.url)
  metadata = gcs_emulator.MetadataTrap()
  try:
    bucket = emulator.new_bucket('bench')
    env = {**os.environ, **emulator.env, **proxy.env, **metadata.env}
    marks: list[tuple[float, str]] = []
    start = time.time()
    gcs_s = _run(train + [f'--workdir={bucket}/demo'], env, marks)
    logged = len(emulator.requests())
  finally:
    proxy.stop()
    emulator.stop()
    metadata.stop()

  bounds = [(start, 'start')] + marks
  def phase(t: float) -> str:
    return [name for began, name in bounds if began <= t][-1]

  by_phase = collections.Counter()
  by_what = collections.defaultdict(collections.Counter)
  for t, method, name in proxy.requests:
    by_phase[phase(t)] += 1
    by_what[phase(t)][(_what(name), 'GET' if method in ('GET', 'HEAD') else 'write')] += 1
  steps = _steps(os.path.join(args.out, 'local', 'config.json'), args.steps)
  print(f'| run | wall time |\n|---|---|\n| local disk | {local_s:.0f} s |\n'
        f'| gs:// (emulator on localhost) | {gcs_s:.0f} s ({gcs_s / local_s:.2f}x) |\n')
  print(f'{len(proxy.requests)} requests through the proxy ({logged} in the emulator\'s log, '
        f'which also has the resumable uploads\' data, sent to it directly); '
        f'{metadata.connections} credential probes.\n')
  print('| phase | requests | of which |\n|---|---|---|')
  for _, name in bounds:
    parts = ', '.join(f'{what} {kind} {n}' for (what, kind), n in by_what[name].most_common())
    print(f'| {name} | {by_phase[name]} | {parts} |')
  training = by_phase['training']
  print(f'\ntraining: {steps} steps, {training / max(steps, 1):.2f} requests per step '
        '(evaluations and checkpoints included)')


def _steps(config_json: str, steps: int) -> int:
  import json
  if steps:
    return steps
  with open(os.path.join(os.path.dirname(config_json), 'train_result.json')) as f:
    return json.load(f)['step']


if __name__ == '__main__':
  main()
