"""The paper's ablations and the persona variants, side by side on the same records.

    python -m pplug_jax.ablate --config CFG --workdir W --study paper|variants|all [--only a,b]

Each variant is an ordinary training run in `W/ablations/<name>/` with a few config keys
changed (`VARIANTS`), on W's records (`config.data.records_dir`, shared: made once), evaluated
on dev at its end. A variant whose `train_result.json` exists is not trained again, and one
interrupted (even by SIGKILL) resumes from its last checkpoint, so rerunning the command after
a kill finishes the study. `W/ablations/results.json` holds every variant's keys and dev
metrics; `python -m pplug_jax.table --workdir W --ablations` lays them out.

The `paper` study: full PPlug, mean pooling, no instruction token, the persona zeroed (full
PPlug's checkpoint evaluated with zero persona tokens) and the history capped at 1, 4, 16 and 64
items (caps at or above `data.max_history` are the full run). The encoder swap is two studies:
run this command again with `encoder=...` and another --workdir, and lay both out with
`table --workdirs`. The `variants` study: K = 2 and 4 persona tokens, learned time decay, and
both.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import flags, logging

from pplug_jax import checkpoints, cli, demo, fileio, storage, table, training, validation
from pplug_jax.data import pipeline, records
from pplug_jax.errors import ConfigError, UserError
from pplug_jax.workdir_lock import held

ABLATIONS_DIR = 'ablations'
RESULTS_FILE = 'results.json'
# name -> (config overrides, what it shows)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    'full': ({'train.eval_persona_zeroed': True}, 'PPlug as configured'),
    'mean_pooling': ({'plug.pooling': 'mean'}, 'uniform weights over the history items'),
    'no_instruction': ({'plug.instruction': False}, 'no instruction token'),
    'history_1': ({'data.history_cap': 1}, 'the most recent item only'),
    'history_4': ({'data.history_cap': 4}, 'the 4 most recent items'),
    'history_16': ({'data.history_cap': 16}, 'the 16 most recent items'),
    'history_64': ({'data.history_cap': 64}, 'the 64 most recent items'),
    'k2': ({'plug.num_persona_tokens': 2}, '2 persona tokens'),
    'k4': ({'plug.num_persona_tokens': 4}, '4 persona tokens'),
    'time_decay': ({'plug.time_decay': 'learned'}, 'scores minus a learned lambda x age'),
    'k4_time_decay': ({'plug.num_persona_tokens': 4, 'plug.time_decay': 'learned'},
                      '4 persona tokens and time decay'),
}
PERSONA_ZEROED = 'persona_zeroed'  # full's checkpoint, evaluated with the persona zeroed
STUDIES = {
    'paper': ('full', 'mean_pooling', 'no_instruction', PERSONA_ZEROED, 'history_1',
              'history_4', 'history_16', 'history_64'),
    'variants': ('full', 'k2', 'k4', 'time_decay', 'k4_time_decay'),
}
STUDIES['all'] = tuple(dict.fromkeys(STUDIES['paper'] + STUDIES['variants']))


def plan(study: str, only: list[str] | None, config) -> list[str]:
  """The study's variant names, in order: `only` picks some; caps >= data.max_history are
  dropped (they are the full run)."""
  if study not in STUDIES:
    raise UserError(f'--study={study}: use one of {sorted(STUDIES)}.')
  names = list(STUDIES[study])
  if only:
    unknown = [n for n in only if n not in names]
    if unknown:
      raise UserError(f'--only={",".join(only)}: {unknown[0]!r} is not in the {study} study '
                      f'({", ".join(names)}).')
    names = [n for n in names if n in only]
  kept = []
  for name in names:
    cap = VARIANTS.get(name, ({}, ''))[0].get('data.history_cap', 0)
    if cap and cap >= config.data.max_history:
      logging.info('%s: data.max_history is %d, so this cap is the full run; skipped.', name,
                   config.data.max_history)
      continue
    kept.append(name)
  if PERSONA_ZEROED in kept and 'full' not in kept:
    kept.insert(0, 'full')  # its checkpoint is the one evaluated
  return kept


def study_problems(study: str, only: list[str] | None, config) -> list[str]:
  """The study and its variants' names, and each variant's config, checked before any work."""
  try:
    names = plan(study, only, config)
  except UserError as e:
    return [str(e)]
  base, problems = set(validation.config_problems(config)), []
  for name in names:
    if name in VARIANTS:
      try:  # the base's own problems are listed once, by the caller
        problems += [f'ablation {name}: {p}' for p in
                     validation.config_problems(variant_config(config, name)) if p not in base]
      except UserError as e:
        problems.append(str(e))
  return problems


def variant_config(base, name: str):
  """`base` with the variant's keys set (each must exist: a typo is an error)."""
  config = ml_collections.ConfigDict(base.to_dict())
  for key, value in VARIANTS[name][0].items():
    section, field = key.split('.')
    if section not in config or field not in config[section]:
      raise ConfigError(f'ablation {name}: config.{key} does not exist in this config.')
    config[section][field] = value
  return config


