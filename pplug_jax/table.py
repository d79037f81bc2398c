"""Lays out PPlug and the baselines in the shape of the paper's Table 1.

    python -m pplug_jax.table --workdir W [--workdirs W1 W2 ...] [--split dev] [--paper] [--out D]
    python -m pplug_jax.table --workdir W --ablations     # also W/ablations/ablations.{md,png}

Rows are task x backbone x metric (the backbone is the workdir's `llm.name`, or the baseline run's
LLM directory), columns are methods (Ad-hoc, BM25, Recency, Contriever, ..., PPlug); the best
value of a row is bold, and each metric carries its direction (↑ or ↓). PPlug's metrics come
from `metrics_<split>.json` (evaluate) or `train_result.json`; each baseline's from
`baselines/<method>/metrics_<split>.json`. Writes table1.md and table1.png (into --out, default
the first workdir); each bar carries its value, and the legend sits outside the axes. --paper
adds the paper's FlanT5-XXL numbers in brackets and as black markers on the chart, for real-data
runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags

from pplug_jax import storage
from pplug_jax import cli
from pplug_jax.data import lamp
from pplug_jax.errors import UserError

COLUMNS = ('Ad-hoc', 'BM25', 'Recency', 'Contriever', 'Random', 'ROPG-RL', 'ROPG-KD', 'RSPG-Pre',
           'RSPG-Post', 'PPlug')
# The paper's Table 1 (FlanT5-XXL, LaMP user split, dev), in COLUMNS order without 'Random'.
PAPER = {
    ('LaMP_1', 'accuracy'): (0.498, 0.629, 0.639, 0.641, 0.682, 0.676, 0.672, 0.670, 0.680),
    ('LaMP_2', 'accuracy'): (0.326, 0.345, 0.361, 0.362, 0.365, 0.365, 0.391, 0.416, 0.565),
    ('LaMP_2', 'f1'): (0.255, 0.282, 0.291, 0.282, 0.292, 0.291, 0.312, 0.337, 0.501),
    ('LaMP_3', 'mae'): (0.335, 0.293, 0.305, 0.297, 0.273, 0.274, 0.266, 0.246, 0.231),
    ('LaMP_3', 'rmse'): (0.639, 0.585, 0.596, 0.592, 0.561, 0.566, 0.560, 0.539, 0.534),
    ('LaMP_4', 'rouge-1'): (0.173, 0.192, 0.194, 0.190, 0.190, 0.193, 0.195, 0.207, 0.216),
    ('LaMP_4', 'rouge-L'): (0.157, 0.175, 0.177, 0.174, 0.174, 0.176, 0.179, 0.188, 0.197),
    ('LaMP_5', 'rouge-1'): (0.472, 0.467, 0.469, 0.471, 0.473, 0.472, 0.479, 0.480, 0.487),
    ('LaMP_5', 'rouge-L'): (0.419, 0.419, 0.422, 0.421, 0.425, 0.423, 0.429, 0.429, 0.435),
    ('LaMP_7', 'rouge-1'): (0.454, 0.451, 0.452, 0.440, 0.458, 0.451, 0.460, 0.468, 0.536),
    ('LaMP_7', 'rouge-L'): (0.401, 0.401, 0.402, 0.391, 0.407, 0.402, 0.409, 0.416, 0.484),
}
_PAPER_COLUMNS = tuple(c for c in COLUMNS if c != 'Random')
_NAMES = {'none': 'Ad-hoc', 'bm25': 'BM25', 'recency': 'Recency', 'contriever': 'Contriever',
          'random': 'Random', 'ropg-rl': 'ROPG-RL', 'ropg-kd': 'ROPG-KD', 'rspg-pre': 'RSPG-Pre',
          'rspg-post': 'RSPG-Post'}


def _read(path: str) -> Any:
  with storage.open(path, encoding='utf-8') as f:
    return json.load(f)


def _column(method_dir_name: str) -> str:
  method, _, k = method_dir_name.partition('_k')
  name = _NAMES.get(method, method)
  return name if not k or k == '4' else f'{name} (k={k})'


Row = tuple[str, str]  # (task, backbone)


def _backbone_name(llm: dict) -> str:
  """A config's (or a baseline run's) backbone: llm.name, else its directory's name."""
  name = llm.get('name') or llm.get('llm_name')
  path = llm.get('path') or llm.get('llm_path') or ''
  return name or os.path.basename(os.path.normpath(path)) or 'unknown backbone'


