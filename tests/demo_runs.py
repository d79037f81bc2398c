"""The suite's two shared demo runs, built once per pytest run in a background process.

conftest starts this script as soon as collection shows that a selected test needs them, so the
fast tests (and, with pytest-xdist, every worker) go on while the demo trains; the fixtures
`demo_run` and `straight_run` wait for the run's `NAME.rc` and read its files. One folder serves
every xdist worker of the run, so each run is made once, and no test may write into it.

    python tests/demo_runs.py SHARED_DIR demo [straight]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The SIGKILL tests' runs (local in test_main_job, gs:// in test_gcs): 40 steps, checkpoints
# every 10, no comparison; every one of them must end bit-identical to `straight_run`.
SIGKILL_FLAGS = ['--config.optim.max_steps=40', '--config.train.checkpoint_every=10',
                 '--config.train.eval_every=1000', '--config.train.log_every=10',
                 '--config.demo_compare=False']


def train_cmd(workdir, *overrides) -> list[str]:
  return [sys.executable, '-m', 'pplug_jax.train', '--config', 'configs/lamp.py:demo',
          f'--workdir={workdir}', *overrides]


def prepared_copy(src, dst, subdirs=('demo', 'records')) -> None:
  """A new workdir holding the demo's prepared files (data and base T5, records): no re-fit."""
  os.makedirs(dst)
  for sub in subdirs:
    shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))


def workdir(shared: str, name: str) -> str:
  return os.path.join(shared, name)


def _command(shared: str, name: str) -> list[str]:
  if name == 'demo':
    return train_cmd(workdir(shared, 'demo'))
  if name == 'straight':  # also traces steps 4 and 5: profiling changes no result
    prepared_copy(workdir(shared, 'demo'), workdir(shared, 'straight'))
    return train_cmd(workdir(shared, 'straight'), *SIGKILL_FLAGS,
                     '--config.train.profile_steps=(3,5)')
  raise ValueError(f'unknown shared run {name!r}: demo or straight')


def _write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)  # NAME.rc appears only after NAME.stdout and NAME.stderr


def main(shared: str, names: list[str]) -> None:
  failed = None
  for name in names:
    base = os.path.join(shared, name)
    if failed:
      _write(base + '.stderr', f'not run: the {failed} run failed\n')
      _write(base + '.rc', 'skipped')
      continue
    proc = subprocess.run(_command(shared, name), cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    _write(base + '.stdout', proc.stdout)
    _write(base + '.stderr', proc.stderr)
    _write(base + '.rc', str(proc.returncode))
    failed = name if proc.returncode else None


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