def _base(config, workdir: str):
  """The study's shared config: the demo's paths filled (by cli.job), the demo itself off
  (its files are made once, in W), and W's records for every variant."""
  base = ml_collections.ConfigDict(config.to_dict())
  base.data.records_dir = records.records_dir(config, workdir)
  base.demo = False
  base.demo_compare = False
  return base


def _check_finished(vdir: str, config, name: str) -> None:
  """A finished variant is reused only when it was trained with this study's settings (the
  changes a resume would forbid: checkpoints.config_changes)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.num_streams = pipeline.num_streams(config)  # as train records it
  old = fileio.read_json(os.path.join(vdir, checkpoints.CONFIG_FILE))
  changes = checkpoints.config_changes(old, json.loads(config.to_json()))
  if changes:
    raise UserError(f'{vdir}: the finished variant {name!r} was trained with other settings:\n  '
                    + '\n  '.join(changes) + '\nUse another --workdir, or delete that folder '
                    'to train it again.')


def run_study(config, workdir: str, names: list[str]) -> dict[str, dict]:
  """Trains (or reuses) every variant in `names`; returns {name: {'keys', 'dev'}}."""
  base = _base(config, workdir)
  configs = {n: variant_config(base, n) for n in names if n != PERSONA_ZEROED}
  for name, c in configs.items():  # every variant checked before the first trains
    try:
      validation.check_config(c)
    except UserError as e:
      raise UserError(f'ablation {name}: {e}') from None
  results = {}
  for name in names:
    if name == PERSONA_ZEROED:
      results[name] = {'keys': {'persona': 'zeroed (full\'s checkpoint)'},
                       'dev': results['full']['dev_persona_zeroed']}
      continue
    vdir = os.path.join(workdir, ABLATIONS_DIR, name)
    done = os.path.join(vdir, 'train_result.json')
    if storage.exists(done):
      _check_finished(vdir, configs[name], name)
      logging.info('ablation %s: finished in %s, not trained again.', name, vdir)
      result = fileio.read_json(done)
    else:
      logging.info('ablation %s (%s): training into %s', name, VARIANTS[name][1], vdir)
      result = training.train_and_evaluate(configs[name], vdir)
    results[name] = {'keys': VARIANTS[name][0], 'dev': result['dev'],
                     'train_ms_per_step': result.get('train_ms_per_step'),
                     **({'dev_persona_zeroed': result['dev_persona_zeroed']}
                        if 'dev_persona_zeroed' in result else {})}
  fileio.write_json(os.path.join(workdir, ABLATIONS_DIR, RESULTS_FILE),
                    {'task': config.task, 'variants': results})
  return results


DEMO_STUDY_DIR = 'demo_ablations'
DEMO_SCENARIOS = ('drift', 'two_preferences')  # pplug_jax/data/synthetic.py


def demo_study_configs(config, workdir: str) -> dict[str, tuple[Any, str, list[str]]]:
  """{scenario: (config, workdir, variant names)} of --config.demo_ablations=True, each
  variant's config checked: the demo on that scenario in W/demo_ablations/<scenario>/, with
  its own data, base model and records."""
  out = {}
  for scenario in DEMO_SCENARIOS:
    c = ml_collections.ConfigDict(config.to_dict())
    c.demo_data.scenario = scenario
    c.demo_compare = c.demo_optimized = c.demo_ablations = False
    c.data.lamp_dir = c.data.records_dir = c.llm.path = c.encoder.path = ''
    c.rag.retriever_path = ''  # the demo fills them all in its own folder
    names = plan('variants', None, c)
    for name in names:
      try:
        validation.check_config(variant_config(c, name))
      except UserError as e:
        raise UserError(f'demo_ablations, {scenario}, {name}: {e}') from None
    out[scenario] = (c, os.path.join(workdir, DEMO_STUDY_DIR, scenario), names)
  return out


def demo_study(config, workdir: str) -> str:
  """Runs the `variants` study on each synthetic scenario where a variant should matter
  (resumably, as the command does) and returns the tables, one per scenario."""
  parts = []
  for scenario, (c, sub, names) in demo_study_configs(config, workdir).items():
    logging.info('demo_ablations: the %s study on %s data in %s', ', '.join(names), scenario,
                 sub)
    with held(sub, 'train --config.demo_ablations'):
      demo.prepare(c, sub)
      run_study(c, sub, names)
    parts.append(f'### {scenario} (dev, {sub})\n\n' + table.write_ablations(sub))
  return '\n\n'.join(parts)


def main(argv):
  del argv
  f = flags.FLAGS
  only = [n for n in (f.only or []) if n]
  with cli.job('ablate', check=lambda c: study_problems(f.study, only, c)) as config:
    names = plan(f.study, only, config)
    run_study(config, f.workdir, names)
  print(table.write_ablations(f.workdir))


if __name__ == '__main__':
  cli.define_config_and_workdir('W: the shared records, and ablations/<name>/ per variant.')
  flags.DEFINE_enum('study', 'paper', sorted(STUDIES), 'Which variants to train.')
  flags.DEFINE_list('only', None, 'Only these variants of the study (e.g. full,mean_pooling).')
  cli.run(main)
