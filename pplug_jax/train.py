"""The main job: trains the persona plug on a frozen, sharded backbone (`pplug_jax.training`),
then, for the demo, prints its Table 1 comparison (`pplug_jax.comparison`).

    python -m pplug_jax.train --config configs/lamp.py --workdir DIR          # the demo
    python -m pplug_jax.train --config configs/lamp.py:task=2,size=xxl --workdir DIR \
        --config.llm.path=... --config.encoder.path=... --config.data.lamp_dir=...

Resumes from the latest checkpoint in DIR/checkpoints; the best one by the task's main dev
metric is kept in DIR/best.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from pplug_jax import ablate, cli, comparison, storage, training


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """The job as the command runs it: the final dev metrics, and with config.demo (and
  demo_compare) the demo's ablations and retrieval baselines on the same dev split."""
  after = comparison.compare if config.demo and config.demo_compare else None
  return training.train_and_evaluate(config, workdir, after)


def main(argv):
  del argv
  flags_ = flags.FLAGS
  study = flags_.config.get('demo_ablations', False)  # the variants on the tasks made for them
  if study:
    ablate.demo_study_configs(flags_.config, flags_.workdir)  # every variant checked first
  storage.makedirs(flags_.workdir, exist_ok=True)
  train_and_evaluate(flags_.config, flags_.workdir)
  if study:
    print(ablate.demo_study(flags_.config, flags_.workdir), flush=True)


if __name__ == '__main__':
  cli.define_config_and_workdir('Checkpoints, logs, records (and demo files) go here.')
  cli.run(main)