def _task_and_backbone(workdir: str) -> tuple[str | None, str | None]:
  config_file = os.path.join(workdir, 'config.json')
  if storage.exists(config_file):
    config = _read(config_file)
    return lamp.task_spec(config['task']).name, _backbone_name(config.get('llm', {}))
  return None, None


def collect(workdirs: list[str], split: str = 'dev') -> dict[Row, dict[str, dict]]:
  """{(task, backbone): {column: metrics}} from every workdir's PPlug and baseline metrics."""
  found: dict[Row, dict[str, dict]] = {}
  for workdir in workdirs:
    task, backbone = _task_and_backbone(workdir)
    pplug = None
    if storage.exists(os.path.join(workdir, f'metrics_{split}.json')):
      pplug = _read(os.path.join(workdir, f'metrics_{split}.json'))
    elif split == 'dev' and storage.exists(os.path.join(workdir, 'train_result.json')):
      pplug = _read(os.path.join(workdir, 'train_result.json')).get('dev')
    if pplug and task:
      found.setdefault((task, backbone), {})['PPlug'] = pplug
    base = os.path.join(workdir, 'baselines')
    for name in sorted(storage.listdir(base)) if storage.isdir(base) else []:
      metrics_file = os.path.join(base, name, f'metrics_{split}.json')
      if not storage.exists(metrics_file):
        continue
      preds = os.path.join(base, name, f'predictions_{split}.json')
      method_task = lamp.task_spec(_read(preds)['task']).name if storage.exists(preds) else task
      run_file = os.path.join(base, name, f'run_{split}.json')
      method_backbone = backbone
      if storage.exists(run_file):  # the run's own LLM (a workdir may hold several)
        run = _read(run_file)
        if not backbone or storage.abspath(run.get('llm_path', '')) != _llm_path(workdir):
          method_backbone = _backbone_name(run)
      found.setdefault((method_task, method_backbone or 'unknown backbone'),
                       {})[_column(name)] = _read(metrics_file)
  if not found:
    raise UserError(f'no metrics_{split}.json in {workdirs} (nor in their baselines/): train and '
                    'evaluate, or run python -m pplug_jax.baselines, first.')
  return found


def _llm_path(workdir: str) -> str:
  config_file = os.path.join(workdir, 'config.json')
  path = _read(config_file).get('llm', {}).get('path', '') if storage.exists(config_file) else ''
  return storage.abspath(path) if path else ''


def _order(columns) -> list[str]:
  rank = {c: i for i, c in enumerate(COLUMNS)}
  return sorted(columns, key=lambda c: (rank.get(c.split(' (')[0], len(COLUMNS)), c))


