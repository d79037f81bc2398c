"""Runs a script under tests/multidevice/ on 8 simulated CPU devices in a fresh process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_devices(n: int) -> str:
  """XLA_FLAGS for `n` simulated CPU devices, keeping the flags the suite already set."""
  return f'--xla_force_host_platform_device_count={n} {os.environ.get("XLA_FLAGS", "")}'.strip()


def run_on_8_devices(script: str, *args: str, timeout: int = 600) -> dict:
  env = dict(os.environ, XLA_FLAGS=with_devices(8),
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'multidevice', script),
                         *args], env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f'{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'
  last = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  return json.loads(last[-1]) if last else {}