def markdown(found: dict[Row, dict[str, dict]], paper: bool = False) -> str:
  """The table in Markdown: the best of each row bold; [paper value] when asked (the paper's
  numbers are FlanT5-XXL's, so they go beside every backbone's row as the reference)."""
  columns = _order({c for methods in found.values() for c in methods})
  lines = ['| Dataset | Backbone | Metric | ' + ' | '.join(columns) + ' |',
           '|---|---|---|' + '---|' * len(columns)]
  for task, backbone in sorted(found):
    for key, label, higher in lamp.task_spec(task).table_metrics:
      methods = found[(task, backbone)]
      values = {c: methods[c].get(key) for c in columns if c in methods}
      present = [v for v in values.values() if v is not None]
      best = (max if higher else min)(present) if present else None
      cells = []
      for c in columns:
        v = values.get(c)
        cell = '' if v is None else (f'**{v:.3f}**' if v == best else f'{v:.3f}')
        if paper and (task, key) in PAPER and c in _PAPER_COLUMNS:
          cell += f' [{PAPER[(task, key)][_PAPER_COLUMNS.index(c)]:.3f}]'
        cells.append(cell)
      arrow = '↑' if higher else '↓'
      lines.append(f'| {task.replace("_", "-")} | {backbone} | {label} {arrow} | ' +
                   ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def figure(found: dict[Row, dict[str, dict]], paper: bool = False,
           columns: list[str] | None = None,
           title: str = 'PPlug vs retrieval-based personalisation'):
  """The chart: one bar group per task x backbone x metric, one bar per method, each bar
  labelled with its value; the legend sits outside the axes, so it covers no bar; with `paper`,
  the paper's FlanT5-XXL values are black markers at the right edge of the same method's bar
  (clear of the value label above the bar's centre)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  several = len({b for _, b in found}) > 1
  rows = [(row, key, label) for row in sorted(found)
          for key, label, _ in lamp.task_spec(row[0]).table_metrics]
  columns = columns or _order({c for methods in found.values() for c in methods})
  fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(rows) * len(columns) / 4 + 4), 4.5))
  width = 0.8 / max(len(columns), 1)
  top = 0.0
  marked = False
  for j, c in enumerate(columns):
    present = [(i + j * width, t, k, found[t].get(c, {}).get(k)) for i, (t, k, _) in
               enumerate(rows)]
    present = [(x, t, k, y) for x, t, k, y in present if y is not None]  # no bar, no label
    if not present:
      continue
    bars = ax.bar([p[0] for p in present], [p[3] for p in present], width, label=c,
                  color=f'C{j % 10}')
    ax.bar_label(bars, fmt='%.3f', fontsize=6, rotation=90, padding=2)
    top = max([top, *(p[3] for p in present)])
    name = c.split(' (')[0]
    if paper and name in _PAPER_COLUMNS:
      points = [(x + 0.3 * width, PAPER[(t[0], k)][_PAPER_COLUMNS.index(name)])
                for x, t, k, _ in present if (t[0], k) in PAPER]
      if points:
        ax.scatter(*zip(*points), marker='D', s=12, color='black', zorder=3,
                   label=None if marked else 'paper (FlanT5-XXL)')
        marked = True
        top = max([top, *(y for _, y in points)])
  ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)  # room for the value labels
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
  ax.set_xticklabels([f'{t.replace("_", "-")}\n{label}' + (f'\n{b}' if several else '')
                      for (t, b), _, label in rows])
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  ax.set_title(title)
  fig.tight_layout()
  return fig


def chart(found: dict[Row, dict[str, dict]], path: str, paper: bool = False, **kwargs) -> None:
  """Writes `figure` as a PNG to `path` (local or gs://)."""
  import io
  import matplotlib.pyplot as plt
  fig = figure(found, paper, **kwargs)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  storage.write_bytes(path, buffer.getvalue())


def write(workdirs: list[str], out: str | None = None, split: str = 'dev',
          paper: bool = False) -> str:
  """Collects, writes table1.md and table1.png, and returns the Markdown."""
  found = collect(workdirs, split)
  text = markdown(found, paper)
  out = out or workdirs[0]
  storage.makedirs(out, exist_ok=True)
  with storage.open(os.path.join(out, 'table1.md'), 'w', encoding='utf-8') as f:
    f.write(text + '\n')
  chart(found, os.path.join(out, 'table1.png'), paper)
  return text


ABLATIONS_RESULTS = os.path.join('ablations', 'results.json')  # written by pplug_jax.ablate


def read_ablations(workdir: str) -> tuple[str, dict[str, dict]]:
  """(task, {variant: {'keys', 'dev'}}) from `python -m pplug_jax.ablate`, in study order."""
  path = os.path.join(workdir, ABLATIONS_RESULTS)
  if not storage.exists(path):
    raise UserError(f'{path} does not exist: run python -m pplug_jax.ablate --config CFG '
                    f'--workdir {workdir} --study paper first.')
  data = _read(path)
  return lamp.task_spec(data['task']).name, data['variants']


def ablations_markdown(task: str, variants: dict[str, dict]) -> str:
  """One row per variant: its changed keys, its dev metrics (the best bold) and the change of
  the task's main metric against full PPlug."""
  metrics = lamp.task_spec(task).table_metrics
  main_key = metrics[0][0]
  full = variants.get('full', {}).get('dev', {}).get(main_key)
  lines = ['| Variant | Changed keys | ' + ' | '.join(f'{label} {"↑" if hi else "↓"}'
                                                   for _, label, hi in metrics) +
           f' | Δ {metrics[0][1]} vs full | ms/step |', '|---|---|' + '---|' * (len(metrics) + 2)]
  best = {}
  for key, _, higher in metrics:
    present = [v['dev'][key] for v in variants.values() if key in v['dev']]
    best[key] = (max if higher else min)(present) if present else None
  for name, v in variants.items():
    keys = ', '.join(f'`{k}={val}`' for k, val in v['keys'].items()
                     if k != 'train.eval_persona_zeroed') or '–'
    cells = []
    for key, _, _ in metrics:
      x = v['dev'].get(key)
      cells.append('' if x is None else f'**{x:.3f}**' if x == best[key] else f'{x:.3f}')
    x = v['dev'].get(main_key)
    delta = '' if x is None or full is None or name == 'full' else f'{x - full:+.3f}'
    ms = v.get('train_ms_per_step')  # this machine's train step (a resumed run: its own steps)
    lines.append(f'| {name} | {keys} | ' + ' | '.join(cells) + f' | {delta} | '
                 f'{"" if ms is None else f"{ms:.0f}"} |')
  return '\n'.join(lines)


def write_ablations(workdir: str, out: str | None = None) -> str:
  """Writes ablations.md and ablations.png (into `out`, default W/ablations); returns the
  Markdown."""
  task, variants = read_ablations(workdir)
  text = ablations_markdown(task, variants)
  out = out or os.path.join(workdir, 'ablations')
  storage.makedirs(out, exist_ok=True)
  storage.write_bytes(os.path.join(out, 'ablations.md'), (text + '\n').encode())
  found = {(task, 'ablations'): {name: v['dev'] for name, v in variants.items()}}
  chart(found, os.path.join(out, 'ablations.png'), columns=list(variants),
        title=f'{task.replace("_", "-")}: ablations and variants (dev)')
  return text


def main(argv):
  del argv
  f = flags.FLAGS
  workdirs = list(f.workdirs or []) + ([f.workdir] if f.workdir else [])
  if not workdirs:
    raise UserError('give --workdir W or --workdirs W1 W2 ...')
  if f.ablations:
    parts = []
    try:  # beside Table 1's rows when the workdir has them
      parts.append(write(workdirs, f.out or None, f.split, f.paper))
    except UserError:
      pass
    parts += [write_ablations(w, f.out or None) for w in workdirs]
    print('\n\n'.join(parts))
    return
  print(write(workdirs, f.out or None, f.split, f.paper))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A workdir holding PPlug and/or baselines/.')
  flags.DEFINE_list('workdirs', None, 'Several workdirs (e.g. one per task).')
  flags.DEFINE_enum('split', 'dev', ['train', 'dev'], 'Whose metrics to lay out.')
  flags.DEFINE_bool('paper', False, "Add the paper's FlanT5-XXL numbers in [brackets].")
  flags.DEFINE_string('out', '', 'Where table1.md and table1.png go (default: first workdir).')
  flags.DEFINE_bool('ablations', False, 'Also ablations.md and ablations.png from '
                    'W/ablations/results.json (python -m pplug_jax.ablate).')
  cli.run(main)
